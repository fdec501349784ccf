"""The README stays true: its config reference lists every config key, its metrics list every
metric the code defines, and its quick start is the command CI runs."""

from __future__ import annotations

import re

from pipeline.catalog import catalog
from pipeline.config import SlipstreamConfig
from pipeline.configbase import field_docs
from tests.helpers import REPO

README = (REPO / "README.md").read_text()


def test_every_config_key_is_documented() -> None:
    missing = [key for key, *_ in field_docs(SlipstreamConfig) if f"`{key}`" not in README]
    assert not missing, f"README config reference lacks {missing}: regenerate with `slipstream config --markdown`"


def test_every_metric_is_documented() -> None:
    ours = [name for name in catalog() if name.startswith("slipstream_")]  # process_*/python_* are standard
    missing = [name for name in ours if f"`{name}`" not in README]
    assert not missing, f"README metrics list lacks {missing}: regenerate with `python -m pipeline.catalog`"


def test_quick_start_test_command_is_what_ci_runs() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    commands = [line for block in blocks for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) >= 2
    install_and_run, install_and_test = commands[0], commands[1]
    assert "slipstream run examples/tiny/config.toml" in install_and_run
    assert install_and_test in (REPO / ".ci" / "run").read_text()
