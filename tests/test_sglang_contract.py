"""Contract test: every SGLang route and field slipstream uses exists in sglang 0.5.23's source.

SGLang cannot be installed or imported here (it needs the CUDA stack), so the test downloads the
wheel once (``pip download --no-deps sglang==0.5.23``, cached in ``~/.cache/slipstream-sglang-wheel``
or ``$SLIPSTREAM_SGLANG_WHEEL_DIR``), opens it as a zip and reads the source with ``ast``:

* routes (``sglang/srt/entrypoints/http_server.py``): every route in ``producers.sglang_client.ROUTES``
  and ``schemas.weight_update.ROUTES`` (the weight-update contract) exists with the method slipstream uses, and its handler takes
  the request dataclass slipstream's body is checked against;
* request bodies (``sglang/srt/managers/io_struct.py``): the bodies are built by the same functions
  the client and publisher use (``generate_body``, ``bucket_payload``, ...); every key must be a
  field of the dataclass (``BaseReq`` fields included), every required field must be sent, and
  each value must fit the field's annotation (str/int/bool/float/list/dict/Optional/Union/Literal);
  ``sampling_params`` keys are checked against ``SamplingParams``;
* responses: the ``meta_info`` keys ``parse_generation`` reads are assigned in SGLang's output
  code, and ``/get_model_info`` returns ``weight_version``;
* the weight-update session: sglang 0.5.23 refuses ``/update_weights_from_distributed`` and
  ``/update_weights_from_tensor`` outside ``/begin_weight_update`` .. ``/end_weight_update``, and
  the SGLang driver opens and closes one around every update;
* the colocated hand-over (``/update_weights_from_tensor``, ``load_format="flattened_bucket"``):
  the payload slipstream builds (:func:`consumers.ipc.sglang_serialized_bucket`) uses only globals
  SGLang's ``SafeUnpickler`` allows (parsed from the wheel), has the keys and metadata attributes
  ``_update_weights_from_flattened_bucket`` reads, and is unpickled by SGLang's own
  ``SafeUnpickler`` class (its source from the wheel, executed here) back into the same tensors.

The negative tests feed the checkers deliberately wrong names, methods and values, so a checker
that accepts everything fails here.

    /work/venv/bin/pytest tests/test_sglang_contract.py -q
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from producers import sglang_client as client
from producers.rollout import SamplingParams
from schemas import weight_update as pub

SGLANG_VERSION = "0.5.23"
HTTP_SERVER = "sglang/srt/entrypoints/http_server.py"
IO_STRUCT = "sglang/srt/managers/io_struct.py"
SAMPLING = "sglang/srt/sampling/sampling_params.py"
OUTPUT_CODE = ("sglang/srt/managers/", "sglang/srt/utils/weight_versions.py")
COMMON = "sglang/srt/utils/common.py"
SCHEDULER_WEIGHTS = "sglang/srt/managers/scheduler_components/weight_updater.py"
RUNNER_WEIGHTS = "sglang/srt/model_executor/model_runner_components/weight_updater.py"


# ---------------------------------------------------------------------------------------- wheel
def _wheel_dir() -> Path:
    return Path(os.environ.get("SLIPSTREAM_SGLANG_WHEEL_DIR", Path.home() / ".cache" / "slipstream-sglang-wheel"))


@pytest.fixture(scope="module")
def wheel() -> zipfile.ZipFile:
    d = _wheel_dir()
    found = sorted(d.glob(f"sglang-{SGLANG_VERSION}-*.whl"))
    if not found:
        d.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"sglang=={SGLANG_VERSION}", "-d", str(d), "-q"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"cannot download the sglang {SGLANG_VERSION} wheel ({' '.join(cmd)}): {e}")
        found = sorted(d.glob(f"sglang-{SGLANG_VERSION}-*.whl"))
        if r.returncode != 0 or not found:
            pytest.skip(f"cannot download the sglang {SGLANG_VERSION} wheel ({' '.join(cmd)}): {r.stderr.strip()[-500:]}")
    return zipfile.ZipFile(found[-1])


def _source(wheel: zipfile.ZipFile, path: str) -> str:
    return wheel.read(path).decode()


# ------------------------------------------------------------------------------------- parsing
def parse_routes(src: str) -> dict[str, dict[str, Any]]:
    """``route -> {"methods": {...}, "body": dataclass name or None, "params": [arg names]}`` from
    FastAPI decorators (``@app.get/post/put/api_route``)."""
    routes: dict[str, dict[str, Any]] = {}
    for node in ast.walk(ast.parse(src)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for dec in node.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.args
                    and isinstance(dec.args[0], ast.Constant) and isinstance(dec.args[0].value, str)):
                continue
            kind = dec.func.attr
            if kind == "api_route":
                methods = {e.value for k in dec.keywords if k.arg == "methods" for e in k.value.elts}  # type: ignore[attr-defined]
            elif kind in ("get", "post", "put", "delete"):
                methods = {kind.upper()}
            else:
                continue
            body = None
            for a in node.args.args:
                for name in ast.walk(a.annotation) if a.annotation else ():
                    if isinstance(name, ast.Name) and name.id.endswith("ReqInput"):
                        body = name.id
            entry = routes.setdefault(dec.args[0].value, {"methods": set(), "body": None, "params": []})
            entry["methods"] |= methods
            entry["body"] = entry["body"] or body
            entry["params"] = [a.arg for a in node.args.args]
    return routes


class Field:
    def __init__(self, annotation: ast.expr | None, has_default: bool) -> None:
        self.annotation = annotation
        self.has_default = has_default

    def __repr__(self) -> str:
        return f"Field({ast.unparse(self.annotation) if self.annotation else '?'}, default={self.has_default})"


def parse_structs(src: str) -> dict[str, dict[str, Field]]:
    """Class name -> its annotated fields (inherited ones from classes in the same module first)."""
    classes = {n.name: n for n in ast.parse(src).body if isinstance(n, ast.ClassDef)}
    out: dict[str, dict[str, Field]] = {}

    def fields(name: str) -> dict[str, Field]:
        if name in out:
            return out[name]
        node = classes[name]
        f: dict[str, Field] = {}
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                f.update(fields(base.id))
        for st in node.body:
            if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                f[st.target.id] = Field(st.annotation, st.value is not None)
        out[name] = f
        return f

    for name in classes:
        fields(name)
    return out


SIMPLE = {"str": str, "int": int, "float": (int, float), "bool": bool, "dict": dict, "list": list}


def value_fits(ann: ast.expr | None, value: Any) -> bool:
    """Best effort: does a JSON value fit a typing annotation?  Unknown names are accepted."""
    if ann is None:
        return True
    if isinstance(ann, ast.Constant) and ann.value is None:
        return value is None
    if isinstance(ann, ast.Name | ast.Attribute):
        name = ann.id if isinstance(ann, ast.Name) else ann.attr
        if name == "Any":
            return True
        if name in SIMPLE:
            if name in ("int", "float") and isinstance(value, bool):
                return False
            return isinstance(value, SIMPLE[name])
        if name in ("List", "Dict", "Set"):
            return isinstance(value, list if name != "Dict" else dict)
        return True  # a type alias or class we do not model
    if isinstance(ann, ast.BinOp) and isinstance(ann.op, ast.BitOr):
        return value_fits(ann.left, value) or value_fits(ann.right, value)
    if isinstance(ann, ast.Subscript):
        head = ast.unparse(ann.value).split(".")[-1]
        args = list(ann.slice.elts) if isinstance(ann.slice, ast.Tuple) else [ann.slice]
        if head == "Optional":
            return value is None or value_fits(args[0], value)
        if head == "Union":
            return any(value_fits(a, value) for a in args)
        if head == "Literal":
            return any(isinstance(a, ast.Constant) and a.value == value for a in args)
        if head == "Annotated":
            return value_fits(args[0], value)
        if head in ("List", "list", "Set", "set"):
            return isinstance(value, list) and all(value_fits(args[0], v) for v in value)
        if head in ("Dict", "dict"):
            return isinstance(value, dict) and all(value_fits(args[1], v) for v in value.values())
        return True
    return True


def check_body(structs: dict[str, dict[str, Field]], struct: str, body: dict[str, Any]) -> list[str]:
    """Problems of ``body`` against dataclass ``struct`` (empty list: compatible)."""
    if struct not in structs:
        return [f"{struct} does not exist in {IO_STRUCT}"]
    fields = structs[struct]
    problems = [f"{struct} has no field {k!r}" for k in body if k not in fields]
    problems += [f"{struct}.{k} is required but not sent" for k, f in fields.items() if not f.has_default and k not in body]
    for k, v in body.items():
        if k in fields and not value_fits(fields[k].annotation, v):
            problems.append(f"{struct}.{k}: {v!r} does not fit {ast.unparse(fields[k].annotation)}")  # type: ignore[arg-type]
    return problems


def check_routes(routes: dict[str, dict[str, Any]], used: dict[str, tuple[str, str | None]]) -> list[str]:
    problems = []
    for route, (method, struct) in used.items():
        if route not in routes:
            problems.append(f"route {route} does not exist in {HTTP_SERVER}")
            continue
        if method not in routes[route]["methods"]:
            problems.append(f"route {route} does not accept {method} (only {sorted(routes[route]['methods'])})")
        if struct is not None and routes[route]["body"] != struct:
            problems.append(f"route {route} takes {routes[route]['body']}, not {struct}")
    return problems


def meta_info_keys(wheel: zipfile.ZipFile) -> set[str]:
    """Keys SGLang's output code puts into ``meta_info`` dicts (dict literals and item assignments)."""
    keys: set[str] = set()
    for path in wheel.namelist():
        if not (path.endswith(".py") and path.startswith(OUTPUT_CODE)):
            continue
        tree = ast.parse(_source(wheel, path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name) and t.id == "meta_info" and isinstance(node.value, ast.Dict):
                        keys |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
                    if (isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id == "meta_info"
                            and isinstance(t.slice, ast.Constant)):
                        keys.add(t.slice.value)
    return keys


# ---------------------------------------------------------------------- what slipstream sends
def _sent_bodies() -> list[tuple[str, str, dict[str, Any]]]:
    """(route, dataclass, body) for every request body slipstream builds, from its own builders."""
    t = {"a.weight": torch.zeros(2, 3), "b.bias": torch.zeros(3, dtype=torch.bfloat16)}
    sp = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=8, stop_token_ids=[2, 3]).to_sglang()
    bodies = [
        (client.ROUTE_GENERATE, client.generate_body([[1, 2, 3], [4, 5]], sp)),
        (pub.ROUTE_INIT_GROUP, pub.init_group_payload("127.0.0.1", 29500, 1, 2, "weight_update_group", "nccl")),
        (pub.ROUTE_UPDATE, pub.bucket_payload(t, "weight_update_group", None)),
        (pub.ROUTE_UPDATE, pub.bucket_payload(t, "weight_update_group", 7, flush_cache=True)),
        (pub.ROUTE_DESTROY_GROUP, pub.destroy_payload("weight_update_group")),
        (pub.ROUTE_CONTINUE, pub.continue_payload()),
        *[(pub.ROUTE_PAUSE, pub.pause_payload(m)) for m in ("in_place", "retract", "abort")],
        (pub.ROUTE_BEGIN_UPDATE, pub.begin_update_payload()),
        (pub.ROUTE_END_UPDATE, pub.end_update_payload()),
        (pub.ROUTE_UPDATE_TENSOR, pub.tensor_update_payload(_serialized(), 5, flush_cache=False)),
    ]
    routes = {**client.ROUTES, **pub.ROUTES}
    out = []
    for route, body in bodies:
        struct = routes[route][1]
        assert struct is not None, route
        out.append((route, struct, body))
    return out


