"""Typed config plumbing shared by every component's config dataclass.

Each component (queue, producer, engine, trainer, ...) owns one small dataclass whose fields carry
a doc string (``field(metadata={"doc": ...})``) and whose ``__post_init__`` validates values with
:func:`check`.  This module turns nested dicts (TOML + ``--set`` overrides) into those dataclasses
and reports *one* clear :class:`ConfigError` that names the offending dotted key.

Why not pydantic: the dataclasses stay importable everywhere (trainer ranks, tests) with no extra
dependency, and the error messages are ours.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import tomllib
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A bad config value. ``key`` is the dotted path (``queue.max_staleness``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config error at '{key}': {message}")
        self.key = key
        self.message = message

    def prefixed(self, prefix: str) -> ConfigError:
        key = f"{prefix}.{self.key}" if prefix else self.key
        return ConfigError(key, self.message)


def doc(text: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a doc string (shown by ``slipstream config --help`` and the README)."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"doc": text})
    return dataclasses.field(default=default, metadata={"doc": text})


def check(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError(key, message) unless condition holds. Used in ``__post_init__``."""
    if not condition:
        raise ConfigError(key, message)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; allow int -> float. Returns the coerced value."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e.message)
        raise ConfigError(key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(key, f"must be one of {list(allowed)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {value!r}")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {type(value).__name__} {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


def migrate_deprecated(data: dict[str, Any], moves: Mapping[str, str], prefix: str = "") -> dict[str, Any]:
    """``data`` with every deprecated key of ``moves`` (old dotted key -> new dotted key, relative
    to ``data``) moved to its new place, logging a warning that names the new key.  Setting both
    to different values is a ConfigError at the old key.  ``data`` itself is not changed."""
    out = data
    for old, new in moves.items():
        *old_parents, old_leaf = old.split(".")
        node: Any = data
        for part in old_parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or old_leaf not in node:
            continue
        if out is data:
            out = copy.deepcopy(data)
        holder = out
        for part in old_parents:
            holder = holder[part]
        value = holder.pop(old_leaf)
        *new_parents, new_leaf = new.split(".")
        target = out
        for part in new_parents:
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{prefix}{part}", "is a value, not a table")
            target = child
        if new_leaf in target and target[new_leaf] != value:
            raise ConfigError(f"{prefix}{old}", f"is deprecated and moved to '{prefix}{new}'; both are set, to different "
                              f"values ({value!r} and {target[new_leaf]!r}): keep only '{prefix}{new}'")
        target[new_leaf] = value
        log.warning("config key '%s%s' is deprecated: use '%s%s' (read as that this time)", prefix, old, prefix, new)
    return out


def fill_shared(data: dict[str, Any], shared: Mapping[str, str]) -> dict[str, Any]:
    """``data`` with each follower key of ``shared`` (follower dotted key -> home dotted key) that
    is not set given the home's value, where the home is set.  A follower set to a value of its own
    stays (the composing dataclass's ``__post_init__`` reports a mismatch).  ``data`` is not changed."""
    out = data
    for follower, home in shared.items():
        node: Any = data
        for part in home.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is _ABSENT:
            continue
        *parents, leaf = follower.split(".")
        holder: Any = data
        for part in parents:
            holder = holder.get(part, {}) if isinstance(holder, dict) else None
        if not isinstance(holder, dict) or leaf in holder:
            continue  # set (or not a table: from_dict reports that)
        if out is data:
            out = copy.deepcopy(data)
        target = out
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = node
    return out


_ABSENT = object()


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys, wrong types and failed checks raise
    ConfigError with the full dotted key.  Keys ``cls`` lists in a ``DEPRECATED_KEYS`` class
    attribute (old dotted key -> new one) are moved first (:func:`migrate_deprecated`), then the
    followers of its ``SHARED_KEYS`` take their home's value (:func:`fill_shared`)."""
    moves = getattr(cls, "DEPRECATED_KEYS", None)
    if moves:
        data = migrate_deprecated(data, moves, f"{prefix}." if prefix else "")
    shared = getattr(cls, "SHARED_KEYS", None)
    if shared:
        data = fill_shared(data, shared)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(typing.cast(Any, cls))}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(key, f"unknown key{hint}; known keys: {', '.join(sorted(fields))}")
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.prefixed(prefix) from None


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict (for the resolved config written to the run directory)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=VALUE`` -> (["a","b","c"], value). VALUE is a TOML literal, else a bare string."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(key or text, "empty key in override")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(path[: i + 1]), "is a value, not a table; cannot set a key inside it")
        node = child
    node[path[-1]] = value


def field_docs(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, doc) for every field, recursing into nested dataclasses."""
    rows: list[tuple[str, str, Any, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(field_docs(tp, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        rows.append((key, _type_name(tp), default, f.metadata.get("doc", "")))
    return rows
