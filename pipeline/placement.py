"""Placement: which GPU each process of a one-machine run gets, decided before anything starts.

What: :class:`PlacementConfig` (the ``[placement]`` section), :func:`detect_gpus` (how many GPUs
this machine has, without importing CUDA into the launcher) and :func:`make_plan`, which turns the
config and the GPUs into a :class:`Plan`: the GPUs of every trainer rank and every embedded engine,
the weight transport each engine is expected to get, its memory budget, and the environment each
child is started with (``CUDA_VISIBLE_DEVICES``, ``PYTORCH_CUDA_ALLOC_CONF``).

Why: the launcher starts every role as its own process; a process sees only the GPUs its
``CUDA_VISIBLE_DEVICES`` names, so placement is one environment variable per child, and the
trainer (one rank, or torchrun's ranks: local rank ``r`` uses ``cuda:r``, i.e. the ``r``-th GPU
listed) and the engines need no placement code of their own.  The defaults:

* no GPU: everything on the CPU (children see no GPU);
* 1 GPU: *colocated*: the trainer (one rank: NCCL refuses two ranks of a group on one device) and
  every engine share GPU 0; weights then go by CUDA IPC, not a broadcast (DESIGN §8);
* N >= 2 GPUs: *disaggregated*: trainer ranks on GPUs 0..R-1, engines on GPUs R..N-1, round robin
  (when the trainer takes every GPU, engines share the trainer's GPUs, round robin).

The broker and the producers get no GPU.  Every child keeps the launcher's environment
(``NCCL_*``, ``TORCH_*`` settings such as ``NCCL_NVLS_ENABLE=0`` included); the allocator option
``placement.alloc_conf`` (expandable segments: a trainer and an engine sharing a GPU do not strand
each other's memory in fragments) is added only where the user set no allocator options.

GPU detection (``placement.gpus = -1``): ``CUDA_VISIBLE_DEVICES`` if the launcher's environment
sets it, else ``nvidia-smi --query-gpu`` (names and memory too), else no GPU when there is no
``/dev/nvidia*`` device, else ``torch.cuda.device_count()`` in a subprocess (the launcher itself
never initialises CUDA).  ``placement.gpus = N`` skips detection (CPU tests plan for 0-8 GPUs so).

    slipstream run examples/gpu/one_gpu.toml --dry-run         # prints the plan, starts nothing
    plan = make_plan(cfg, detect_gpus(os.environ)); plan.env_for("engine-0")
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.configbase import ConfigError, check, doc

if TYPE_CHECKING:
    from pipeline.config import SlipstreamConfig

log = logging.getLogger(__name__)

ALLOC_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # torch reads either; the user's wins
DETECT_TIMEOUT_S = 60.0


@dataclass
class PlacementConfig:
    gpus: int = doc(
        "GPUs the launcher places processes on: -1 = detect (CUDA_VISIBLE_DEVICES, else nvidia-smi, else torch in a "
        "subprocess); 0 = none (every process on the CPU; children see no GPU); N = assume N GPUs (the first N of "
        "CUDA_VISIBLE_DEVICES when it is set, else 0..N-1), without detection.",
        -1,
    )
    trainer_devices: list[int] = doc(
        "GPU of each trainer rank (local rank r runs on trainer_devices[r]): one distinct GPU per rank "
        "(TP x PP x DP of them). [] = GPUs 0..ranks-1.",
        default_factory=list,
    )
    engine_devices: list[int] = doc(
        "GPU of each embedded engine (producer.num_engines entries; engines may share a GPU, with each other or "
        "with a trainer rank). [] = with 1 GPU every engine on it, beside the trainer (colocated); with more, the "
        "GPUs after the trainer's, round robin (disaggregated), or the trainer's own when it takes them all.",
        default_factory=list,
    )
    alloc_conf: str = doc(
        "PYTORCH_CUDA_ALLOC_CONF given to every child when GPUs are used, unless the environment already sets "
        "PYTORCH_CUDA_ALLOC_CONF or PYTORCH_ALLOC_CONF. Expandable segments let a trainer and an engine share a "
        "GPU without stranding memory in fragments. '' = set nothing.",
        "expandable_segments:True",
    )

    def __post_init__(self) -> None:
        check(self.gpus >= -1, "gpus", f"must be -1 (detect), 0 (CPU only) or a GPU count, got {self.gpus}")
        for key, devs in (("trainer_devices", self.trainer_devices), ("engine_devices", self.engine_devices)):
            for i, d in enumerate(devs):
                check(d >= 0, f"{key}[{i}]", f"must be a GPU index >= 0, got {d}")
        seen: dict[int, int] = {}
        for r, d in enumerate(self.trainer_devices):
            check(d not in seen, f"trainer_devices[{r}]",
                  f"GPU {d} is already trainer rank {seen.get(d)}'s: NCCL refuses two ranks of one group on one GPU")
            seen[d] = r


@dataclass(frozen=True)
class Gpu:
    """One GPU the run may use. ``index`` is what the config names (0..N-1); ``visible_id`` is what
    goes into a child's ``CUDA_VISIBLE_DEVICES`` (a physical index or a UUID)."""

    index: int
    visible_id: str
    name: str = ""
    memory_bytes: int | None = None