def _flat_example() -> tuple[torch.Tensor, list[str], list[torch.dtype], list[list[int]], list[int], dict[str, torch.Tensor]]:
    """A snapshot-like flat buffer with a bf16 and a float32 tensor (the latter padded to 4 bytes)."""
    from consumers.snapshot import WeightSnapshot

    named = {"a.weight": torch.arange(6, dtype=torch.bfloat16).view(2, 3), "b.bias": torch.tensor([1.5, -2.0, 3.25])}
    flat = WeightSnapshot().take(named)
    assert flat.buffer is not None and flat.offsets is not None
    return (flat.buffer, list(flat), [t.dtype for t in flat.values()], [list(t.shape) for t in flat.values()],
            [flat.offsets[n] for n in flat], named)


def _serialized(tp: int = 1) -> list[str]:
    from consumers.ipc import sglang_serialized_bucket

    buf, names, dtypes, shapes, offsets, _ = _flat_example()
    return sglang_serialized_bucket(buf, names, dtypes, shapes, offsets, tp)


# ------------------------------------------------------------------------------------- tests
def test_every_route_exists_with_its_method_and_body(wheel: zipfile.ZipFile) -> None:
    routes = parse_routes(_source(wheel, HTTP_SERVER))
    assert len(routes) > 30, "the route parser found too few routes: the source layout changed"
    used = {**client.ROUTES, **pub.ROUTES}
    assert check_routes(routes, used) == []
    # /flush_cache takes no body, only the optional query parameter 'timeout'
    assert routes[pub.ROUTE_FLUSH]["params"] == ["timeout"]


