"""WeightPublisher features against real embedded-engine processes, and AsyncPublisher ordering.

* SGLang pause mode: with ``engine_kind="sglang"`` the publisher calls ``/pause_generation {mode}``,
  then every bucket (the engine reports ``paused`` while they arrive), ``/flush_cache``, then
  ``/continue_generation``; a generation in flight survives (``in_place``); a failed publish still
  resumes generation.
* Joining: an engine killed and restarted on the same port mid-run (it comes back at version 0) is
  brought back into the weight group by the next publish and ends at the current version with the
  trainer's checksum; one still down when a publish starts is taken out of it (the other engine gets
  the version at once) and rejoined in the background; one that never comes back fails a publish
  after ``rejoin_timeout_s``, naming it.
* AsyncPublisher: version v+1 never starts before v returned, ``on_done(v)`` runs on the caller's
  thread after publish(v) returned, the snapshot is a copy (reused buffers), errors surface.

    /work/venv/bin/pytest tests/test_weight_streaming.py -q
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import consumers.engine_http as engine_http
from consumers.engine_driver import EmbeddedDriver
from consumers.publish_async import AsyncPublisher, WeightSnapshot
from consumers.publisher import PublishError, WeightPublisher
from pipeline.tiny import make_tiny_model
from pipeline.weightsync import weights_checksum
from tests.test_engine_helpers import Engine, free_port, in_thread, load_reference


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-ws"), max_position_embeddings=1024)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load_reference(model_dir).named_parameters()}


def _weights(reference: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in reference.items()}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Records every HTTP call of the publisher as (route, extra); for the first bucket of each
    version it also asks the engine whether generation is paused right then."""
    seen: list[tuple[str, Any]] = []
    real = engine_http.post_json
    lock = threading.Lock()

    def recording(url: str, payload: dict[str, Any] | bytes | None, timeout_s: float, what: str,
                  connections: Any = None) -> dict[str, Any]:
        route = url.split(":", 2)[2].split("/", 1)[1]
        if isinstance(payload, bytes):  # the embedded engine's pre-encoded update request
            payload = json.loads(payload)
        extra: Any = payload.get("mode") if payload and route == "pause_generation" else None
        if route == "update_weights_from_distributed" and payload and payload["names"] and ("bucket 1/" in what or "bucket(s)" in what):
            base = url.rsplit("/", 1)[0]
            extra = real(f"{base}/get_server_info", None, timeout_s, "server info")["paused"]
        with lock:
            seen.append(("/" + route, extra))
        return real(url, payload, timeout_s, what, connections)

    monkeypatch.setattr(engine_http, "post_json", recording)
    return seen


# ------------------------------------------------------------------------------- SGLang pause
@pytest.fixture(scope="module")
def engine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = Engine(model_dir, tmp_path_factory.mktemp("engine-ws"), "--seed", "3")
    yield eng
    assert eng.terminate() == 0, eng.log_tail()


