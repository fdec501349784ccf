"""The command-line flags of SGLang's ``ServerArgs``, read from SGLang's source with ``ast``.

What: :func:`server_fields` maps each ``ServerArgs`` field to its flags and kind (``bool``: a
``store_true`` flag; ``list``: ``nargs``; ``value``: one value).  It reads the installed sglang's
source files without importing sglang (which needs the CUDA stack), or, when sglang is not
installed, the list recorded from sglang 0.5.23 in ``producers/sglang_server_args.json``
(regenerate it with ``python -m producers.sglang_args WHEEL_OR_SITE_PACKAGES_DIR``).

Why: ``producer.sglang`` keys (``--sglang-*`` flags) become ``--key value`` flags of the SGLang
servers slipstream launches.  A misspelt flag would only fail inside the server, after the run
started; checked against ``ServerArgs`` it is a config error naming the key.

How SGLang 0.5.x declares them: ``ServerArgs`` is assembled from ``msgspec.Struct`` namespaces in
``sglang/srt/arg_groups/fields/*.py``; each field is ``name: A[T, "help"] = default`` or
``A[T, Arg(help=..., aliases=[...], cli_name=..., no_cli=...)]`` and becomes ``--name-with-dashes``
(bool: ``store_true``; list: ``nargs='+'``); ``A[T, Derived(...)]`` fields are not flags.  A few
flags are added by hand in ``ServerArgs.add_cli_args`` (``server_args.py``); those are read from its
``parser.add_argument`` calls.  Older layouts (0.4.x: one ``@dataclass ServerArgs`` with plain
annotations) are read from the class body.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

RECORDED = Path(__file__).with_name("sglang_server_args.json")
FIELDS_DIR = "sglang/srt/arg_groups/fields/"
SERVER_ARGS = "sglang/srt/server_args.py"


def _kind(tp: ast.expr | None) -> str:
    """'bool', 'list' or 'value' for a field's type annotation (Optional[...] unwrapped)."""
    if tp is None:
        return "value"
    if isinstance(tp, ast.Name):
        return "bool" if tp.id == "bool" else "list" if tp.id in ("list", "List") else "value"
    if isinstance(tp, ast.Constant) and isinstance(tp.value, str):  # a string annotation
        try:
            return _kind(ast.parse(tp.value, mode="eval").body)
        except SyntaxError:
            return "value"
    if isinstance(tp, ast.Subscript):
        base = tp.value.id if isinstance(tp.value, ast.Name) else tp.value.attr if isinstance(tp.value, ast.Attribute) else ""
        if base in ("Optional",):
            return _kind(tp.slice)
        if base in ("list", "List"):
            return "list"
        return "value"
    if isinstance(tp, ast.BinOp) and isinstance(tp.op, ast.BitOr):  # bool | None
        kinds = {_kind(x) for x in (tp.left, tp.right) if not (isinstance(x, ast.Constant) and x.value is None)}
        return kinds.pop() if len(kinds) == 1 else "value"
    return "value"


def _action_kind(action: ast.expr | None, default: str) -> str:
    """'bool' for store_true/store_false actions (also custom ``...StoreTrueAction`` classes)."""
    if action is None:
        return default
    name = action.value if isinstance(action, ast.Constant) else action.id if isinstance(action, ast.Name) else getattr(action, "attr", "")
    flat = str(name).lower().replace("_", "")
    return "bool" if "storetrue" in flat or "storefalse" in flat else "value"


def _const_list(node: ast.expr | None) -> list[str]:
    if isinstance(node, ast.List | ast.Tuple):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


def _field(name: str, ann: ast.expr) -> dict[str, Any] | None:
    """The flags of one annotated field, or None when it is not a CLI flag."""
    if not (isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name) and ann.value.id in ("A", "Annotated")):
        return None  # no A[...] metadata: not registered automatically
    parts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
    tp, meta = parts[0], parts[1] if len(parts) > 1 else None
    cli_name, aliases, action = "", [], None
    if isinstance(meta, ast.Call):
        fn = meta.func.id if isinstance(meta.func, ast.Name) else getattr(meta.func, "attr", "")
        if fn != "Arg":
            return None  # Derived(...) and other metadata: not a CLI input
        kw = {k.arg: k.value for k in meta.keywords if k.arg}
        if isinstance(kw.get("no_cli"), ast.Constant) and kw["no_cli"].value is True:
            return None
        if isinstance(kw.get("cli_name"), ast.Constant):
            cli_name = str(kw["cli_name"].value)
        aliases = _const_list(kw.get("aliases"))
        action = kw.get("action")
    elif not (isinstance(meta, ast.Constant) and isinstance(meta.value, str)):
        return None
    kind = _action_kind(action, _kind(tp))  # a custom action: store_true-like, or one taking a value
    return {"flags": [cli_name or "--" + name.replace("_", "-"), *aliases], "kind": kind}