def test_profiling_routes_and_body_exist(wheel: zipfile.ZipFile) -> None:
    """run.profile_steps asks every engine, SGLang servers included, to profile over these routes."""
    from pipeline import profiling

    server = _source(wheel, HTTP_SERVER)
    assert check_routes(parse_routes(server), profiling.ROUTES) == []
    # the handler's body is Annotated[Optional[ProfileReq], Body()], which the route parser leaves as None
    handler = next(n for n in ast.walk(ast.parse(server)) if isinstance(n, ast.AsyncFunctionDef) and n.name == "start_profile_async")
    assert "ProfileReq]" in ast.unparse(handler.args)
    structs = parse_structs(_source(wheel, IO_STRUCT))
    assert check_body(structs, "ProfileReq", profiling.start_body("/tmp/profile", "engine-0")) == []
    assert check_body(structs, "ProfileReq", {"profile_prefx": "x"}) != []  # the checker does refuse a wrong name
    # the fields the embedded engine's parse_request reads are SGLang's
    assert {"output_dir", "num_steps", "start_step", "activities", "record_shapes", "with_stack", "profile_by_stage", "merge_profiles",
            "profile_prefix"} <= set(structs["ProfileReq"])


def test_every_request_field_exists_with_a_compatible_type(wheel: zipfile.ZipFile) -> None:
    structs = parse_structs(_source(wheel, IO_STRUCT))
    problems = [f"{route}: {p}" for route, struct, body in _sent_bodies() for p in check_body(structs, struct, body)]
    assert problems == []
    # the defaults slipstream relies on when it leaves a field out
    upd = structs["UpdateWeightsFromDistributedReqInput"]
    assert {"load_format", "weight_version", "flush_cache", "abort_all_requests"} <= set(upd)


