"""Trainer checkpoints (Megatron distributed checkpoints), resume, and the final HF export.

What:
- :func:`save_checkpoint` writes ``RUN_DIR/checkpoints/step-K/``: ``dist/`` is a
  ``megatron.core.dist_checkpointing`` checkpoint of the model's and the optimizer's
  ``sharded_state_dict`` (every rank writes its shards; TP/PP/DP layouts are recorded, so a
  checkpoint is not tied to one file per rank); ``rng/rank-R.pt`` holds each rank's RNG states
  (torch CPU, CUDA if any, numpy, python ``random``, Megatron's CUDA RNG tracker); ``meta.json``
  holds the step, the policy version, ``steps_done``, the learning-rate scheduler's state
  (``lr_scheduler``: its position; the schedule itself comes from the config on resume) and
  whatever the loop passes as ``extra`` (the data/broker position).  ``checkpoints/latest`` names the newest *complete* checkpoint; it is
  replaced atomically after every rank has finished writing.
- :func:`resolve_checkpoint` turns ``trainer.resume_from`` ("latest" or a path) into a directory;
  :func:`load_checkpoint` restores model, optimizer, RNG, step and policy version into a freshly
  built :class:`~consumers.trainer.TrainerRank` and returns ``meta``.
- :func:`export_hf_final` writes the trainer's weights as a Hugging Face checkpoint
  (safetensors shards of at most ``trainer.export_hf_shard_bytes`` with their index, through the
  bridge's ``export_hf_state`` and ``huggingface_hub.save_torch_state_dict``, plus the original
  checkpoint's config/tokenizer/generation files) on global rank 0.

Why a synchronous writer: megatron-core 0.16's default ``torch_dist`` save strategy writes through
``FileSystemWriterAsync``, which forks writer processes, starts a ``spawn`` multiprocessing Manager
and needs ``psutil``: fragile on CPU-only hosts (a fork after OpenMP threads can hang; see
docs/notes/tiny-task.md).  :class:`SyncTorchDistSaveStrategy` keeps Megatron's translation to
PyTorch Distributed Checkpoint (same on-disk format, loadable with Megatron's default load
strategy) but saves with ``torch.distributed.checkpoint``'s plain ``FileSystemWriter`` in-process.

How::

    path = save_checkpoint(rank, run_dir, step=10, extra={"lease_id": ...})
    meta = load_checkpoint(new_rank, resolve_checkpoint(run_dir, "latest"))

Tested in ``tests/test_checkpoint.py`` (resume reproduces the uninterrupted run's next step).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from consumers.config import SFTConfig, TrainerConfig

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
#: files copied from the source HF checkpoint into the exported one (if present)
HF_SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
    "added_tokens.json",
)


def _sync_save_strategy() -> Any:
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    class SyncTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
        """Megatron's torch_dist format, written synchronously in-process (see module docstring)."""

        def save(self, sharded_state_dict: Any, checkpoint_dir: Path) -> None:
            import torch.distributed.checkpoint as dcp

            sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            pyt = mcore_to_pyt_state_dict(sd, False)
            dcp.save(
                pyt,
                storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1),
                planner=MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False),
            )

    return SyncTorchDistSaveStrategy("torch_dist", 1)


def _model_module(rank: Any) -> Any:
    """The module inside Megatron's DDP wrapper (GPTModel or Float16Module): its state-dict keys
    are the ones ``load_state_dict`` expects."""
    return rank.model.module