@dataclass
class Detected:
    gpus: list[Gpu]
    source: str  # how they were found, for the plan and the log


Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def _nvidia_smi(run: Runner) -> list[tuple[Gpu, str]] | None:
    """Every GPU nvidia-smi lists, with its UUID, or None when it cannot tell."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        r = run(["nvidia-smi", "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=DETECT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("nvidia-smi failed (%s): trying torch", e)
        return None
    if r.returncode != 0:
        log.warning("nvidia-smi exited with %d (%s): trying torch", r.returncode, r.stderr.strip()[:200])
        return None
    out = []
    for line in r.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4 and parts[0].isdigit():
            mib = int(parts[3]) if parts[3].isdigit() else None
            out.append((Gpu(int(parts[0]), parts[0], parts[2], None if mib is None else mib * 2**20), parts[1]))
    return out


def _torch_count(run: Runner) -> int:
    code = "import torch; print(torch.cuda.device_count())"
    try:
        r = run([sys.executable, "-c", code], capture_output=True, text=True, timeout=DETECT_TIMEOUT_S)
        return int(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else 0
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as e:
        log.warning("could not count GPUs with torch in a subprocess (%s): planning for none", e)
        return 0


def detect_gpus(env: Mapping[str, str], run: Runner = subprocess.run, dev: Path = Path("/dev")) -> Detected:
    """The GPUs this launcher may place processes on (see the module docstring for the order)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",")]
        ids = ids[: next((i for i, v in enumerate(ids) if not v or v.startswith("-")), len(ids))]  # CUDA stops at -1
        if not ids:
            return Detected([], f"CUDA_VISIBLE_DEVICES={visible!r}")
        smi = _nvidia_smi(run) or []
        gpus = []
        for i, v in enumerate(ids):  # an entry is a physical index or a (prefix of a) UUID
            known = next((g for g, uuid in smi if v == g.visible_id or (v.startswith("GPU-") and uuid.startswith(v))), None)
            gpus.append(Gpu(i, v, known.name if known else "", known.memory_bytes if known else None))
        return Detected(gpus, f"CUDA_VISIBLE_DEVICES={visible}")
    smi = _nvidia_smi(run)
    if smi is not None:
        return Detected([Gpu(i, g.visible_id, g.name, g.memory_bytes) for i, (g, _) in enumerate(smi)], "nvidia-smi")
    if not any(dev.glob("nvidia[0-9]*")):
        return Detected([], f"no nvidia-smi and no {dev}/nvidia* device")
    n = _torch_count(run)
    return Detected([Gpu(i, str(i)) for i in range(n)], "torch.cuda.device_count() in a subprocess")


def assumed_gpus(n: int, env: Mapping[str, str]) -> Detected:
    """``placement.gpus = n``: n GPUs without detection (the first n of CUDA_VISIBLE_DEVICES if set)."""
    visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    ids = visible[:n] if len(visible) >= n else [str(i) for i in range(n)]
    return Detected([Gpu(i, v) for i, v in enumerate(ids)], f"placement.gpus = {n}")


# ---------------------------------------------------------------------------------------- plan
@dataclass
class EnginePlacement:
    name: str
    gpu: int | None  # None: CPU
    transport: str  # the weight transport the trainer is expected to pick for it
    budget: str  # its memory budget, in words
    budget_bytes: int | None = None
    shares_with: list[str] = field(default_factory=list)  # other processes on its GPU
    mem_fraction: float = 0.0  # the engine.mem_fraction it is started with (resolved when auto)