def test_sampling_params_exist(wheel: zipfile.ZipFile) -> None:
    structs = parse_structs(_source(wheel, SAMPLING))
    sp = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=8, stop_token_ids=[2, 3]).to_sglang()
    problems = [p for p in check_body(structs, "SamplingParams", sp) if "has no field" in p or "does not fit" in p]
    assert problems == []


def test_response_fields_are_produced(wheel: zipfile.ZipFile) -> None:
    keys = meta_info_keys(wheel)
    assert {"finish_reason", "prompt_tokens", "completion_tokens"} <= keys, "the meta_info scan found too little"
    assert set(client.META_FIELDS) - keys == set()
    assert client.SPANS_META_FIELD in keys  # per-span token versions (sglang/srt/utils/weight_versions.py)
    spans_src = _source(wheel, "sglang/srt/utils/weight_versions.py")
    span_cls = parse_structs(spans_src)["WeightVersionSpan"]
    assert set(span_cls) == {"version", "start", "end"}, "parse_generation reads exactly these span fields"
    # slipstream's extension is not SGLang's: real SGLang gets the conservative per-response version
    assert set(client.EXTENSION_META_FIELDS) & keys == set()
    src = _source(wheel, HTTP_SERVER)
    tree = ast.parse(src)
    info_fn = next(n for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef) and n.name == "model_info")
    info_keys = {k.value for n in ast.walk(info_fn) if isinstance(n, ast.Dict) for k in n.keys if isinstance(k, ast.Constant)}
    assert set(pub.MODEL_INFO_FIELDS) <= info_keys