def _sharded(rank: Any, is_loading: bool) -> dict[str, Any]:
    msd = _model_module(rank).sharded_state_dict()
    osd = rank.optimizer.sharded_state_dict(msd, is_loading=is_loading)
    return {"model": msd, "optimizer": osd}


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, CUDA, numpy, python, Megatron's CUDA RNG tracker)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "megatron_tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    get_cuda_rng_tracker().set_states(state["megatron_tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(rank: Any, run_dir: str | Path, step: int, extra: dict[str, Any] | None = None) -> Path:
    """Save ``RUN_DIR/checkpoints/step-<step>`` (collective over all trainer ranks); returns its path."""
    from megatron.core import dist_checkpointing

    t0 = time.perf_counter()
    root = Path(run_dir) / CHECKPOINT_DIR
    path = root / f"step-{step}"
    gr = dist.get_rank()
    if gr == 0:
        if path.exists():
            shutil.rmtree(path)
        (path / "dist").mkdir(parents=True)
        (path / "rng").mkdir()
    dist.barrier()
    dist_checkpointing.save(_sharded(rank, is_loading=False), str(path / "dist"), sharded_strategy=_sync_save_strategy())
    torch.save(rng_state(), path / "rng" / f"rank-{gr}.pt")
    dist.barrier()
    if gr == 0:
        meta = {
            "step": step,
            "policy_version": rank.policy_version,
            "steps_done": rank.steps_done,
            "world_size": dist.get_world_size(),
            "tensor_parallel": rank.cfg.tensor_parallel,
            "pipeline_parallel": rank.cfg.pipeline_parallel,
            "rng": "rng/rank-<global rank>.pt (torch, numpy, python, megatron_tracker[, cuda])",
            **({"lr_scheduler": rank.scheduler.state_dict()} if getattr(rank, "scheduler", None) is not None else {}),
            "saved_at": time.time(),
            **(extra or {}),
        }
        (path / "meta.json").write_text(json.dumps(meta, indent=1))
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(path.name)
        os.replace(tmp, root / LATEST)
    dist.barrier()
    log.info("saved checkpoint step %d (policy version %d) to %s in %.2fs", step, rank.policy_version, path, time.perf_counter() - t0)
    return path


def resolve_checkpoint(run_dir: str | Path, resume_from: str) -> Path | None:
    """``''`` -> None; ``'latest'`` -> the directory named by ``RUN_DIR/checkpoints/latest`` (None if
    there is none yet); anything else is a checkpoint directory (must contain ``meta.json``)."""
    if not resume_from:
        return None
    if resume_from == LATEST:
        marker = Path(run_dir) / CHECKPOINT_DIR / LATEST
        if not marker.exists():
            log.warning("resume_from='latest' but %s does not exist: starting fresh", marker)
            return None
        return marker.parent / marker.read_text().strip()
    path = Path(resume_from)
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"trainer.resume_from={resume_from!r}: no meta.json in {path}")
    return path


