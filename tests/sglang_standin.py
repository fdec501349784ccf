"""A stand-in for ``python -m sglang.launch_server``: records its argv, then serves the HTTP subset.

SGLang cannot run on slipstream's test machines, so the launch path of ``producer.engine =
"sglang"`` is tested against this script (``producer.sglang_command = [python, tests/sglang_standin.py]``):

- it parses its command line against SGLang's ``ServerArgs`` flags as slipstream knows them
  (:mod:`producers.sglang_args`: the recorded 0.5.23 list here) and exits 2 on an unknown flag,
  as SGLang's argparse would;
- it appends one JSON line ``{"argv": [...], "cuda_visible_devices": ..., "pid": ...}`` to the file
  named by ``$SLIPSTREAM_STANDIN_RECORD`` (if set), one per start (so a restart shows up);
- it then runs slipstream's embedded engine on ``--model-path``/``--host``/``--port`` with
  ``--weight-version``, which speaks the SGLang HTTP subset slipstream uses (``/health``,
  ``/generate``, ``/pause_generation``, weight updates, ...).  It is *not* SGLang: this tests
  slipstream's launcher, flags and supervision, not SGLang.

    python tests/sglang_standin.py --model-path DIR --host 127.0.0.1 --port 30000 [--flags ...]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """(the four flags slipstream sets, unknown flags) from an SGLang-style command line."""
    from producers.sglang_args import server_fields

    fields, _ = server_fields()
    kinds = {flag: f["kind"] for f in fields.values() for flag in f["flags"]}
    known: dict[str, str] = {}
    unknown: list[str] = []
    i = 0
    while i < len(argv):
        flag, _, inline = argv[i].partition("=")
        kind = kinds.get(flag)
        if kind is None:
            unknown.append(flag)
            i += 1
            continue
        if kind == "bool":
            i += 1
            continue
        if kind == "list":
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            i = j
            continue
        value = inline if inline else argv[i + 1] if i + 1 < len(argv) else ""
        known[flag] = value
        i += 1 if inline else 2
    return known, unknown


def main(argv: list[str]) -> int:
    known, unknown = parse(argv)
    record = os.environ.get("SLIPSTREAM_STANDIN_RECORD")
    if record:
        with open(record, "a") as f:
            f.write(json.dumps({"argv": argv, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid()}) + "\n")
    if unknown:
        print(f"sglang stand-in: error: unrecognized arguments: {' '.join(unknown)}", file=sys.stderr)
        return 2
    from producers.engine.server import main as engine_main

    return engine_main(["--model", known["--model-path"], "--host", known.get("--host", "127.0.0.1"), "--port", known.get("--port", "30000"),
                        "--weight-version", known.get("--weight-version", "0")])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