def handler_replies(src: str) -> dict[str, dict[str, Any]]:
    """route -> {"dicts": [{key: constant value or None}], "text": returns a plain Response}: what
    each handler puts into its reply (dict literals in the handler body)."""
    out: dict[str, dict[str, Any]] = {}
    for node in ast.walk(ast.parse(src)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        routes = [d.args[0].value for d in node.decorator_list
                  if isinstance(d, ast.Call) and d.args and isinstance(d.args[0], ast.Constant) and isinstance(d.args[0].value, str)]
        dicts = [{k.value: (v.value if isinstance(v, ast.Constant) else None) for k, v in zip(n.keys, n.values, strict=True)
                  if isinstance(k, ast.Constant)} for n in ast.walk(node) if isinstance(n, ast.Dict)]
        text = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "Response" for n in ast.walk(node))
        for r in routes:
            out[r] = {"dicts": dicts, "text": text}
    return out


def check_reply_shapes(replies: dict[str, dict[str, Any]], routes: list[str], text_routes: tuple[str, ...]) -> list[str]:
    """Problems: a JSON route whose reply has no success marker the publisher accepts, or a
    plain-text route the publisher would parse as JSON."""
    problems = []
    for route in routes:
        r = replies[route]
        if route in text_routes:
            continue
        if r["text"] and not r["dicts"]:
            problems.append(f"{route} replies with plain text, but the publisher expects JSON")
            continue
        # {"success": success, ...} carries a runtime value the publisher checks; a dict without
        # "success" must carry a constant marker the publisher accepts ({"status": "ok"})
        if not any("success" in d or pub.reply_ok(d) for d in r["dicts"]):
            problems.append(f"{route}: no reply dict with a success marker the publisher accepts: {r['dicts']}")
    return problems


def test_reply_shapes_are_understood(wheel: zipfile.ZipFile) -> None:
    replies = handler_replies(_source(wheel, HTTP_SERVER))
    used = [r for r, (method, _) in pub.ROUTES.items() if method == "POST"]  # GET routes are information, not commands
    assert check_reply_shapes(replies, used, pub.TEXT_REPLY_ROUTES) == []
    # pause/continue answer {"status": "ok"} without "success": the publisher must accept that
    for route in (pub.ROUTE_PAUSE, pub.ROUTE_CONTINUE):
        (reply,) = [d for d in replies[route]["dicts"] if "status" in d]
        assert "success" not in reply and pub.reply_ok(reply), reply
    # /flush_cache answers plain text: it is a text route, and a JSON parser would choke on it
    assert replies[pub.ROUTE_FLUSH]["text"] and pub.ROUTE_FLUSH in pub.TEXT_REPLY_ROUTES
    # negative: without the "status" marker, pause's reply would be rejected
    assert not pub.reply_ok({"message": "Generation paused successfully."})
    assert check_reply_shapes(replies, [pub.ROUTE_FLUSH], ()) != []


# -------------------------------------------------------------------------- negative checks
def test_checkers_report_wrong_names_methods_and_values(wheel: zipfile.ZipFile) -> None:
    structs = parse_structs(_source(wheel, IO_STRUCT))
    routes = parse_routes(_source(wheel, HTTP_SERVER))
    bad_body = {**pub.pause_payload("in_place"), "pause_mode_typo": "x"}
    assert check_body(structs, "PauseGenerationReqInput", bad_body) == ["PauseGenerationReqInput has no field 'pause_mode_typo'"]
    assert "PauseGenerationReqInput.mode: 'freeze' does not fit" in check_body(
        structs, "PauseGenerationReqInput", pub.pause_payload("freeze"))[0]
    init = pub.init_group_payload("127.0.0.1", 29500, 1, 2, "g", "gloo")
    del init["world_size"]
    assert check_body(structs, "InitWeightsUpdateGroupReqInput", init) == [
        "InitWeightsUpdateGroupReqInput.world_size is required but not sent"]
    init = pub.init_group_payload("127.0.0.1", "29500", 1, 2, "g", "gloo")  # type: ignore[arg-type]
    assert check_body(structs, "InitWeightsUpdateGroupReqInput", init)[0].startswith("InitWeightsUpdateGroupReqInput.master_port")
    upd = pub.bucket_payload({"w": torch.zeros(1)}, "g", 3)
    upd["weight_version"] = 3  # an int where SGLang wants Optional[str]
    assert check_body(structs, "UpdateWeightsFromDistributedReqInput", upd)[0].startswith(
        "UpdateWeightsFromDistributedReqInput.weight_version")
    assert check_body(structs, "NoSuchReqInput", {}) == [f"NoSuchReqInput does not exist in {IO_STRUCT}"]
    assert check_routes(routes, {"/update_weights_from_distributed": ("GET", None)}) != []
    assert check_routes(routes, {"/pause_generation_typo": ("POST", None)}) != []
    assert check_routes(routes, {pub.ROUTE_PAUSE: ("POST", "ContinueGenerationReqInput")}) != []
    assert "output_token_logprobs_typo" not in meta_info_keys(wheel)


