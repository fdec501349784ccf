"""Boundary validation of trajectory groups (DESIGN §4).

A group is accepted only if every trajectory has at least one response token, every per-token
array has the response length, rewards are finite, log-probs are finite and ≤ 0, token ids are
inside ``[0, vocab_size)``, versions are ≥ 0 and not from the future, and size limits hold.  Any
defect raises :class:`WireError` whose ``code`` is one of :data:`REJECT_REASONS` and whose message
names the trajectory and field; the broker turns it into an ``Error`` reply (with the group's
``seq``/``epoch`` so the producer can match it, and the group's credit returned) and a
``slipstream_broker_rejected_messages_total{reason}`` increment.

Empty responses are invalid (reason ``empty_response``): a response with no tokens has nothing to
train on and no policy version (staleness is measured from the oldest token's version), and its
reward would shift its group's advantage baseline for a sample that never happened.  An engine
answers every request with at least one token unless the request was aborted before its first
token; the producer retries such a group instead of sending it (``producers.group``).

    validate_group(group, Limits(vocab_size=..., max_version=...))   # raises WireError
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from schemas.messages import PER_TOKEN_ARRAYS, TrajectoryGroup

#: The bounded set of rejection reasons (the ``reason`` label of the rejection counters, the ``code`` of
#: an ``Error`` reply), each with what it means. Every malformed or refused message maps to exactly one.
REJECT_REASONS: dict[str, str] = {
    "malformed": "frame 0 is not a msgpack map (truncated, garbage, wrong top-level type)",
    "frame_count": "wrong number of frames for the message type (array frames missing or extra)",
    "schema_version": "schema_version missing, not an int (2.0 and true are refused), unknown, or older than the type",
    "unknown_type": "the 'type' field names no slipstream message",
    "bad_field": "a field is missing, unknown, of the wrong type or out of range (names the field)",
    "bad_dtype": "an array frame's declared dtype is not the fixed wire dtype",
    "length_mismatch": "array frame sizes and the per-trajectory lengths disagree",
    "empty_response": "a trajectory has no response tokens (each needs at least one)",
    "nonfinite_reward": "a reward is NaN or infinite",
    "nonfinite_logprob": "a log-prob is NaN or infinite",
    "positive_logprob": "a log-prob is > 0",
    "token_out_of_range": "a token id is negative or >= the vocabulary size",
    "future_version": "a token's policy version is newer than the committed policy version",
    "oversize": "the message, group or trajectory exceeds its configured limit",
    "not_allowed": "a well-formed message of a type this peer may not send here (e.g. a producer's 'commit')",
    "not_registered": "a message before the peer's hello",
    "queue_full": "the queue is at its bound; the producer resends the group later",
    "internal": "the broker failed handling a message (a bug: logged with its traceback)",
}


class WireError(ValueError):
    """A message failed decoding or validation. ``code`` is one of REJECT_REASONS."""

    def __init__(self, code: str, message: str) -> None:
        if code not in REJECT_REASONS:
            raise ValueError(f"WireError code {code!r} is not one of REJECT_REASONS")
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        #: True when the codec's last-resort guard raised it (no named check caught the defect: a bug).
        self.gap = False


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
    """Check one group's values (see the module doc); raise WireError naming the first defect."""
    for i, t in enumerate(group.trajectories):
        where = f"group {group.group_id!r} trajectory[{i}] ({t.trajectory_id!r})"
        n = len(t.response_tokens)
        if n == 0:
            raise WireError("empty_response", f"{where}: the response is empty (a trajectory needs at least one response token)")
        if not math.isfinite(t.reward):
            raise WireError("nonfinite_reward", f"{where}: reward {t.reward!r} is not a finite number")
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