def test_sglang_mode_pauses_around_the_buckets(engine: Engine, reference: dict[str, torch.Tensor],
                                               calls: list[tuple[str, Any]]) -> None:
    pub = WeightPublisher([engine.base], bucket_bytes=40_000, timeout_s=30, engine_kind="sglang",
                          pause_mode="in_place", flush_cache=True, group_name="ws-pause")
    pub.connect()
    try:
        # a long generation is in flight while the update happens; in_place keeps it running
        t, box = in_thread(lambda: engine.generate({"input_ids": [1, 2, 3], "return_logprob": True,
                                                    "sampling_params": {"max_new_tokens": 400, "temperature": 1.0}}))
        time.sleep(0.5)
        calls.clear()
        named = _weights(reference, seed=1)
        info = pub.publish(named, version=1)
        t.join(120)
        assert "err" not in box, box
        routes = [r for r, _ in calls]
        n = info.buckets
        assert n > 2
        assert routes == ["/pause_generation", "/begin_weight_update"] + ["/update_weights_from_distributed"] * n + [
            "/end_weight_update", "/flush_cache", "/continue_generation"], routes
        assert calls[0][1] == "in_place"
        assert calls[2][1] is True, "the engine was not paused while the first bucket arrived"
        assert info.pause_s > 0
        assert engine.ok("GET", "/slipstream/weights_checksum")["checksum"] == info.checksum
        assert engine.ok("GET", "/get_server_info")["paused"] is False
        out = box["out"]
        versions = out["meta_info"]["output_token_weight_versions"]
        assert len(versions) == len(out["meta_info"]["output_token_logprobs"])
        assert versions == sorted(versions) and versions[-1] in (0, 1)

        # retract mode, and the embedded kind: no pause/continue at all
        calls.clear()
        pub.driver.pause_mode = "retract"  # type: ignore[attr-defined]
        info = pub.publish(_weights(reference, seed=2), version=2)
        assert calls[0] == ("/pause_generation", "retract") and calls[-1][0] == "/continue_generation"
        pub.driver = EmbeddedDriver()
        calls.clear()
        info = pub.publish(_weights(reference, seed=3), version=3)
        assert [r for r, _ in calls] == ["/update_weights_from_distributed"], "one request for the whole update"
        assert info.buckets > 2
        assert calls[0][1] is False, "the embedded engine keeps decoding while buckets arrive"
        assert engine.version() == 3
    finally:
        pub.close()


def test_update_reply_accounts_for_the_request_time(engine: Engine, reference: dict[str, torch.Tensor]) -> None:
    """The engine's reply says where an update request spent its time; the publisher passes the
    slowest engine's account on, so a benchmark can split an update into request latency,
    receive, swap and reply latency.  Two updates with one layout: the second reuses both the
    encoded request and the engine's parsed layout, and lands bit for bit all the same."""
    pub = WeightPublisher([engine.base], bucket_bytes=40_000, timeout_s=30, group_name="ws-timings")
    pub.connect()
    try:
        for version, seed in ((11, 11), (12, 12)):
            named = _weights(reference, seed=seed)
            info = pub.publish(named, version=version)
            t = info.timings
            parts = ("parse_s", "queue_s", "receive_s", "swap_wait_s", "swap_s")
            assert all(t[f"engine_{k}"] >= 0 for k in parts), t
            assert t["engine_receive_s"] > 0 and t["engine_swap_s"] == pytest.approx(info.pause_s)
            assert sum(t[f"engine_{k}"] for k in parts) == pytest.approx(t["engine_handler_s"], abs=1e-6)
            # the engine started after the post and finished before the reply came back (same host)
            assert t["posted_at"] <= t["engine_started_at"]
            assert t["engine_started_at"] + t["engine_handler_s"] <= t["posted_at"] + t["send_s"]
            assert engine.ok("GET", "/slipstream/weights_checksum")["checksum"] == info.checksum
            assert engine.version() == version
    finally:
        pub.close()


def test_flat_snapshot_goes_out_in_one_broadcast(engine: Engine, reference: dict[str, torch.Tensor]) -> None:
    """The bucket size bounds the publisher's flatten buffers; a flat snapshot needs none, so it
    is sent whole, in one broadcast, and lands bit for bit like the bucketed plain dict."""
    pub = WeightPublisher([engine.base], bucket_bytes=40_000, timeout_s=30, group_name="ws-flat")
    pub.connect()
    try:
        plain = _weights(reference, seed=21)
        info = pub.publish(plain, version=21)
        assert info.buckets > 2
        snap = WeightSnapshot().take(_weights(reference, seed=22))
        assert snap.contiguous
        info = pub.publish(snap, version=22)
        assert info.buckets == 1 and info.bytes == sum(t.numel() * t.element_size() for t in snap.values())
        assert engine.ok("GET", "/slipstream/weights_checksum")["checksum"] == info.checksum == weights_checksum(snap)
        assert engine.version() == 22
    finally:
        pub.close()


