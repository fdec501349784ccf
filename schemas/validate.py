"""Boundary validation of trajectory groups (DESIGN §4).

A group is accepted only if every per-token array has the response length, log-probs are finite
and ≤ 0, token ids are inside ``[0, vocab_size)``, versions are ≥ 0 and not from the future, and
size limits hold.  Any defect raises :class:`WireError` naming the trajectory and field; the
broker turns it into an ``Error`` reply and a ``slipstream_broker_rejected_messages_total{reason}``
increment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from schemas.messages import PER_TOKEN_ARRAYS, TrajectoryGroup

# Bounded set of rejection reasons (metric label values).
REJECT_REASONS = (
    "malformed",
    "frame_count",
    "schema_version",
    "unknown_type",
    "bad_field",
    "bad_dtype",
    "length_mismatch",
    "nonfinite_logprob",
    "positive_logprob",
    "token_out_of_range",
    "future_version",
    "oversize",
    "unexpected",
    "not_registered",
    "queue_full",
)


class WireError(ValueError):
    """A message failed decoding or validation. ``code`` is one of REJECT_REASONS."""

    def __init__(self, code: str, message: str) -> None:
        assert code in REJECT_REASONS, code
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


@dataclass
class Limits:
    """Explicit, enforced limits for one receiving endpoint."""

    max_message_bytes: int = 64 * 1024 * 1024
    max_group_size: int = 1024
    max_tokens_per_trajectory: int = 1 << 20
    vocab_size: int | None = None  # token ids must be < vocab_size when known
    max_version: int | None = None  # versions must be <= this (the current policy version) when known


def arrays_look_valid(arrays: dict[str, np.ndarray], limits: Limits) -> bool:
    """Fast path: the value checks of :func:`validate_group` over a group's concatenated arrays
    (a handful of vectorised reductions per group instead of per trajectory). ``False`` means some
    check fails; call :func:`validate_group` to name the trajectory and field."""
    lp, versions, mask = arrays["logprobs"], arrays["versions"], arrays["loss_mask"]
    if len(lp) and not (np.isfinite(lp).all() and lp.max() <= 0):
        return False
    for name in ("prompt_tokens", "response_tokens"):
        tokens = arrays[name]
        if len(tokens) and (tokens.min() < 0 or (limits.vocab_size is not None and tokens.max() >= limits.vocab_size)):
            return False
    if len(versions) and (versions.min() < 0 or (limits.max_version is not None and versions.max() > limits.max_version)):
        return False
    return not (len(mask) and mask.max() > 1)


def validate_group(group: TrajectoryGroup, limits: Limits) -> None:
    for i, t in enumerate(group.trajectories):
        where = f"group {group.group_id!r} trajectory[{i}] ({t.trajectory_id!r})"
        n = len(t.response_tokens)
        for name in PER_TOKEN_ARRAYS:
            if len(getattr(t, name)) != n:
                raise WireError("length_mismatch", f"{where}: '{name}' has {len(getattr(t, name))} entries, response has {n}")
        if t.num_tokens > limits.max_tokens_per_trajectory:
            raise WireError("oversize", f"{where}: {t.num_tokens} tokens > limit {limits.max_tokens_per_trajectory}")
        if not np.isfinite(t.logprobs).all():
            j = int(np.flatnonzero(~np.isfinite(t.logprobs))[0])
            raise WireError("nonfinite_logprob", f"{where}: logprobs[{j}] = {t.logprobs[j]} is not finite")
        if (t.logprobs > 0).any():
            j = int(np.flatnonzero(t.logprobs > 0)[0])
            raise WireError("positive_logprob", f"{where}: logprobs[{j}] = {t.logprobs[j]} > 0 is not a log-probability")
        for name in ("prompt_tokens", "response_tokens"):
            arr = getattr(t, name)
            if len(arr) and arr.min() < 0:
                raise WireError("token_out_of_range", f"{where}: '{name}' has negative id {int(arr.min())}")
            if limits.vocab_size is not None and len(arr) and arr.max() >= limits.vocab_size:
                raise WireError("token_out_of_range", f"{where}: '{name}' has id {int(arr.max())} >= vocab size {limits.vocab_size}")
        if len(t.versions) and t.versions.min() < 0:
            raise WireError("bad_field", f"{where}: negative policy version {int(t.versions.min())}")
        if limits.max_version is not None and len(t.versions) and t.versions.max() > limits.max_version:
            raise WireError("future_version", f"{where}: version {int(t.versions.max())} is newer than the published policy version {limits.max_version}")
        if ((t.loss_mask != 0) & (t.loss_mask != 1)).any():
            raise WireError("bad_field", f"{where}: loss_mask must be 0 or 1")
