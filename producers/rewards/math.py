"""Numeric-answer verifier reward with ``\\boxed{}`` extraction.

    [producer]
    reward = "producers.rewards.math:reward"          # strict: the answer must be in \\boxed{}
    # or, to fall back to the last number in the response:
    reward = "producers.rewards.math:make_reward"
    reward_args = { fallback_last_number = true, rel_tol = 1e-6 }

The label (``Prompt.label``) and the extracted answer are parsed as numbers: integers, decimals,
``1,234``, ``-3``, ``3/4``, ``\\frac{3}{4}``, ``\\dfrac``, ``50\\%`` (as 50), ``$…$`` and ``\\text{…}``
wrappers are understood.  Reward 1.0 when they agree within ``rel_tol`` (or exactly, for two
integers), else 0.0 — also when either side does not parse.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from fractions import Fraction

from producers.plugins import Sample

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        m = re.match(r"\\boxed\s+(\S+)", text[start:])  # "\boxed 5"
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced


def _clean(s: str) -> str:
    s = s.strip().strip("$").strip()
    while s.startswith("{") and s.endswith("}"):
        s = s[1:-1].strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = re.sub(r"\\[!,;: ]", "", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"\\d?frac\{([^{}]+)\}\{([^{}]+)\}", r"(\1)/(\2)", s)
    return s.replace(" ", "").rstrip(".")


def parse_number(s: str | None) -> Fraction | float | None:
    """A number from an answer string (exact Fraction when possible), or None."""
    if s is None:
        return None
    s = _clean(s)
    m = re.fullmatch(r"\(?(-?[\d.,]+)\)?/\(?(-?[\d.,]+)\)?", s)
    try:
        if m:
            den = Fraction(m.group(2).replace(",", ""))
            return None if den == 0 else Fraction(m.group(1).replace(",", "")) / den
        if re.fullmatch(r"-?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?|-?\.\d+", s):
            return Fraction(s.replace(",", ""))
        f = float(s)  # 1e-3, inf ...
        return f if math.isfinite(f) else None
    except (ValueError, ZeroDivisionError):
        return None


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def numbers_equal(a: Fraction | float, b: Fraction | float, rel_tol: float = 1e-6) -> bool:
    if isinstance(a, Fraction) and isinstance(b, Fraction) and a.denominator == 1 and b.denominator == 1:
        return a == b
    return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=1e-12)


def verify(response: str, label: str, fallback_last_number: bool = False, rel_tol: float = 1e-6) -> float:
    """1.0 if the response's answer equals the label numerically, else 0.0."""
    gold = parse_number(label)
    if gold is None:
        return 0.0
    raw = extract_boxed(response)
    if raw is None and fallback_last_number:
        raw = last_number(response)
    pred = parse_number(raw)
    return 1.0 if pred is not None and numbers_equal(pred, gold, rel_tol) else 0.0


def make_reward(fallback_last_number: bool = False, rel_tol: float = 1e-6) -> Callable[[Sample], float]:
    def reward(sample: Sample) -> float:
        return verify(sample.response_text, sample.prompt.label, fallback_last_number, rel_tol)

    return reward


reward = make_reward()