def test_failed_publish_still_continues_generation(engine: Engine, reference: dict[str, torch.Tensor],
                                                   calls: list[tuple[str, Any]]) -> None:
    pub = WeightPublisher([engine.base], timeout_s=30, engine_kind="sglang", pause_mode="abort", group_name="ws-fail")
    pub.connect()
    try:
        calls.clear()
        result = pub.publish({"no.such.weight": torch.zeros(3)}, version=9)  # the engine refuses: taken out, the trainer carries on
        assert "no.such.weight" in result.stale[engine.base]
        assert [r for r, _ in calls][:5] == ["/pause_generation", "/begin_weight_update", "/update_weights_from_distributed",
                                            "/end_weight_update", "/continue_generation"]
        assert engine.ok("GET", "/get_server_info")["paused"] is False
        out = engine.generate({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}, "return_logprob": True})
        assert len(out["meta_info"]["output_token_logprobs"]) == 3
    finally:
        pub.close()


# ------------------------------------------------------------------------------------ joining
@pytest.mark.slow  # starts several engine processes
def test_restarted_engine_gets_the_current_version(model_dir: Path, tmp_path: Path,
                                                   reference: dict[str, torch.Tensor]) -> None:
    port = free_port()
    eng = Engine(model_dir, tmp_path / "a", "--port", str(port))
    other = Engine(model_dir, tmp_path / "b")
    urls = [eng.base, other.base]
    pub = WeightPublisher(urls, bucket_bytes=60_000, timeout_s=30, resync=True, rejoin_timeout_s=120, group_name="ws-join")
    try:
        pub.connect()
        info = pub.publish(_weights(reference, seed=11), version=1)
        assert info.rejoined == 0
        # killed and restarted on the same port while nobody publishes: it serves version 0 again
        eng.kill()
        eng = Engine(model_dir, tmp_path / "a2", "--port", str(port))
        assert eng.base == urls[0] and eng.version() == 0
        named = _weights(reference, seed=12)
        info = pub.publish(named, version=2)
        assert info.rejoined == 1
        for e in (eng, other):
            st = e.ok("GET", "/slipstream/weights_checksum")
            assert (st["weight_version"], st["checksum"]) == ("2", weights_checksum(named))

        # killed, and still down when the next publish starts: the other engine gets the version (the
        # trainer carries on), the dead one is marked stale and resynced in the background once it is back
        eng.kill()
        named = _weights(reference, seed=13)
        t0 = time.monotonic()
        info = pub.publish(named, version=3)
        assert time.monotonic() - t0 < 20, "a publish must not wait for an engine that is down"
        assert list(info.stale) == [eng.base], info.stale
        assert other.ok("GET", "/slipstream/weights_checksum")["checksum"] == weights_checksum(named)
        eng = Engine(model_dir, tmp_path / "a3", "--port", str(port))
        deadline, version = time.monotonic() + 120, 4
        while True:  # the background rejoin brings it back; the publish after that brings it up to date
            named = _weights(reference, seed=10 + version)
            info = pub.publish(named, version=version)
            if not info.stale:
                break
            assert time.monotonic() < deadline, f"{eng.base} never rejoined: {info.stale}"
            time.sleep(0.5)
            version += 1
        assert info.rejoined == 1
        for e in (eng, other):
            st = e.ok("GET", "/slipstream/weights_checksum")
            assert st["weight_version"] == str(version) and st["checksum"] == weights_checksum(named)
        # nothing lags: no rejoin
        assert pub.publish(_weights(reference, seed=14), version=version + 1).rejoined == 0
    finally:
        pub.close()
        for e in (eng, other):
            e.kill()