def test_parse_generation_uses_sglang_weight_version_spans() -> None:
    lp = [[-0.5, 7, None], [-0.1, 8, None], [-0.2, 9, None], [-0.3, 10, None]]
    spans = [{"version": "3", "start": 0, "end": 1}, {"version": "4", "start": 1, "end": 4}]
    g = client.parse_generation({"meta_info": {"output_token_logprobs": lp, "weight_version": "4", "weight_versions": spans,
                                               "finish_reason": {"type": "length"}}}, version_at_submit=3)
    assert g.versions == [3, 4, 4, 4] and g.weight_version == 4 and g.finish_reason == "length"
    # without spans (or with spans that do not cover every token) every token gets the older version
    for bad in (None, spans[:1], [{"version": "default", "start": 0, "end": 4}], [{"start": 0, "end": 4}]):
        g = client.parse_generation({"meta_info": {"output_token_logprobs": lp, "weight_version": "4", "weight_versions": bad,
                                                   "finish_reason": "stop"}}, version_at_submit=3)
        assert g.versions == [3, 3, 3, 3], bad


# ---------------------------------------------------------------------- weight-update sessions
def _function(tree: ast.AST, name: str) -> ast.FunctionDef:
    found = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name]
    assert found, f"{name} not found: the source layout changed"
    return found[0]


def _refuses_without_session(fn: ast.FunctionDef) -> bool:
    """``if self._session is None: return <failure>`` at the top of ``fn``."""
    for node in fn.body:
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and isinstance(node.test.left, ast.Attribute)
                and node.test.left.attr == "_session" and isinstance(node.test.ops[0], ast.Is)):
            return any(isinstance(b, ast.Return) for b in node.body)
    return False


class _RecordingCalls:
    """Stands in for consumers.engine_http.EngineCalls: records the routes the driver calls."""

    def __init__(self) -> None:
        self.routes: list[str] = []
        self.urls = ["http://engine"]

    def call_all(self, route: str, payload: object, what: str) -> list[dict]:
        self.routes.append(route)
        return [{"success": True}]


def test_updates_need_a_weight_update_session_and_the_driver_opens_one(wheel: zipfile.ZipFile) -> None:
    from consumers.engine_driver import EmbeddedDriver, SGLangDriver

    tree = ast.parse(_source(wheel, SCHEDULER_WEIGHTS))
    for name in ("update_weights_from_distributed", "update_weights_from_tensor"):
        assert _refuses_without_session(_function(tree, name)), f"sglang's {name} no longer needs a session?"
    assert not _refuses_without_session(_function(tree, "init_weights_update_group"))  # the checker can say no
    routes = parse_routes(_source(wheel, HTTP_SERVER))
    assert routes[pub.ROUTE_BEGIN_UPDATE]["body"] == "BeginWeightUpdateReqInput"
    calls = _RecordingCalls()
    driver = SGLangDriver("retract", flush_cache=True)
    driver.begin(calls, 3)  # type: ignore[arg-type]
    driver.end(calls, 3)  # type: ignore[arg-type]
    assert calls.routes == [pub.ROUTE_PAUSE, pub.ROUTE_BEGIN_UPDATE, pub.ROUTE_END_UPDATE, pub.ROUTE_FLUSH, pub.ROUTE_CONTINUE]
    calls.routes.clear()
    driver.abort(calls, 4)  # type: ignore[arg-type]
    assert calls.routes == [pub.ROUTE_END_UPDATE, pub.ROUTE_CONTINUE], "a failed update must close its session"
    calls.routes.clear()
    EmbeddedDriver().begin(calls, 5)  # type: ignore[arg-type]
    assert calls.routes == []


