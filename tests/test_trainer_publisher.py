"""WeightPublisher against real engine-side receivers in other processes (multiprocessing spawn).

Each receiver is a minimal SGLang-style HTTP server (stdlib ``http.server``) that implements
``/init_weights_update_group`` and ``/update_weights_from_distributed`` with
``pipeline.weightsync``, stages buckets, swaps on the bucket that carries ``weight_version`` and
reports the checksum of what it holds (``POST /state``).  The publisher's checksum must match:
every byte arrived intact, in the right tensor.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from prometheus_client import CollectorRegistry

from consumers.engine_links import WeightSyncMetrics
from consumers.publisher import PublishError, WeightPublisher, plan_buckets, post_json


def _engine_main(port_queue) -> None:
    """A tiny engine-side receiver (runs in a spawned process).  ``POST /test_mode {"fail": ...}``
    makes it refuse to join ("init") or reject buckets ("update")."""
    torch.set_num_threads(1)
    from pipeline.weightsync import dtype_from_name, init_weight_group, unflatten_bucket, weights_checksum

    state: dict = {"group": None, "staged": {}, "live": {}, "version": None, "buckets": 0, "fail": None}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def _reply(self, obj: dict) -> None:
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/get_model_info":  # what the publisher asks an engine that failed (is it still there?)
                return self._reply({"weight_version": str(state["version"])})
            self.send_error(404)

        def do_POST(self) -> None:
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            fail_mode = state["fail"]
            if self.path == "/test_mode":
                state["fail"] = req.get("fail")
                state["kind"] = req.get("kind", "embedded")
                return self._reply({"success": True})
            if self.path == "/init_weights_update_group":
                if fail_mode == "init":
                    return self._reply({"success": False, "message": "cannot join: out of ranks"})
                state["group"] = init_weight_group(
                    req["master_address"], req["master_port"], req["rank_offset"], req["world_size"],
                    req["backend"], req["group_name"], timeout_s=20,
                )
                return self._reply({"success": True, "message": f"joined as rank {req['rank_offset']}"})
            if self.path == "/update_weights_from_distributed":
                if fail_mode == "update":
                    return self._reply({"success": False, "message": "weights rejected: unknown name"})
                if state.get("kind") == "sglang" and not state.get("session"):  # what sglang 0.5.23 answers
                    return self._reply({"success": False, "message": "update_weights_from_distributed must run between "
                                        "begin_weight_update() and end_weight_update()"})
                assert req["load_format"] == "flattened_bucket" and req["flush_cache"] is False
                dtypes = [dtype_from_name(d) for d in req["dtypes"]]
                nbytes = sum(
                    torch.Size(s).numel() * torch.empty((), dtype=d).element_size()
                    for d, s in zip(dtypes, req["shapes"], strict=True)
                )
                flat = torch.empty(nbytes, dtype=torch.uint8)
                offset = 0
                for n in req.get("slipstream_chunks") or [nbytes]:  # the embedded-engine extension
                    state["group"].broadcast(flat[offset : offset + n], src=0)
                    offset += n
                assert offset == nbytes
                for name, t in zip(req["names"], unflatten_bucket(flat, dtypes, req["shapes"]), strict=True):
                    state["staged"][name] = t.clone()
                state["buckets"] += 1
                if req["weight_version"] is not None:  # last bucket: swap, then reply
                    state["live"], state["staged"] = state["staged"], {}
                    state["version"] = req["weight_version"]
                return self._reply({"success": True, "message": "ok"})
            if self.path in ("/begin_weight_update", "/end_weight_update"):  # SGLang 0.5.23's session
                opening = self.path == "/begin_weight_update"
                if state.get("session", False) == opening:
                    return self._reply({"success": False, "message": "session already open" if opening else "no session open"})
                state["session"] = opening
                return self._reply({"success": True, "message": "Success"})
            if self.path in ("/pause_generation", "/continue_generation"):  # SGLang's replies
                state["paused"] = self.path == "/pause_generation"
                return self._reply({"status": "ok"})
            if self.path == "/destroy_weights_update_group":
                state["group"] = None
                return self._reply({"success": True, "message": "left"})
            if self.path == "/state":
                return self._reply({
                    "success": True,
                    "version": state["version"],
                    "checksum": weights_checksum(state["live"]) if state["live"] else None,
                    "names": list(state["live"]),
                    "buckets": state["buckets"],
                    "paused": state.get("paused", False),
                })
            self.send_error(404)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port_queue.put(server.server_address[1])
    server.serve_forever()


@pytest.fixture(scope="module")
def engine_urls():
    """Two receiver processes shared by the tests of this module (torch import is the slow part)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_engine_main, args=(queue,), daemon=True) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        yield [f"http://127.0.0.1:{queue.get(timeout=60)}" for _ in procs]
    finally:
        for p in procs:
            p.terminate()
            p.join(10)