@dataclass
class Plan:
    """Where every process runs. ``trainer`` lists the GPU of each trainer rank ([] on CPU)."""

    gpus: list[Gpu]
    source: str
    mode: str  # cpu | colocated | disaggregated | mixed
    ranks: int  # trainer ranks (TP x PP x DP)
    trainer: list[int]
    publishers: list[int]  # trainer ranks that broadcast weights (rank 0, or each PP stage's leader)
    engines: list[EnginePlacement]
    alloc_conf: str  # what children get for PYTORCH_CUDA_ALLOC_CONF ('' = nothing set by us)
    notes: list[str] = field(default_factory=list)

    def visible(self, gpus: list[int]) -> str:
        return ",".join(self.gpus[g].visible_id for g in gpus)

    def gpus_of(self, name: str) -> list[int]:
        if name == "trainer":
            return list(self.trainer)
        eng = next((e for e in self.engines if e.name == name), None)
        return [eng.gpu] if eng is not None and eng.gpu is not None else []

    def placement_env(self, name: str, base: Mapping[str, str]) -> dict[str, str]:
        """This process's placement variables (to put over ``base``, the launcher's environment)."""
        env = {"CUDA_VISIBLE_DEVICES": self.visible(self.gpus_of(name))}
        if self.alloc_conf and self.gpus and not any(k in base for k in ALLOC_ENV):
            env["PYTORCH_CUDA_ALLOC_CONF"] = self.alloc_conf
        return env

    def env_for(self, name: str, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` (the launcher's environment) plus this process's placement variables."""
        return {**base, **self.placement_env(name, base)}

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "source": self.source,
            "gpus": [{"index": g.index, "visible_id": g.visible_id, "name": g.name, "memory_bytes": g.memory_bytes} for g in self.gpus],
            "trainer": {"ranks": self.ranks, "gpus": self.trainer, "publishing_ranks": self.publishers},
            "engines": [{"name": e.name, "gpu": e.gpu, "weight_transport": e.transport, "memory_budget": e.budget,
                         "memory_budget_bytes": e.budget_bytes, "shares_gpu_with": e.shares_with} for e in self.engines],
            "alloc_conf": self.alloc_conf, "notes": self.notes,
        }

    def format(self) -> str:
        """The plan as a short table (``slipstream run --dry-run`` prints it)."""
        def where(gpus: list[int]) -> str:
            return "cpu" if not gpus else ", ".join(f"GPU {g}" + (f" ({self.gpus[g].visible_id})" if self.gpus[g].visible_id != str(g) else "") for g in gpus)

        head = f"placement: {self.mode} ({len(self.gpus)} GPU{'s' if len(self.gpus) != 1 else ''}: {self.source})"
        ranks = f"{self.ranks} rank{'s' if self.ranks != 1 else ''}, publishing: {', '.join(map(str, self.publishers))}"
        rows = [("trainer", where(self.trainer) if self.trainer else "cpu", ranks, "")]
        rows += [(e.name, where([e.gpu] if e.gpu is not None else []), f"weights by {e.transport}", f"memory {e.budget}") for e in self.engines]
        rows += [("broker, producers", "cpu", "", "")]
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [head, *("  " + "  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows)]
        if self.gpus:
            lines.append(f"  PYTORCH_CUDA_ALLOC_CONF: {self.alloc_conf or '(not set by slipstream)'}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def trainer_ranks(cfg: SlipstreamConfig) -> int:
    t = cfg.trainer
    return t.tensor_parallel * t.pipeline_parallel * t.data_parallel


def publishing_ranks(cfg: SlipstreamConfig) -> list[int]:
    """Trainer ranks that broadcast weights: rank 0, or with per-stage publishing the leader of each
    PP stage (TP rank 0 of DP replica 0: rank ``k * TP * DP`` in Megatron's tp-dp-pp rank order)."""
    t = cfg.trainer
    if t.pipeline_parallel > 1 and cfg.weights.per_stage_publish:
        return [k * t.tensor_parallel * t.data_parallel for k in range(t.pipeline_parallel)]
    return [0]


# engine.mem_fraction = 0 (auto): what each engine may hold, split evenly between the engines of
# one device.  A GPU of its own: 0.85 (SGLang's --mem-fraction-static is of that order); a GPU it
# shares with a trainer rank: 0.3 (the trainer keeps 0.7: on one H200 the 0.6B trainer peaked at
# 29 GiB, the engine at 17.6 GiB of its 42 GiB, bench/results/2026-12-02-e2e-1xh200.json); the
# CPU: 0.5 of host RAM (the trainer shares it).
AUTO_FRACTION_ALONE, AUTO_FRACTION_WITH_TRAINER, AUTO_FRACTION_CPU = 0.85, 0.3, 0.5


def engine_fraction(configured: float, gpu: int | None, engines_here: int, trainer_here: bool) -> tuple[float, bool]:
    """The engine.mem_fraction an engine gets: the configured one, or (0 = auto) the default for
    its device split between the ``engines_here`` engines on it; and whether it was auto."""
    if configured > 0:
        return configured, False
    base = AUTO_FRACTION_CPU if gpu is None else AUTO_FRACTION_WITH_TRAINER if trainer_here else AUTO_FRACTION_ALONE
    return round(base / max(engines_here, 1), 4), True


def engine_budget(engine_cfg: Any, gpu: Gpu | None, frac: float, auto: bool = False) -> tuple[str, int | None]:
    """An engine's memory budget in words (and bytes where known): ``frac`` of its device, and
    engine.max_total_tokens when set."""
    tokens = getattr(engine_cfg, "max_total_tokens", None)
    parts: list[str] = []
    nbytes = None
    how = " (auto)" if auto else ""
    if frac > 0:
        if gpu is not None and gpu.memory_bytes:
            nbytes = int(frac * gpu.memory_bytes)
            parts.append(f"engine.mem_fraction {frac:g}{how} of {gpu.memory_bytes / 2**30:.0f} GiB = {nbytes / 2**30:.1f} GiB")
        else:
            parts.append(f"engine.mem_fraction {frac:g}{how} of the {'device' if gpu is not None else 'host memory'}")
    if isinstance(tokens, int) and tokens > 0:
        parts.append(f"KV cache of engine.max_total_tokens {tokens}")
    if not parts:
        return "unbounded (no engine memory budget is set)", None
    return "; ".join(parts), nbytes


def _default_engines(n_engines: int, trainer: list[int], n_gpus: int) -> list[int | None]:
    if n_gpus == 0:
        return [None] * n_engines
    free = [g for g in range(n_gpus) if g not in trainer]
    pool = free or trainer or list(range(n_gpus))
    return [pool[i % len(pool)] for i in range(n_engines)]


def weight_backend(cfg: SlipstreamConfig, cuda: bool) -> tuple[str, str]:
    """(the weight group's backend with 'auto' resolved, the key that sets it): ``weights.backend``,
    or ``trainer.weight_backend`` in builds from before it moved."""
    if hasattr(cfg.weights, "resolved_backend"):
        return cfg.weights.resolved_backend(cuda), "weights.backend"
    return cfg.trainer.resolved_weight_backend(cuda), "trainer.weight_backend"


def _transport(cfg: SlipstreamConfig, gpu: int | None, publisher_gpus: list[int], on_gpu: bool) -> str:
    setting = getattr(cfg.weights, "transport", None)  # weights.transport: auto | broadcast | ipc
    backend, key = weight_backend(cfg, on_gpu)
    if setting == "ipc":
        return "ipc"
    colocated = gpu is not None and gpu in publisher_gpus
    if colocated and setting in (None, "broadcast") and backend == "nccl":
        reason = ("weights.transport = 'broadcast'" if setting == "broadcast" else "this build has no weights.transport (CUDA IPC)")
        raise ConfigError(
            key,
            f"an engine shares GPU {gpu} with a publishing trainer rank, and {reason}: an NCCL broadcast cannot reach a "
            f"process on the sender's own GPU (NCCL refuses two ranks on one device). Use weights.transport = 'ipc' "
            f"(or 'auto'), {key} = 'gloo' (through host memory), or placement.engine_devices on another GPU",
        )
    if colocated and setting in ("auto", None):
        return "ipc"
    return f"broadcast ({backend})"


def make_plan(cfg: SlipstreamConfig, detected: Detected, env: Mapping[str, str] | None = None) -> Plan:
    """The placement of every process, or a ConfigError naming the key to change. ``env``: the
    launcher's environment (allocator options set there win over ``placement.alloc_conf``)."""
    env = os.environ if env is None else env
    p = cfg.placement
    gpus, n = detected.gpus, len(detected.gpus)
    ranks = trainer_ranks(cfg)
    t = cfg.trainer
    shape = f"TP x PP x DP = {t.tensor_parallel} x {t.pipeline_parallel} x {t.data_parallel}"
    embedded = cfg.producer.engine == "embedded" and getattr(cfg.run, "mode", "") != "train_only"
    n_engines = cfg.producer.num_engines if embedded else 0
    where = f"{n} GPU{'s are' if n != 1 else ' is'} visible ({detected.source})"
    for key, devs in (("trainer_devices", p.trainer_devices), ("engine_devices", p.engine_devices)):
        for i, d in enumerate(devs):
            if d >= n:
                raise ConfigError(f"placement.{key}[{i}]", f"GPU {d} does not exist: {where}" + (f", indices 0..{n - 1}" if n else ""))
    if p.trainer_devices:
        if len(p.trainer_devices) != ranks:
            raise ConfigError("placement.trainer_devices",
                              f"has {len(p.trainer_devices)} entr{'y' if len(p.trainer_devices) == 1 else 'ies'} but the trainer has {ranks} rank(s) ({shape}): one GPU per rank")
        trainer = list(p.trainer_devices)
    elif n == 0:
        trainer = []
    elif ranks > n:
        raise ConfigError("placement.trainer_devices",
                          f"the trainer has {ranks} ranks ({shape}) but {where}: each rank needs a GPU of its own "
                          "(NCCL refuses two ranks of one group on one GPU); use fewer ranks or more GPUs")
    else:
        trainer = list(range(ranks))
    if p.engine_devices:
        if not embedded:
            raise ConfigError("placement.engine_devices", "places embedded engines, but producer.engine = 'attach' starts none")
        if len(p.engine_devices) != n_engines:
            raise ConfigError("placement.engine_devices", f"has {len(p.engine_devices)} entries but producer.num_engines = {n_engines}: one GPU per engine")
        engine_gpus: list[int | None] = list(p.engine_devices)
    else:
        engine_gpus = _default_engines(n_engines, trainer, n)
    if getattr(cfg.engine, "device", "auto") == "cpu":
        engine_gpus = [None] * n_engines  # engine.device = 'cpu': engines ignore any GPU
    on_gpu = bool(trainer)
    backend, backend_key = weight_backend(cfg, True)
    if on_gpu and n_engines and any(g is None for g in engine_gpus) and backend == "nccl":
        raise ConfigError(backend_key, "engines run on the CPU (engine.device = 'cpu') but the trainer is on GPUs and "
                          f"would publish over NCCL, which needs a GPU on both ends: set {backend_key} = 'gloo'")
    pubs = publishing_ranks(cfg)
    publisher_gpus = [trainer[r] for r in pubs if r < len(trainer)]
    engines = []
    for i, g in enumerate(engine_gpus):
        frac, auto = engine_fraction(float(getattr(cfg.engine, "mem_fraction", 0.0) or 0.0), g, engine_gpus.count(g), g in trainer)
        budget, nbytes = engine_budget(cfg.engine, gpus[g] if g is not None else None, frac, auto)
        try:
            transport = _transport(cfg, g, publisher_gpus, on_gpu) if n_engines else ""
        except ConfigError as e:
            raise ConfigError(e.key, f"engine-{i}: {e.message}") from None
        share = [f"trainer rank {r}" for r, tg in enumerate(trainer) if tg == g] + [f"engine-{j}" for j, eg in enumerate(engine_gpus) if eg == g and j != i and g is not None]
        engines.append(EnginePlacement(f"engine-{i}", g, transport, budget, nbytes, share, mem_fraction=frac))
    _check_budgets(engines)
    notes = []
    other = _other_engines(cfg, publisher_gpus, notes) if n else []  # SGLang servers: placed by producer.sglang_gpu_ids
    engine_gpus = [*engine_gpus, *other]
    if not engine_gpus:
        mode = "cpu" if not on_gpu else "no engines"
    elif not on_gpu and not any(g is not None for g in engine_gpus):
        mode = "cpu"
    elif all(g in trainer for g in engine_gpus):
        mode = "colocated"
    elif not any(g in trainer for g in engine_gpus):
        mode = "disaggregated"
    else:
        mode = "mixed"
    if n > len(set(trainer) | {g for g in engine_gpus if g is not None}) and n:
        unused = sorted(set(range(n)) - set(trainer) - {g for g in engine_gpus if g is not None})
        notes.append(f"GPU(s) {unused} unused (raise producer.num_engines, or the trainer's parallelism)")
    notes += _memory_notes(trainer, engines)
    user_alloc = [f"{k}={env[k]}" for k in ALLOC_ENV if k in env]
    alloc = "" if user_alloc else p.alloc_conf
    if user_alloc and gpus:
        notes.append(f"allocator options come from the environment ({', '.join(user_alloc)})")
    return Plan(gpus, detected.source, mode, ranks, trainer, pubs, engines, alloc, notes)


def _other_engines(cfg: SlipstreamConfig, publisher_gpus: list[int], notes: list[str]) -> list[int]:
    """GPUs of the SGLang servers slipstream launches (``producer.engine = "sglang"``), which
    producers.sglang_launch places by ``producer.sglang_gpu_ids``; one on a publishing trainer rank's
    GPU could not get an NCCL broadcast."""
    if cfg.producer.engine != "sglang" or getattr(cfg.run, "mode", "") == "train_only":
        return []
    from producers.sglang_launch import gpu_slices, gpus_per_server

    p = cfg.producer
    slices = gpu_slices(p.num_engines, gpus_per_server(p.sglang, p.sglang_gpus_per_server), list(p.sglang_gpu_ids))
    notes.append(f"engines: {p.num_engines} SGLang server(s) on GPUs {slices} (producer.sglang_gpu_ids, not [placement])")
    clash = sorted({g for sl in slices for g in sl} & set(publisher_gpus))
    if clash:
        need = sum(len(sl) for sl in slices)
        free = [g for g in range(max(publisher_gpus) + 1 + need) if g not in publisher_gpus][:need]
        raise ConfigError("producer.sglang_gpu_ids", f"SGLang servers would run on GPU(s) {clash}, the publishing trainer rank's: "
                          f"NCCL cannot broadcast to a process on the sender's own GPU. Give the servers other GPUs "
                          f"(e.g. producer.sglang_gpu_ids = {free}), or the trainer others (placement.trainer_devices)")
    return [g for sl in slices for g in sl]


def _check_budgets(engines: list[EnginePlacement]) -> None:
    """Engines that share a GPU must fit it together (by their mem_fraction)."""
    per_gpu: dict[int, list[float]] = {}
    for e in engines:
        if e.gpu is not None:
            per_gpu.setdefault(e.gpu, []).append(e.mem_fraction)
    for g, fracs in per_gpu.items():
        if sum(fracs) > 1.0:
            raise ConfigError("engine.mem_fraction", f"{len(fracs)} engines share GPU {g}, and {len(fracs)} x {fracs[0]:g} of its memory "
                              "is more than all of it: lower engine.mem_fraction (0 = auto splits the GPU between them) "
                              "or spread them with placement.engine_devices")


def _memory_notes(trainer: list[int], engines: list[EnginePlacement]) -> list[str]:
    """How a GPU shared by engines and a trainer rank is split (engines take their mem_fraction)."""
    out = []
    for g in sorted({e.gpu for e in engines if e.gpu is not None and e.gpu in trainer}):
        fracs = [e.mem_fraction for e in engines if e.gpu == g]
        out.append(f"GPU {g}: {len(fracs)} engine(s) may hold {sum(fracs):.2f} of its memory (engine.mem_fraction {fracs[0]:g} each); "
                   f"trainer rank {trainer.index(g)} there gets the rest ({1 - sum(fracs):.2f})")
    return out


def plan_for(cfg: SlipstreamConfig, env: Mapping[str, str] | None = None) -> Plan:
    """Detect (or assume, ``placement.gpus >= 0``) the GPUs and place every process."""
    env = os.environ if env is None else env
    n = cfg.placement.gpus
    detected = detect_gpus(env) if n < 0 else assumed_gpus(n, env) if n > 0 else Detected([], "placement.gpus = 0")
    return make_plan(cfg, detected, env)
