"""Multi-part weight updates (``slipstream_parts``): one request, each part over its own weight group.

This test process plays every pipeline stage's publisher: it hosts two weight groups as their
rank 0 (gloo) and a real engine subprocess joins both (``/init_weights_update_group`` per group).
One ``/update_weights_from_distributed`` request with :data:`pipeline.weightsync.PARTS_FIELD`
then describes the whole update; each part's bytes are broadcast over its own group.  Covers:

- a good two-part update: swapped once, the engine's checksum equals the published tensors', the
  reply reports both parts, and the update is adopted (one arena buffer covers every parameter);
- validation: every malformed field is refused with 400 naming the field, before any receive;
- a part whose bytes never arrive (its publisher is silent past the group timeout): the whole
  update is poisoned, nothing swapped, the old weights stay bit-identical; after that part's
  group is re-joined (what a resync does), the next two-part update succeeds.

    /work/venv/bin/pytest tests/test_engine_parts.py -q
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.tiny import make_tiny_model
from pipeline.weightsync import (
    CHUNKS_FIELD,
    PARTS_FIELD,
    WeightGroup,
    combine_digests,
    flatten_bucket,
    init_weight_group,
    tensor_digests,
    weights_checksum,
)
from tests.test_engine_helpers import Engine, free_port, in_thread, load_reference

GROUPS = ("parts-test", "parts-test-pp1")
TIMEOUT_S = 4  # the engine's weight-group timeout: how long a silent part takes to fail


def join(engine: Engine, name: str) -> WeightGroup:
    port = free_port()
    body = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
            "group_name": name, "backend": "gloo"}
    t, box = in_thread(lambda: engine.post("/init_weights_update_group", body))
    group = init_weight_group("127.0.0.1", port, rank=0, world_size=2, backend="gloo", group_name=name, timeout_s=30)
    t.join(30)
    status, out = box["out"]
    assert status == 200 and out["success"] is True, out
    return group


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def chunked(tensors: dict[str, torch.Tensor], n: int) -> list[list[str]]:
    names = list(tensors)
    step = max(1, -(-len(names) // n))
    return [names[i : i + step] for i in range(0, len(names), step)]


class Stages:
    """Two stage publishers in one process: the engine's weights split into two parts."""

    def __init__(self, engine: Engine, model_dir: Path) -> None:
        self.engine = engine
        self.groups = {name: join(engine, name) for name in GROUPS}
        self.published = {k: v.detach().clone() for k, v in load_reference(model_dir).named_parameters()}
        names = list(self.published)
        self.split = [names[: len(names) // 2], names[len(names) // 2 :]]

    def parts(self, seed: int) -> list[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        new = {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in self.published.items()}
        return [{n: new[n] for n in names} for names in self.split]

    def body(self, parts: list[dict[str, torch.Tensor]], version: int) -> dict[str, Any]:
        every = {n: t for part in parts for n, t in part.items()}
        return {
            "names": list(every), "dtypes": [str(t.dtype).removeprefix("torch.") for t in every.values()],
            "shapes": [list(t.shape) for t in every.values()], "group_name": GROUPS[0],
            "load_format": "flattened_bucket", "weight_version": str(version), "flush_cache": False,
            "abort_all_requests": False,
            PARTS_FIELD: [
                {"group_name": GROUPS[k], "num_tensors": len(part),
                 "chunks": [sum(nbytes(part[n]) for n in c) for c in chunked(part, 3)]}
                for k, part in enumerate(parts)
            ],
        }

    def send(self, parts: list[dict[str, torch.Tensor]], version: int, silent: tuple[int, ...] = ()) -> tuple[int, Any]:
        """POST the update, then broadcast every part's chunks except those of ``silent`` parts."""
        t, box = in_thread(lambda: self.engine.post("/update_weights_from_distributed", self.body(parts, version)))
        for k in (1, 0):  # stage 1 first: the engine must not need the parts in order
            if k in silent:
                continue
            for names in chunked(parts[k], 3):
                self.groups[GROUPS[k]].broadcast(flatten_bucket(parts[k][n] for n in names), src=0)
        t.join(60)
        assert "out" in box, box
        return box["out"]

    def commit(self, parts: list[dict[str, torch.Tensor]]) -> None:
        for part in parts:
            self.published.update({n: t.clone() for n, t in part.items()})


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, Path]]:
    model_dir = make_tiny_model(tmp_path_factory.mktemp("tiny-parts"))
    eng = Engine(model_dir, tmp_path_factory.mktemp("engine-parts"), "--set", f"weight_group_timeout_s={TIMEOUT_S}")
    yield eng, model_dir
    assert eng.terminate() == 0, eng.log_tail()


@pytest.fixture(scope="module")
def stages(engine: tuple[Engine, Path]) -> Stages:
    return Stages(*engine)


def checksum(engine: Engine) -> str:
    return str(engine.ok("GET", "/slipstream/weights_checksum")["checksum"])


def test_two_parts_swap_once(engine: tuple[Engine, Path], stages: Stages) -> None:
    eng = engine[0]
    v = eng.version()
    assert checksum(eng) == weights_checksum(stages.published)
    parts = stages.parts(seed=1)
    status, out = stages.send(parts, v + 1)
    assert status == 200 and out["success"] is True, out
    assert [p["group_name"] for p in out["parts"]] == list(GROUPS)
    assert [p["num_tensors"] for p in out["parts"]] == [len(p) for p in parts]
    assert [p["bytes"] for p in out["parts"]] == [sum(nbytes(t) for t in p.values()) for p in parts]
    assert out["adopted"] is True, "one arena buffer must cover both parts"
    stages.commit(parts)
    assert checksum(eng) == weights_checksum(stages.published) and eng.version() == v + 1


@pytest.mark.parametrize("case", ["unknown_group", "counts", "chunks", "both_fields", "duplicate_group",
                                  "not_a_list", "part_not_object", "not_flattened", "zero_tensors"])
def test_bad_parts_field_is_refused(engine: tuple[Engine, Path], stages: Stages, case: str) -> None:
    eng = engine[0]
    v, before = eng.version(), checksum(eng)
    body = stages.body(stages.parts(seed=2), v + 1)
    parts = body[PARTS_FIELD]
    field = PARTS_FIELD
    if case == "unknown_group":
        parts[1]["group_name"] = "no-such-group"
        field = f"{PARTS_FIELD}[1].group_name"
    elif case == "counts":
        parts[0]["num_tensors"] -= 1
    elif case == "chunks":
        parts[1]["chunks"][0] += 4
        field = f"{PARTS_FIELD}[1].chunks"
    elif case == "both_fields":
        body[CHUNKS_FIELD] = [c for p in parts for c in p["chunks"]]
    elif case == "duplicate_group":
        parts[1]["group_name"] = parts[0]["group_name"]
        field = f"{PARTS_FIELD}[1].group_name"
    elif case == "not_a_list":
        body[PARTS_FIELD] = {"group_name": GROUPS[0]}
    elif case == "part_not_object":
        parts[1] = GROUPS[1]
        field = f"{PARTS_FIELD}[1]"
    elif case == "not_flattened":
        body["load_format"] = None
    elif case == "zero_tensors":
        parts[0]["num_tensors"] = 0
        field = f"{PARTS_FIELD}[0].num_tensors"
    status, out = eng.post("/update_weights_from_distributed", body, timeout=30)
    assert status == 400 and out["success"] is False, out
    assert out["error"]["field"] == field, out
    assert checksum(eng) == before and eng.version() == v  # nothing received, nothing swapped


def test_a_failed_part_poisons_the_update_then_rejoin_recovers(engine: tuple[Engine, Path], stages: Stages) -> None:
    eng = engine[0]
    v = eng.version()
    live = {k: t.clone() for k, t in stages.published.items()}
    before = checksum(eng)
    assert before == weights_checksum(live)
    status, out = stages.send(stages.parts(seed=3), v + 1, silent=(1,))  # stage 1's publisher never sends
    assert status == 400 and out["success"] is False, out
    assert GROUPS[1] in out["message"] and "nothing was swapped" in out["message"], out
    assert checksum(eng) == before and eng.version() == v  # old weights, bit-identical
    # Stage 1's group timed out: re-join it (a resync re-creates every group); group 0 is untouched.
    stages.groups[GROUPS[1]] = join(eng, GROUPS[1])
    parts = stages.parts(seed=4)
    status, out = stages.send(parts, v + 1)
    assert status == 200 and out["success"] is True, out
    stages.commit(parts)
    assert checksum(eng) == weights_checksum(stages.published) and eng.version() == v + 1


def test_checksum_composes_from_part_digests() -> None:
    """Rank 0 combines the stages' per-tensor digests into the checksum the engine computes over
    the whole model; any bit, name or dtype difference changes it."""
    g = torch.Generator().manual_seed(0)
    named = {f"w{i}": torch.randn(3, i + 1, generator=g) for i in range(5)}
    stage0, stage1 = {k: named[k] for k in ("w3", "w0")}, {k: named[k] for k in ("w1", "w4", "w2")}
    whole = weights_checksum(named)
    assert combine_digests({**tensor_digests(stage1), **tensor_digests(stage0)}) == whole
    flipped = dict(named, w2=named["w2"].clone())
    flipped["w2"].view(torch.int32)[0, 0] ^= 1
    assert weights_checksum(flipped) != whole
    assert weights_checksum(dict(named, w2=named["w2"].double())) != whole
    assert weights_checksum({("v" + k[1:] if k == "w2" else k): t for k, t in named.items()}) != whole
