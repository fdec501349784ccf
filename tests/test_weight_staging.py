"""The fast weight-update path, on CPU: flattening, the chunked single-request update and the
engine's persistent staging arena.

The GPU benchmark (bench/gpu_weights.py) measures the speed; these tests pin the behaviour that
speed relies on: bytes land in the right tensors, an update reuses one arena instead of
allocating, an update that is still being swapped is never overwritten, and a publisher that died
mid-update cannot leak its half-received tensors into the next update.

    pytest tests/test_weight_staging.py -q
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch
from prometheus_client import CollectorRegistry

from consumers.publisher import chunked_update_payload, free_port, plan_buckets
from pipeline.weightsync import (
    CHUNKS_FIELD,
    contiguous_span,
    flatten_bucket,
    flatten_into,
    init_weight_group,
    unflatten_bucket,
)
from producers.engine.metrics import EngineMetrics
from producers.engine.sampling import RequestError
from producers.engine.weights import (
    LayoutCache,
    StagingArena,
    WeightReceiver,
    WeightUpdateError,
    parse_update_request,
)


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(8, 4, generator=g),
        "b.weight": torch.randn(16, generator=g).to(torch.bfloat16),
        "c.bias": torch.arange(5, dtype=torch.int64) * seed,
        "d.weight": torch.randn(4, 8, generator=g).t(),  # not contiguous
    }


def test_flatten_into_matches_flatten_bucket_and_round_trips():
    named = _tensors(1)
    buf = torch.full((4096,), 7, dtype=torch.uint8)
    flat = flatten_into(buf, named.values())
    assert torch.equal(flat, flatten_bucket(named.values()))
    assert flat.data_ptr() == buf.data_ptr()  # into the persistent buffer, not a new one
    back = unflatten_bucket(flat, [t.dtype for t in named.values()], [list(t.shape) for t in named.values()])
    for t, b in zip(named.values(), back, strict=True):
        assert torch.equal(t, b) and t.dtype == b.dtype
    with pytest.raises(ValueError, match="does not fit"):
        flatten_into(torch.empty(10, dtype=torch.uint8), named.values())
    with pytest.raises(ValueError, match="bytes"):
        unflatten_bucket(flat[:-1], [t.dtype for t in named.values()], [list(t.shape) for t in named.values()])


def _body(named: dict[str, torch.Tensor], chunks) -> dict:
    payload = chunked_update_payload(named, [list(named)], "g", 3)
    payload[CHUNKS_FIELD] = chunks
    return payload


def test_chunked_request_is_validated():
    named = _tensors(2)
    buckets = plan_buckets(named, 100)
    payload = chunked_update_payload(named, buckets, "g", 3)
    spec = parse_update_request(payload)
    assert len(buckets) > 1 and spec.chunks == payload[CHUNKS_FIELD] and sum(spec.chunks) == spec.nbytes
    assert spec.weight_version == 3 and spec.names == list(named)
    total = spec.nbytes
    for chunks, message in [([total - 1], "add up to"), ([0, total], "positive"), ([], "non-empty"),
                            ("all", "non-empty list"), ([True, total - 1], "positive")]:
        with pytest.raises(RequestError) as e:
            parse_update_request(_body(named, chunks))
        assert e.value.field == CHUNKS_FIELD and message in str(e.value)
    body = _body(named, [total])
    body["load_format"] = None
    with pytest.raises(RequestError, match="flattened_bucket"):
        parse_update_request(body)


def test_staging_arena_reuses_one_buffer_and_waits_for_the_swap():
    metrics = EngineMetrics(CollectorRegistry())
    arena = StagingArena(capacity=100, metrics=metrics, wait_s=0.3)
    cpu = torch.device("cpu")
    a, b = arena.take(60, cpu), arena.take(40, cpu)
    assert b.data_ptr() == a.data_ptr() + 60  # consecutive slices of one buffer
    assert metrics.staging_bytes._value.get() == 100
    arena.end_update(handed_over=True)  # the scheduler still has to copy it in
    t0 = time.monotonic()
    fresh = arena.take(60, cpu)  # the next update must not overwrite it: waits, then a fresh buffer
    assert time.monotonic() - t0 >= 0.3 and fresh.data_ptr() not in (a.data_ptr(), b.data_ptr())
    arena.release()
    c = arena.take(60, cpu)  # the next update after the swap: the arena again, from its start
    assert c.data_ptr() == a.data_ptr()
    big = arena.take(60, cpu)  # 60 + 60 > 100: does not fit, a fresh buffer
    assert big.data_ptr() != a.data_ptr() + 60
    arena.end_update(handed_over=False)  # abandoned: free at once
    t0 = time.monotonic()
    assert arena.take(10, cpu).data_ptr() == a.data_ptr() and time.monotonic() - t0 < 0.2


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 8, bias=False)
        self.b = torch.nn.Linear(8, 2)


def _publish(group, named: dict[str, torch.Tensor], buckets: list[list[str]]) -> None:
    for names in buckets:
        group.broadcast(flatten_bucket(named[n] for n in names), src=0)


def test_receiver_chunked_update_lands_in_the_arena_and_a_rejoin_drops_a_dead_update():
    model = _Model()
    receiver = WeightReceiver(model, torch.device("cpu"), EngineMetrics(CollectorRegistry()), timeout_s=20)
    named = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    pool = ThreadPoolExecutor(2)

    def join():
        port = free_port("127.0.0.1")
        fut = pool.submit(receiver.init_group, "127.0.0.1", port, 1, 2, "gloo", "g")
        group = init_weight_group("127.0.0.1", port, rank=0, world_size=2, backend="gloo", group_name="g", timeout_s=20)
        fut.result(30)
        return group

    try:
        group = join()
        # A publisher that dies after its first bucket (no weight_version yet) ...
        first = {n: named[n] for n in list(named)[:1]}
        fut = receiver.submit_bucket(parse_update_request(
            {**chunked_update_payload(first, [list(first)], "g", 1), "weight_version": None}))
        _publish(group, first, [list(first)])
        assert fut.result(30).staged_update is None
        # ... and a new publisher joins: the half-received update is dropped, not merged.
        group = join()
        rest = {n: named[n] for n in list(named)[1:]}
        buckets = plan_buckets(rest, 1)
        assert len(buckets) >= 2
        fut = receiver.submit_bucket(parse_update_request(chunked_update_payload(rest, buckets, "g", 2)))
        _publish(group, rest, buckets)
        staged = fut.result(30).staged_update
        assert staged is not None and list(staged) == list(rest)  # nothing of the dead update
        for name, t in staged.items():
            assert torch.equal(t, rest[name])
        ptrs = sorted(t.data_ptr() for t in staged.values())
        first_ptr = ptrs[0]
        receiver.release_staging()
        # The next update is received into the same arena, from its start.
        fut = receiver.submit_bucket(parse_update_request(chunked_update_payload(named, [list(named)], "g", 3)))
        _publish(group, named, [list(named)])
        staged = fut.result(30).staged_update
        assert staged is not None and min(t.data_ptr() for t in staged.values()) == first_ptr
        assert all(torch.equal(staged[n], named[n]) for n in named)
        receiver.release_staging()
    finally:
        receiver.close()
        pool.shutdown(wait=False)


def test_layout_cache_reuses_an_identical_layout_only():
    cache = LayoutCache()
    named = _tensors(4)
    first = parse_update_request(chunked_update_payload(named, [list(named)], "g", 1), cache)
    again = parse_update_request(chunked_update_payload(named, [list(named)], "g", 2), cache)
    assert again.layout is first.layout and again.weight_version == 2  # parsed once, options per request
    assert again.names == list(named) and again.nbytes == first.nbytes
    # any change to names, dtypes or shapes is a miss, parsed (and validated) afresh
    changed = dict(named, **{"a.weight": torch.zeros(4, 9)})
    spec = parse_update_request(chunked_update_payload(changed, [list(changed)], "g", 3), cache)
    assert spec.layout is not first.layout and spec.shapes[0] == [4, 9] and spec.nbytes == first.nbytes + 16
    bad = chunked_update_payload(changed, [list(changed)], "g", 4)
    bad["shapes"][0] = [4, -9]
    with pytest.raises(RequestError, match="non-negative"):
        parse_update_request(bad, cache)
    # a request's chunk sizes are still checked against the (cached) layout's byte size
    body = chunked_update_payload(changed, [list(changed)], "g", 5)
    body[CHUNKS_FIELD] = [spec.nbytes - 1]
    with pytest.raises(RequestError, match="add up to"):
        parse_update_request(body, cache)


def test_cached_layout_is_checked_against_the_model_once_and_refused_every_time():
    """The check result is cached with the layout: a wrong shape is refused on the second request
    too (nothing swapped), and the swap hook runs for a good update straight from the receive thread."""
    model = _Model()
    swaps: list[tuple[int, bool, str]] = []

    def swap(staged, version, adopt):
        swaps.append((version, adopt, threading.current_thread().name))
        fut = Future()
        fut.set_result(0.0)
        return fut

    receiver = WeightReceiver(model, torch.device("cpu"), EngineMetrics(CollectorRegistry()), timeout_s=20, swap=swap)
    good = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    wrong = dict(good, **{"a.weight": torch.randn(8, 5)})
    port = free_port("127.0.0.1")
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(receiver.init_group, "127.0.0.1", port, 1, 2, "gloo", "g")
        group = init_weight_group("127.0.0.1", port, rank=0, world_size=2, backend="gloo", group_name="g", timeout_s=20)
        fut.result(30)
    try:
        layouts = []
        for version in (1, 2):
            spec = parse_update_request(chunked_update_payload(wrong, [list(wrong)], "g", version), receiver.layouts)
            layouts.append(spec.layout)
            fut = receiver.submit_bucket(spec)
            _publish(group, wrong, [list(wrong)])  # the bytes are received anyway (the broadcast must be matched)
            with pytest.raises(WeightUpdateError, match=r"'a.weight': shape \[8, 5\]"):
                fut.result(30)
        assert layouts[0] is layouts[1] and layouts[0].checked  # checked once, refused twice
        assert swaps == []
        spec = parse_update_request(chunked_update_payload(good, [list(good)], "g", 3), receiver.layouts)
        fut = receiver.submit_bucket(spec)
        _publish(group, good, [list(good)])
        result = fut.result(30)
        assert result.swap is not None and result.swap.result(5) == 0.0
        assert swaps == [(3, True, "engine-weight-recv")]  # adopted, handed over by the receive thread
        assert result.posted_at <= result.received_at
    finally:
        receiver.close()


def test_snapshot_is_one_flat_buffer_that_publishes_without_a_copy():
    from consumers.publish_async import WeightSnapshot

    named = {n: t.contiguous() for n, t in _tensors(3).items()}
    snap = WeightSnapshot()
    first = snap.take(named)
    assert first.contiguous  # one buffer, every tensor a view in order: publishable in one broadcast
    names = list(named)
    span = contiguous_span([first[n] for n in names])
    assert span is not None and torch.equal(span, flatten_bucket(named.values()))
    assert span.data_ptr() == first[names[0]].data_ptr()  # a view of the snapshot, not a copy
    part = contiguous_span([first[n] for n in names[1:3]])  # any run of consecutive tensors
    assert part is not None and torch.equal(part, flatten_bucket(named[n] for n in names[1:3]))
    assert contiguous_span([first[names[1]], first[names[0]]]) is None  # out of order
    assert contiguous_span([first[names[0]], first[names[2]]]) is None  # a gap
    assert contiguous_span(list(named.values())) is None  # separate tensors
    assert contiguous_span([torch.randn(4, 8).t()]) is None  # not contiguous
    # The next take copies in place (same buffers, new values); a new layout re-allocates.
    again = snap.take({n: t + 1 if t.is_floating_point() else t for n, t in named.items()})
    assert again[names[0]].data_ptr() == first[names[0]].data_ptr()
    assert torch.equal(again[names[0]], named[names[0]] + 1)
    other = snap.take({"x": torch.ones(3)})
    assert list(other) == ["x"] and torch.equal(other["x"], torch.ones(3))
    # a float32 after 3 bf16 values would sit at byte 6, misaligned: it gets a buffer of its own
    odd = snap.take({"h": torch.ones(3, dtype=torch.bfloat16), "f": torch.ones(2)})
    assert not odd.contiguous and torch.equal(odd["f"], torch.ones(2))