@pytest.fixture
def engines(engine_urls):
    """``engines(fail_modes) -> urls``: set each engine's failure mode (None = healthy)."""

    def configure(*modes: str | None, kind: str = "embedded") -> list[str]:
        for url, mode in zip(engine_urls, modes, strict=False):
            post_json(f"{url}/test_mode", {"fail": mode, "kind": kind}, 10, "test mode")
        return engine_urls[: len(modes)]

    return configure


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(16, 128, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(128, 128, generator=g),
        "model.layers.0.self_attn.q_norm.weight": torch.randn(32, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(128, 512, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(128, generator=g),
        "tiny.int.buffer": torch.arange(7, dtype=torch.int64),
    }


def test_plan_buckets():
    named = {"a": torch.zeros(10), "b": torch.zeros(10), "c": torch.zeros(100), "d": torch.zeros(5)}
    assert plan_buckets(named, 80) == [["a", "b"], ["c"], ["d"]]  # 40+40 fits, c (400 B) alone
    assert plan_buckets(named, 10_000) == [["a", "b", "c", "d"]]
    assert plan_buckets(named, 1) == [["a"], ["b"], ["c"], ["d"]]


@pytest.mark.parametrize("kind", ["embedded", "sglang"])
def test_publish_to_two_engines_in_other_processes(engines, kind):
    """Every byte arrives in the right tensor.  Embedded engines get one request per update (the
    buckets follow as broadcasts); SGLang gets one request per bucket, bracketed by pause/continue."""
    urls = engines(None, None, kind=kind)  # as SGLang 0.5.23, the fake refuses updates outside a weight-update session
    pub = WeightPublisher(urls, bucket_bytes=70_000, timeout_s=30, engine_kind=kind, flush_cache=False)
    pub.connect()
    try:
        for version in (1, 2):
            named = _weights(seed=version)
            before = [post_json(f"{url}/state", {}, 10, "state")["buckets"] for url in urls]
            info = pub.publish(named, version=version)
            assert info.buckets == len(plan_buckets(named, 70_000)) > 2
            assert info.bytes == sum(t.numel() * t.element_size() for t in named.values())
            for url, b0 in zip(urls, before, strict=True):  # publish returned => every engine serves it, bit for bit
                st = post_json(f"{url}/state", {}, 10, "state")
                assert st["version"] == str(version)
                assert st["checksum"] == info.checksum
                assert st["names"] == list(named)
                assert st["buckets"] - b0 == (1 if kind == "embedded" else info.buckets)
                assert st["paused"] is False
    finally:
        pub.close()


def test_engine_refusing_to_join_is_named(engines):
    good, bad = engines(None, "init")
    pub = WeightPublisher([good, bad], timeout_s=15)
    t0 = time.monotonic()
    with pytest.raises(PublishError) as e:
        pub.connect()
    assert bad in str(e.value) and "out of ranks" in str(e.value) and "/init_weights_update_group" in str(e.value)
    assert time.monotonic() - t0 < 10, "an engine's refusal must fail fast, not after the rendezvous timeout"


def test_engine_rejecting_a_bucket_is_named(engines):
    """An engine that refuses an update is taken out of that version, named (URL, route, what
    failed, the version) and counted; the trainer carries on.  Still out of sync after
    weights.rejoin_timeout_s, it fails the next publish, naming it and its last error."""
    (bad,) = engines("update")
    metrics = WeightSyncMetrics(CollectorRegistry())
    pub = WeightPublisher([bad], timeout_s=15, rejoin_timeout_s=1.5, metrics=metrics)
    pub.connect()
    result = pub.publish(_weights(), version=1)
    msg = result.stale[bad]
    assert bad in msg and "/update_weights_from_distributed" in msg and "unknown name" in msg and "version 1" in msg
    assert metrics.failures.labels("error")._value.get() == 1 and metrics.stale._value.get() == 1
    time.sleep(2.0)
    with pytest.raises(PublishError) as e:
        pub.publish(_weights(), version=2)
    assert bad in str(e.value) and "unknown name" in str(e.value) and "weights.rejoin_timeout_s" in str(e.value)
    pub.close()


def test_unreachable_engine_is_named():
    url = "http://127.0.0.1:9"  # discard port: nothing listens
    pub = WeightPublisher([url], timeout_s=5)
    with pytest.raises(PublishError, match=r"127\.0\.0\.1:9/init_weights_update_group"):
        pub.connect()


def test_publish_before_connect_and_bad_args():
    pub = WeightPublisher(["http://127.0.0.1:1"])
    with pytest.raises(PublishError, match="before connect"):
        pub.publish(_weights(), version=1)
    with pytest.raises(ValueError):
        WeightPublisher([])
    with pytest.raises(ValueError):
        WeightPublisher(["http://x"], backend="mpi")
    with pytest.raises(ValueError):
        WeightPublisher(["http://x", "http://y"], ranks_per_engine=[2])
