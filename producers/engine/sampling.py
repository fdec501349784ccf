"""Sampling parameters of the embedded engine and validation of ``/generate`` bodies.

What: :class:`SamplingParams` (the subset of SGLang's ``sampling_params`` the engine honours),
:func:`parse_sampling_params` and :func:`parse_generate_request` (validation of a ``/generate``
body; errors are :class:`RequestError` naming the JSON field, which the server turns into HTTP
400).  The sampler that uses these parameters is ``sampler.py``.

Why these choices:
- The returned log-prob is that of the sampled token under ``softmax(logits / temperature)``,
  *before* top-k/top-p/min-p truncation.  This matches SGLang's default, and it is what a trainer
  recomputes from its own logits with the same temperature; the truncation only changes which
  tokens can be drawn.  Greedy (``temperature < 1e-6``, as in SGLang) returns ``log_softmax(logits)``
  of the argmax token.
- Each sequence owns a ``torch.Generator`` and draws exactly one uniform number per sampled
  token, then inverts the CDF of the (truncated) distribution in a stable order (``sampler.py``).  The same ``sampling_seed``
  therefore gives the same tokens regardless of what else is in the batch (up to float ties).
- Parameters that would change the sampling distribution in ways this engine does not implement
  (penalties, string stops, grammars, n > 1, ...) are rejected with a clear 400 instead of being
  silently ignored; text-only options (``skip_special_tokens`` ...) are accepted and ignored.

Run: imported by ``producers.engine.sampler``, ``decode`` and ``server``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GREEDY_EPS = 1e-6

# Accepted, have no effect here (they only shape detokenized text, which this engine does not produce).
_IGNORED = {"skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "stream_interval"}
# Accepted only at their neutral value.
_NEUTRAL: dict[str, Any] = {
    "n": 1,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "stop": None,
    "stop_regex": None,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "logit_bias": None,
    "custom_params": None,
}
_SUPPORTED = {
    "temperature", "top_p", "top_k", "min_p", "max_new_tokens", "stop_token_ids", "ignore_eos", "sampling_seed",
}


class RequestError(ValueError):
    """A bad request field; ``field`` is its JSON path (``sampling_params.top_p``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_new_tokens: int = 128
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    sampling_seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


def _number(raw: dict[str, Any], key: str, field: str, default: float, lo: float, hi: float,
            lo_open: bool = False) -> float:
    v = raw.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or v != v:
        raise RequestError(f"{field}.{key}", f"expected a number, got {v!r}")
    if v < lo or v > hi or (lo_open and v == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise RequestError(f"{field}.{key}", f"must be in {bound}, got {v!r}")
    return float(v)


def _integer(v: Any, field: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(field, f"expected an integer, got {v!r}")
    return v


def parse_sampling_params(raw: Any, field: str, *, vocab_size: int, max_new_tokens_cap: int,
                          default_max_new_tokens: int) -> SamplingParams:
    """Validate one ``sampling_params`` object (``None`` means all defaults)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RequestError(field, f"expected an object, got {type(raw).__name__}")
    for key, value in raw.items():
        if key in _SUPPORTED or key in _IGNORED:
            continue
        if key in _NEUTRAL:
            neutral = _NEUTRAL[key]
            if value is None or value == neutral or (key == "stop" and value in ("", [])):
                continue
            raise RequestError(f"{field}.{key}", f"is not supported by the embedded engine (only {neutral!r})")
        raise RequestError(f"{field}.{key}", "unknown sampling parameter")
    temperature = _number(raw, "temperature", field, 1.0, 0.0, 1e6)
    top_p = _number(raw, "top_p", field, 1.0, 0.0, 1.0, lo_open=True)
    min_p = _number(raw, "min_p", field, 0.0, 0.0, 1.0)
    top_k = -1 if raw.get("top_k") is None else _integer(raw["top_k"], f"{field}.top_k")
    if top_k != -1 and top_k < 1:
        raise RequestError(f"{field}.top_k", f"must be -1 (disabled) or >= 1, got {top_k}")
    mnt = raw.get("max_new_tokens")
    max_new = default_max_new_tokens if mnt is None else _integer(mnt, f"{field}.max_new_tokens")
    if not 0 <= max_new <= max_new_tokens_cap:
        raise RequestError(f"{field}.max_new_tokens", f"must be in [0, {max_new_tokens_cap}], got {max_new}")
    stops = raw.get("stop_token_ids") or []
    if not isinstance(stops, list):
        raise RequestError(f"{field}.stop_token_ids", f"expected a list of token ids, got {stops!r}")
    for i, tok in enumerate(stops):
        if _integer(tok, f"{field}.stop_token_ids[{i}]") < 0 or tok >= vocab_size:
            raise RequestError(f"{field}.stop_token_ids[{i}]", f"token id {tok} outside [0, {vocab_size})")
    ignore_eos = raw.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise RequestError(f"{field}.ignore_eos", f"expected true/false, got {ignore_eos!r}")
    seed = raw.get("sampling_seed")
    if seed is not None and not 0 <= _integer(seed, f"{field}.sampling_seed") < 2**63:
        raise RequestError(f"{field}.sampling_seed", "must be a non-negative 63-bit integer")
    return SamplingParams(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, max_new_tokens=max_new,
        stop_token_ids=frozenset(stops), ignore_eos=ignore_eos, sampling_seed=seed,
    )


@dataclass(frozen=True)
class GenerateInput:
    """One validated input of a /generate call (rid None: the server assigns one)."""

    rid: str | None
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool


def parse_generate_request(body: dict[str, Any], *, vocab_size: int, context_len: int, max_new_tokens_cap: int,
                           default_max_new_tokens: int, context_name: str = "") -> tuple[list[GenerateInput], bool]:
    """Validate a /generate body (single or batch). Returns the inputs and whether it was a batch.
    ``context_name`` says what limits prompt + max_new_tokens to ``context_len`` (in the 400)."""
    context_name = context_name or f"the model's context length {context_len}"
    if body.get("stream"):
        raise RequestError("stream", "streaming is not supported by the embedded engine")
    for key, neutral in (("logprob_start_len", -1), ("top_logprobs_num", 0), ("token_ids_logprob", None)):
        if body.get(key) not in (None, neutral):
            raise RequestError(key, "is not supported by the embedded engine (it returns output_token_logprobs only)")
    if body.get("input_ids") is None:
        hint = " (this engine does not tokenize text)" if body.get("text") is not None else ""
        raise RequestError("input_ids", f"is required{hint}")
    ids = body["input_ids"]
    if not isinstance(ids, list) or not ids:
        raise RequestError("input_ids", "expected a non-empty list of token ids or of token-id lists")
    batch = isinstance(ids[0], list)
    prompts = ids if batch else [ids]
    n = len(prompts)
    for i, prompt in enumerate(prompts):
        where = f"input_ids[{i}]" if batch else "input_ids"
        if not isinstance(prompt, list) or not prompt:
            raise RequestError(where, "expected a non-empty list of token ids")
        for j, tok in enumerate(prompt):
            if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < vocab_size:
                raise RequestError(f"{where}[{j}]", f"token id {tok!r} is not an integer in [0, {vocab_size})")

    def per_item(key: str, default: Any) -> list[Any]:
        value = body.get(key, default)
        if batch and isinstance(value, list):
            if len(value) != n:
                raise RequestError(key, f"has {len(value)} entries for {n} inputs")
            return value
        return [value] * n

    sp_raw = per_item("sampling_params", None)
    lp_raw = per_item("return_logprob", False)
    rid_raw = body.get("rid")
    if batch and rid_raw is not None and not isinstance(rid_raw, list):
        raise RequestError("rid", "must be a list with one rid per input for a batch")
    rids = per_item("rid", None)
    out: list[GenerateInput] = []
    for i in range(n):
        sfx = f"[{i}]" if batch else ""
        params = parse_sampling_params(sp_raw[i], f"sampling_params{sfx}", vocab_size=vocab_size,
                                       max_new_tokens_cap=max_new_tokens_cap,
                                       default_max_new_tokens=default_max_new_tokens)
        if len(prompts[i]) + params.max_new_tokens > context_len:
            raise RequestError(
                f"sampling_params{sfx}.max_new_tokens",
                f"prompt ({len(prompts[i])} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                f"{context_name}",
            )
        if not isinstance(lp_raw[i], bool):
            raise RequestError(f"return_logprob{sfx}", f"expected true/false, got {lp_raw[i]!r}")
        if rids[i] is not None and (not isinstance(rids[i], str) or not rids[i]):
            raise RequestError(f"rid{sfx}", f"expected a non-empty string, got {rids[i]!r}")
        out.append(GenerateInput(rids[i], list(prompts[i]), params, lp_raw[i]))
    return out, batch