def _namespace_fields(src: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for node in ast.walk(ast.parse(src)):
        if not isinstance(node, ast.ClassDef):
            continue
        is_ns = any(isinstance(s, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_NS_PATH" for t in s.targets) for s in node.body)
        if not is_ns:
            continue
        for s in node.body:
            if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and (f := _field(s.target.id, s.annotation)):
                out[s.target.id] = f
    return out


def _manual_flags(src: str) -> dict[str, dict[str, Any]]:
    """``parser.add_argument("--x", ...)`` calls inside ``ServerArgs`` (hand-registered flags), and
    the plain annotated fields of an old-style ``@dataclass class ServerArgs``."""
    out: dict[str, dict[str, Any]] = {}
    for node in ast.walk(ast.parse(src)):
        if not (isinstance(node, ast.ClassDef) and node.name == "ServerArgs"):
            continue
        for s in node.body:
            if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and not s.target.id.startswith("_"):
                out.setdefault(s.target.id, {"flags": ["--" + s.target.id.replace("_", "-")], "kind": _kind(s.annotation)})
        for call in ast.walk(node):
            if not (isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "add_argument"):
                continue
            flags = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("--")]
            if not flags:
                continue
            kw = {k.arg: k.value for k in call.keywords if k.arg}
            kind = _action_kind(kw.get("action"), "list" if "nargs" in kw else "value")
            dest = kw["dest"].value if isinstance(kw.get("dest"), ast.Constant) else flags[0][2:].replace("-", "_")
            out[str(dest)] = {"flags": flags, "kind": kind}
    return out


def fields_from_sources(sources: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``{field: {"flags": [...], "kind": ...}}`` from ``{path inside the package: source text}``."""
    out: dict[str, dict[str, Any]] = {}
    for path, src in sorted(sources.items()):
        if path.startswith(FIELDS_DIR):
            out.update(_namespace_fields(src))
    if SERVER_ARGS in sources:
        for name, f in _manual_flags(sources[SERVER_ARGS]).items():
            out.setdefault(name, f)
    return dict(sorted(out.items()))


def sources_from_wheel(wheel: zipfile.ZipFile) -> dict[str, str]:
    return {n: wheel.read(n).decode() for n in wheel.namelist() if n.endswith(".py") and (n.startswith(FIELDS_DIR) or n == SERVER_ARGS)}


def sources_from_dir(site: Path) -> dict[str, str]:
    """From a directory holding the ``sglang`` package (site-packages)."""
    files = [*sorted((site / FIELDS_DIR).glob("*.py")), site / SERVER_ARGS]
    return {str(f.relative_to(site)): f.read_text() for f in files if f.exists()}


def installed_sglang_dir() -> Path | None:
    """The directory holding an installed ``sglang`` package (found without importing it)."""
    try:
        spec = importlib.util.find_spec("sglang")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).parent


def installed_version(site: Path) -> str:
    for meta in site.glob("sglang-*.dist-info/METADATA"):
        for line in meta.read_text(errors="replace").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def server_fields() -> tuple[dict[str, dict[str, Any]], str]:
    """(fields, where they came from): the installed sglang's source, else the recorded 0.5.23 list."""
    site = installed_sglang_dir()
    if site is not None:
        fields = fields_from_sources(sources_from_dir(site))
        if fields:
            return fields, f"the installed sglang {installed_version(site)} ({site / 'sglang'})"
    data = json.loads(RECORDED.read_text())
    return data["fields"], f"the ServerArgs fields recorded from sglang {data['sglang_version']} ({RECORDED.name}; sglang is not installed)"


def flag_index(fields: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Every spelling of every flag, as a config key (``mem_fraction_static``, ``tp``, ...) -> field name."""
    out: dict[str, str] = {}
    for name, f in fields.items():
        out.setdefault(name, name)
        for flag in f["flags"]:
            out.setdefault(flag.lstrip("-").replace("-", "_"), name)
    return out


def record(source: str, out: Path = RECORDED) -> Path:
    """Write the recorded list from a wheel file or a site-packages directory."""
    p = Path(source)
    if p.suffix == ".whl":
        with zipfile.ZipFile(p) as w:
            fields = fields_from_sources(sources_from_wheel(w))
        version = p.name.split("-")[1]
    else:
        fields = fields_from_sources(sources_from_dir(p))
        version = installed_version(p)
    out.write_text(json.dumps({"sglang_version": version, "source": f"{FIELDS_DIR}*.py + {SERVER_ARGS}", "fields": fields}, indent=1) + "\n")
    return out


if __name__ == "__main__":
    print(record(sys.argv[1]))
