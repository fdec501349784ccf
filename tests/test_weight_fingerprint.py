"""The weights checksum's per-tensor fingerprint (``pipeline.weightsync``): its math against a
plain-Python reference, and what it must tell apart.

The fingerprint runs on the tensor's device (GPU for a GPU model) so that ``run.verify_weights``
costs milliseconds, not a host copy plus a sha256 of every byte.  A trainer and an engine compare
their checksums, so the function must be exactly the one documented: the reference below is an
independent implementation of that text (splitmix64 finaliser, logical shifts, sums mod 2**64).
The CUDA side of "same bytes, same fingerprint on any device" is in ``test_engine_weights_gpu.py``.

    pytest tests/test_weight_fingerprint.py -q
"""

from __future__ import annotations

import struct

import pytest
import torch

from pipeline import weightsync
from pipeline.weightsync import tensor_digest, tensor_digests, weights_checksum

MASK = 2**64 - 1


def reference_fingerprint(data: bytes) -> int:
    """h = sum_i mix64(word_i + i * K) mod 2**64; words are int32 (uint8 when len % 4 != 0)."""
    words = struct.unpack(f"<{len(data) // 4}i", data) if len(data) % 4 == 0 else tuple(data)
    k = 0x9E3779B97F4A7C15
    total = 0
    for i, w in enumerate(words):
        x = (w + i * k) & MASK
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
        total = (total + (x ^ (x >> 31))) & MASK
    return total


@pytest.mark.parametrize("dtype,shape", [(torch.float32, (7, 5)), (torch.bfloat16, (3, 3)), (torch.bfloat16, (4, 6)),
                                         (torch.int64, (9,)), (torch.uint8, (13,)), (torch.float32, (0, 4))])
def test_fingerprint_matches_the_documented_math(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(shape, generator=g) * 1000).to(dtype) if dtype.is_floating_point else torch.randint(0, 200, shape, generator=g).to(dtype)
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert int(weightsync._fingerprint(t).item()) & MASK == reference_fingerprint(data)


def test_fingerprint_chunks_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Positions keep counting across chunks: a chunked pass equals the one-chunk pass."""
    t = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    whole = int(weightsync._fingerprint(t).item())
    monkeypatch.setitem(weightsync._FINGERPRINT_CHUNK, "cpu", 77)
    assert int(weightsync._fingerprint(t).item()) == whole


def test_every_single_bit_flip_and_every_swap_changes_the_digest() -> None:
    t = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    base = tensor_digest("w", t)
    words = t.view(torch.int32).reshape(-1)
    for i in range(words.numel()):
        for bit in (0, 17, 31):
            flipped = t.clone()
            flipped.view(torch.int32).reshape(-1)[i] ^= 1 << bit
            assert tensor_digest("w", flipped) != base, (i, bit)
    for i in range(words.numel() - 1):
        swapped = t.clone().reshape(-1)
        swapped[[i, i + 1]] = swapped[[i + 1, i]]
        assert tensor_digest("w", swapped.reshape(4, 8)) != base, i
    assert tensor_digest("w", t.reshape(8, 4)) != base  # shape is part of it
    assert tensor_digest("v", t) != base  # and the name


def test_digests_keep_their_order_and_equal_the_single_tensor_form() -> None:
    g = torch.Generator().manual_seed(4)
    named = {f"w{i}": torch.randn(i + 2, 3, generator=g) for i in (3, 0, 2, 1)}
    named["half"] = torch.randn(5, generator=g).to(torch.bfloat16)  # 10 bytes: the uint8 words
    digests = tensor_digests(named)
    assert list(digests) == list(named)
    assert digests == {n: tensor_digest(n, t) for n, t in named.items()}
    assert weights_checksum(named) == weights_checksum(dict(reversed(list(named.items()))))
    assert tensor_digests({}) == {}