# ------------------------------------------------------------------- colocated hand-over (IPC)
def _allowed_globals(wheel: zipfile.ZipFile) -> set[tuple[str, str]]:
    tree = ast.parse(_source(wheel, COMMON))
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "SafeUnpickler")
    assign = next(n for n in cls.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "ALLOWED_GLOBALS")
    allowed = ast.literal_eval(assign.value)
    assert len(allowed) > 50 and ("torch", "Size") in allowed, "the ALLOWED_GLOBALS parser found too little"
    return set(allowed)


def _globals_of(payload: bytes) -> set[tuple[str, str]]:
    """Every global a pickle loads (each call of ``find_class``), recorded while unpickling it."""
    import io
    import pickle

    found: set[tuple[str, str]] = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            found.add((module, name))
            return super().find_class(module, name)

    Recording(io.BytesIO(payload)).load()
    return found


def _sglang_unpickler(wheel: zipfile.ZipFile) -> type:
    """SGLang's own SafeUnpickler class, its source taken from the wheel and executed here."""
    import io
    import pickle

    tree = ast.parse(_source(wheel, COMMON))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SafeUnpickler")
    namespace: dict = {"pickle": pickle, "io": io, "torch": torch,
                       "_safe_load_torch_storage": lambda data: pytest.fail("no nested torch.load expected")}
    exec(compile(ast.Module([cls], type_ignores=[]), COMMON, "exec"), namespace)
    return namespace["SafeUnpickler"]


def test_flattened_bucket_payload_is_what_sglang_unpickles(wheel: zipfile.ZipFile) -> None:
    import base64
    import io

    from consumers.ipc import _SGLangPickler

    # what _update_weights_from_flattened_bucket reads: two keys, six metadata attributes
    fn = _function(ast.parse(_source(wheel, RUNNER_WEIGHTS)), "_update_weights_from_flattened_bucket")
    keys = {n.slice.value for n in ast.walk(fn) if isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Constant)}
    attrs = {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "meta"}
    assert keys == {"flattened_tensor", "metadata"} and attrs == {"name", "shape", "dtype", "start_idx", "end_idx", "numel"}
    serialized = _serialized(tp=2)
    assert len(serialized) == 2, "one payload per TP rank (deserialize_own_rank indexes them by tp_rank)"
    raw = base64.b64decode(serialized[0], validate=True)  # pybase64.b64decode(..., validate=True) in SGLang
    allowed = _allowed_globals(wheel)
    used = _globals_of(base64.b64decode(serialized[1]))  # each payload can be loaded once (its fds travel once)
    assert ("types", "SimpleNamespace") in used and ("torch", "Size") in used, used
    assert used - allowed == set(), "the payload needs globals SGLang's SafeUnpickler refuses"
    # a CUDA tensor is rebuilt by torch's rebuild_cuda_tensor (patched by SGLang to take a GPU UUID)
    assert ("torch.multiprocessing.reductions", "rebuild_cuda_tensor") in allowed
    assert _SGLangPickler.reducer_override.__qualname__.startswith("_SGLangPickler")
    # round trip through SGLang's own unpickler: the same tensors come back, cut as SGLang cuts them
    payload = _sglang_unpickler(wheel)(io.BytesIO(raw)).load()
    assert set(payload) == keys
    _, names, _, _, _, named = _flat_example()
    flat = payload["flattened_tensor"]
    for meta, name in zip(payload["metadata"], names, strict=True):
        assert {a: getattr(meta, a) for a in attrs}.keys() == attrs and meta.name == name
        got = flat[meta.start_idx : meta.end_idx].view(meta.dtype).reshape(meta.shape)  # FlattenedTensorBucket.reconstruct_tensors
        assert torch.equal(got, named[name]) and got.dtype == named[name].dtype
    # negative: a global SGLang does not allow is caught by the check, and refused by SGLang's unpickler
    import pickle

    assert _globals_of(pickle.dumps(zipfile.ZipFile)) - allowed == {("zipfile", "ZipFile")}
    with pytest.raises(RuntimeError, match="Blocked unsafe global"):
        _sglang_unpickler(wheel)(io.BytesIO(pickle.dumps(zipfile.ZipFile))).load()
