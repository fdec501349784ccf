"""``slipstream bench queue`` always finishes (issue 19: its raw baseline hung in about half of all
tries, because the relay process exited with ``LINGER 0`` and dropped the frames still queued).
A small version of the whole benchmark (raw relay process, then the real broker process) runs 20
times in a row; every socket wait has a deadline, so a hang would fail with the deadline's message
rather than stall the suite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zmq

from pipeline.bench import BenchTimeout, _wait_readable, broker_process, run_queue


def test_small_bench_queue_finishes_20_times_in_a_row(tmp_path: Path) -> None:
    with broker_process(tmp_path / "broker", group_size=2, timeout_s=20.0) as ports:
        for i in range(20):
            result = run_queue(groups=12, out_dir=tmp_path / "out", command="test", group_size=2, length=8,
                               timeout_s=20.0, name=f"queue-{i}", ports=ports, epoch=i + 1)
            assert result["baseline_raw_zmq_relay"]["groups"] == result["slipstream_broker"]["groups"] == 12
    written = sorted((tmp_path / "out").glob("*-queue-*-cpu.json"))
    assert len(written) == 20
    assert json.loads(written[0].read_text())["workload"]["groups"] == 12


def test_a_socket_wait_past_its_deadline_says_what_it_waited_for() -> None:
    sock = zmq.Context.instance().socket(zmq.PULL)
    try:
        sock.bind("tcp://127.0.0.1:*")
        with pytest.raises(BenchTimeout, match="no message back from the raw relay"):
            _wait_readable(sock, 0.0, "message back from the raw relay")
    finally:
        sock.close(0)