def load_checkpoint(rank: Any, path: str | Path) -> dict[str, Any]:
    """Restore model, optimizer, RNG, ``steps_done`` and ``policy_version`` from ``path`` into a
    freshly built ``rank`` (collective); returns ``meta``."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("world_size") != dist.get_world_size():
        log.warning("checkpoint saved with world size %s, resuming with %d", meta.get("world_size"), dist.get_world_size())
    state = dist_checkpointing.load(_sharded(rank, is_loading=True), str(path / "dist"))
    _model_module(rank).load_state_dict(state["model"])
    rank.optimizer.load_state_dict(state["optimizer"])
    rng_file = path / "rng" / f"rank-{dist.get_rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning("no RNG state for rank %d in %s", dist.get_rank(), path)
    rank.steps_done = int(meta["steps_done"])
    rank.policy_version = int(meta["policy_version"])
    if "lr_scheduler" in meta and getattr(rank, "scheduler", None) is not None:
        rank.scheduler.load_state_dict(meta["lr_scheduler"])  # the position; lr values from the config
    log.info("resumed from %s: step %d, policy version %d", path, meta["step"], rank.policy_version)
    return meta


def export_hf_final(rank: Any, hf_src: str | Path, out_dir: str | Path, max_shard_bytes: int = 5 * 10**9) -> Path | None:
    """Write the current weights as a HF checkpoint to ``out_dir`` (collective; files on global
    rank 0, which returns the path; other ranks return None).  Shards of at most
    ``max_shard_bytes`` with ``model.safetensors.index.json`` (``huggingface_hub.save_torch_state_dict``,
    the layout ``from_pretrained`` reads); a model that fits is one ``model.safetensors``."""
    from huggingface_hub import save_torch_state_dict

    named = rank.export_hf_state()
    if dist.get_rank() != 0:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:  # an earlier export's shards
        old.unlink(missing_ok=True)
    save_torch_state_dict({k: v.detach().contiguous().cpu() for k, v in named.items()}, out, max_shard_size=max_shard_bytes,
                          metadata={"format": "pt"})
    src = Path(hf_src)
    for name in HF_SIDE_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    log.info("exported final HF checkpoint (%d tensors) to %s", len(named), out)
    return out


def prepare_start(
    rank: Any, trainer: TrainerConfig, sft: SFTConfig, model_path: str, max_staleness: int, run_dir: str | Path
) -> tuple[int, int]:
    """Before the RL loop (collective): resume from ``trainer.resume_from`` if it names a
    checkpoint, else run the ``[sft]`` stage if configured.  Returns ``(last completed step,
    policy version)``: ``(0, 0)`` for a fresh run, ``(0, max_staleness + 1)`` after SFT (so
    rollouts sampled with the pre-SFT weights exceed the staleness bound ``queue.max_staleness``),
    the checkpoint's values on resume.  The caller publishes the weights to the engines when the version is > 0.

    Data position: the step is the queue position.  The trainer's hello carries it, and the broker
    replays the batches it retained for the steps after it (committed by the trainer that died,
    see ``consumers/loop.py``) before any new data, so the resumed run trains what the dead one did."""
    path = resolve_checkpoint(run_dir, trainer.resume_from)
    if path is not None:
        meta = load_checkpoint(rank, path)
        return int(meta["step"]), int(meta["policy_version"])
    if sft.steps > 0:
        from consumers.sft import run_sft

        run_sft(rank, sft, model_path, run_dir)
        # Producers may already have sampled with the pre-SFT weights (version 0) while SFT ran.
        # Jump past the staleness bound so that all of that data is too stale to train on (the
        # broker drops or requeues it per queue.stale_policy): RL sees post-SFT samples only.
        rank.policy_version = max_staleness + 1
        return 0, rank.policy_version
    return 0, 0


def maybe_checkpoint(rank: Any, trainer: TrainerConfig, run_dir: str | Path, step: int,
                     extra: dict[str, Any] | None = None) -> Path | None:
    """Save when ``trainer.checkpoint_every`` divides ``step`` (collective); returns the path if it saved."""
    every = trainer.checkpoint_every
    if every and step % every == 0:
        return save_checkpoint(rank, run_dir, step, extra)
    return None


def finish_run(rank: Any, trainer: TrainerConfig, model_path: str, run_dir: str | Path, last_step: int,
               interrupted: bool = False) -> Path | None:
    """At exit (collective): a final checkpoint if checkpointing is on and ``last_step`` was not
    saved yet (its ``meta.json`` says ``"at_exit": true``), and the ``hf-final`` export of
    ``model_path``'s architecture (``trainer.export_hf_at_end``; not when ``interrupted``:
    SIGINT/SIGTERM stopped the run before its last step, and the resumed run exports at its end).
    Returns the checkpoint written now."""
    every = trainer.checkpoint_every
    saved = None
    if every and last_step > 0 and last_step % every:
        saved = save_checkpoint(rank, run_dir, last_step, {"at_exit": True, "interrupted": interrupted})
    elif every and last_step > 0:
        log.info("checkpoint at exit: step %d was saved already (trainer.checkpoint_every = %d)", last_step, every)
    if trainer.export_hf_at_end and not interrupted:
        export_hf_final(rank, model_path, Path(run_dir) / "hf-final", trainer.export_hf_shard_bytes)
    return saved
