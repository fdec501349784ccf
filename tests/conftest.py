"""pytest options for the whole suite.

``--hog[=N]``: run the session under a CPU hog, N busy-loop processes (default: one per core),
started before the first test and stopped by PID after the last (tests/stress.py).  CI runs the
tests that used to fail only on a loaded machine this way once (``.ci/run``):

    pytest --hog tests/test_plugin_timeouts.py tests/test_oversample.py
"""

from __future__ import annotations

import pytest

from tests.stress import Hog

_HOG = pytest.StashKey[Hog]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--hog", nargs="?", const=0, default=None, type=int, metavar="N",
                     help="run under a CPU hog: N busy-loop processes (default one per core), stopped at the end")


def pytest_configure(config: pytest.Config) -> None:
    n = config.getoption("--hog")
    if n is not None and not hasattr(config, "workerinput"):
        config.stash[_HOG] = Hog(n or None).start()


def pytest_unconfigure(config: pytest.Config) -> None:
    hog = config.stash.get(_HOG, None)
    if hog is not None:
        hog.stop()


def pytest_report_header(config: pytest.Config) -> str | None:
    hog = config.stash.get(_HOG, None)
    return None if hog is None else f"CPU hog: {hog.n} busy processes, pids {hog.pids}"