@pytest.mark.slow  # starts several engine processes
def test_engine_that_never_comes_back_is_named(model_dir: Path, tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    eng = Engine(model_dir, tmp_path / "gone")
    pub = WeightPublisher([eng.base], timeout_s=10, resync=True, rejoin_timeout_s=2, group_name="ws-gone")
    try:
        pub.connect()
        pub.publish(_weights(reference, seed=21), version=1)
        eng.kill()
        assert list(pub.publish(_weights(reference, seed=22), version=2).stale) == [eng.base]  # out, rejoining
        time.sleep(2.5)
        with pytest.raises(PublishError, match=rf"{eng.base}.*did not answer /get_model_info within 2s"):
            pub.publish(_weights(reference, seed=23), version=3)
    finally:
        eng.kill()


# ------------------------------------------------------------------------------ async publish
class FakePublisher:
    """Records when each publish starts and returns; optionally fails one version."""

    engine_urls = ["http://fake"]

    def __init__(self, seconds: float, fail: int | None = None) -> None:
        self.seconds = seconds
        self.fail = fail
        self.events: list[tuple[str, int, float]] = []
        self.seen: dict[int, float] = {}

    def publish(self, named: dict[str, torch.Tensor], version: int, checksum: bool = True) -> dict[str, Any]:
        self.events.append(("start", version, time.monotonic()))
        time.sleep(self.seconds)  # the caller changes its tensors meanwhile
        self.seen[version] = float(named["w"][0])
        if version == self.fail:
            raise PublishError(f"engine refused version {version}")
        self.events.append(("end", version, time.monotonic()))
        return {"version": version, "seconds": self.seconds}


def test_async_publish_orders_versions_and_reports_on_the_caller_thread() -> None:
    fake = FakePublisher(seconds=0.2)
    done: list[tuple[int, float, str]] = []
    ap = AsyncPublisher(fake, lambda v, info, ctx: done.append((v, time.monotonic(), threading.current_thread().name)),  # type: ignore[arg-type]
                        timeout_s=10)
    w = torch.zeros(4)
    t0 = time.monotonic()
    for v in (1, 2, 3):
        w.fill_(v)
        ap.submit({"w": w}, v)
        w.fill_(-1)  # the trainer's next step changes the weights: the publish must not see it
        assert ap.in_flight == v
    assert time.monotonic() - t0 < 0.2 * 3, "submit must return while the last publish runs"
    while not ap.poll():
        time.sleep(0.01)
    assert ap.in_flight is None
    starts = {v: t for kind, v, t in fake.events if kind == "start"}
    ends = {v: t for kind, v, t in fake.events if kind == "end"}
    for v in (1, 2):
        assert starts[v + 1] >= ends[v], f"publish of v{v + 1} started before v{v} finished"
    assert [v for v, _, _ in done] == [1, 2, 3]
    for v, t, thread in done:
        assert t >= ends[v], f"on_done(v{v}) (Published) ran before publish(v{v}) returned"
        assert thread == threading.current_thread().name
    assert fake.seen == {1: 1.0, 2: 2.0, 3: 3.0}


def test_async_publish_error_surfaces_on_the_caller_thread() -> None:
    fake = FakePublisher(seconds=0.05, fail=2)
    done: list[int] = []
    ap = AsyncPublisher(fake, lambda v, info, ctx: done.append(v), timeout_s=10)  # type: ignore[arg-type]
    ap.submit({"w": torch.ones(1)}, 1)
    ap.submit({"w": torch.ones(1)}, 2)
    with pytest.raises(PublishError, match="refused version 2"):
        ap.wait()
    assert done == [1]
    slow = AsyncPublisher(FakePublisher(seconds=3), lambda v, info, ctx: None, timeout_s=10)  # type: ignore[arg-type]
    slow.submit({"w": torch.ones(1)}, 5)
    with pytest.raises(TimeoutError, match="publish of version 5"):
        slow.wait(timeout_s=0.3)


def test_snapshot_reuses_its_buffers() -> None:
    snap = WeightSnapshot()
    a = {"x": torch.arange(6.0).view(2, 3), "y": torch.ones(2, dtype=torch.bfloat16)}
    s1 = snap.take(a)
    ptr = s1["x"].data_ptr()
    a["x"].add_(1)
    assert torch.equal(s1["x"], torch.arange(6.0).view(2, 3)), "the snapshot must be a copy"
    s2 = snap.take(a)
    assert s2["x"].data_ptr() == ptr and torch.equal(s2["x"], a["x"]) and s2["y"].dtype == torch.bfloat16
