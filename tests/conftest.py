"""pytest options for the whole suite.

``--hog``: run the session under a CPU hog, one busy-loop process per core (``--hog-procs N``: N),
started before the first test and stopped by PID after the last (tests/stress.py).  CI runs the
tests that used to fail only on a loaded machine this way once (``.ci/run``):

    pytest --hog tests/test_plugin_timeouts.py tests/test_oversample.py
"""

from __future__ import annotations

import pytest

from tests.stress import Hog

_HOG = pytest.StashKey[Hog]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--hog", action="store_true", default=False,
                     help="run under a CPU hog: one busy-loop process per core for the session, stopped by PID at the end")
    parser.addoption("--hog-procs", type=int, default=None, metavar="N", help="with --hog: N busy processes instead of one per core")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--hog") and not hasattr(config, "workerinput"):
        config.stash[_HOG] = Hog(config.getoption("--hog-procs")).start()


def pytest_unconfigure(config: pytest.Config) -> None:
    hog = config.stash.get(_HOG, None)
    if hog is not None:
        hog.stop()


def pytest_report_header(config: pytest.Config) -> str | None:
    hog = config.stash.get(_HOG, None)
    return None if hog is None else f"CPU hog: {hog.n} busy processes, pids {hog.pids}"
