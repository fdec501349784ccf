"""Qwen3-MoE specifics of the HF <-> Megatron bridge: expert layouts, expert parallelism, TP for MoE.

What:
- :func:`split_fused_experts` / :func:`fuse_experts`: transformers >= 5 keeps the experts of a layer
  fused (``experts.gate_up_proj`` ``[E, 2I, H]``, ``experts.down_proj`` ``[E, H, I]``) but saves them
  per expert (``experts.{e}.{gate,up,down}_proj.weight``); the bridge maps per-expert names.
- :func:`local_expert_indices` / :func:`export_gather_order`: the index arithmetic of expert
  parallelism (EP): EP rank ``r`` holds global experts ``[r * E/EP, (r+1) * E/EP)`` as its
  ``local_experts.0 .. E/EP-1``; the export gathers every EP rank's experts to EP rank 0.
- :func:`gather_expert_state`: that gather (``gather_object`` over the EP group).
- :func:`adapt_moe_layers` (class :func:`moe_layer_class`): megatron-core's ``MoELayer`` made
  trainable with tensor parallelism but without sequence parallelism (which slipstream's padded
  ``[b, s]`` batches and CPU do not support).

Why: with TP > 1 every TP rank holds the same tokens.  megatron-core refuses to *train* MoE with
TP > 1 unless ``sequence_parallel`` is on (``MoELayer.forward`` raises), and rightly: with expert
TP > 1 each rank would dispatch the duplicated tokens and the expert gradients come out TP times
too large.  So here the experts are not TP-sharded (``expert_tensor_parallel_size = 1``: replicated
over TP ranks, or split over EP ranks; this also avoids the uneven all-gather over TP that gloo
cannot do) and the MoE block itself runs sequence-parallel: each TP rank routes its 1/TP slice of
the sequence (padded to a multiple of TP), and the outputs are all-gathered back.  The gradients
then come out right: expert weights are summed over the expert-data-parallel group (which holds
the TP ranks) by Megatron's DDP with ``calculate_per_token_loss`` (:func:`adapt_moe_layers` tags
them for that at EP = 1 too), and the router weight -- replicated, but fed a different slice on
each TP rank -- gets its gradient all-reduced over TP by a tensor hook.

How: ``consumers.model`` calls :func:`adapt_moe_layers` on every ``GPTModel`` it builds, before DDP
(Megatron builds the layer as usual, with its process groups; then its class is switched); the
bridge's load/export call the expert helpers.  Tested on megatron-core 0.16.1 (CPU, gloo) and
0.19.2 (2 and 4 GPUs, NCCL): tests/test_bridge_moe_dist.py, tests/test_bridge_moe_gpu.py.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ HF expert layouts


def split_fused_experts(hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``hf`` with each layer's fused ``experts.gate_up_proj`` / ``experts.down_proj`` split into the
    per-expert ``experts.{e}.{gate,up,down}_proj.weight`` (gate rows come first in ``gate_up_proj``).
    Per-expert tensors (the safetensors file layout) pass through unchanged."""
    out = dict(hf)
    for key in [k for k in hf if k.endswith(".mlp.experts.gate_up_proj")]:
        base = key[: -len("gate_up_proj")]
        gate_up, down = out.pop(key), out.pop(base + "down_proj")
        for e in range(gate_up.shape[0]):
            gate, up = torch.chunk(gate_up[e], 2, dim=0)
            out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = gate, up
            out[f"{base}{e}.down_proj.weight"] = down[e]
    return out


def fuse_experts(stage: Mapping[str, torch.Tensor], num_layers: int, num_experts: int) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_fused_experts`: per-expert names -> the fused ``named_parameters()``,
    experts in global index order.  Raises if a layer has some experts but not all."""
    out = dict(stage)
    for i in range(num_layers):
        base = f"model.layers.{i}.mlp.experts."
        present = [e for e in range(num_experts) if f"{base}{e}.gate_proj.weight" in out]
        if not present:
            continue  # another PP stage's layer
        if len(present) != num_experts:
            missing = sorted(set(range(num_experts)) - set(present))
            raise RuntimeError(f"layer {i}: experts {missing} missing from the export (EP gather incomplete)")
        gu, dn = [], []
        for e in range(num_experts):
            gu.append(torch.cat([out.pop(f"{base}{e}.gate_proj.weight"), out.pop(f"{base}{e}.up_proj.weight")], dim=0))
            dn.append(out.pop(f"{base}{e}.down_proj.weight"))
        out[f"{base}gate_up_proj"], out[f"{base}down_proj"] = torch.stack(gu), torch.stack(dn)
    return out


# ------------------------------------------------------------------ expert-parallel index arithmetic


def local_expert_indices(num_experts: int, ep_rank: int, ep_size: int) -> list[int]:
    """Global expert ids held by EP rank ``ep_rank``, in ``local_experts.{j}`` order (Megatron's
    contiguous split: rank r holds ``[r * E/EP, (r+1) * E/EP)``)."""
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by expert_parallel={ep_size}")
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"EP rank {ep_rank} outside [0, {ep_size})")
    n = num_experts // ep_size
    return list(range(ep_rank * n, (ep_rank + 1) * n))


def export_gather_order(num_experts: int, ep_size: int) -> list[tuple[int, int, int]]:
    """``(global expert, EP rank, local index)`` for every expert, in the order the export writes
    them: global expert order, i.e. EP rank 0's local experts, then EP rank 1's, and so on."""
    return [(g, r, j) for r in range(ep_size) for j, g in enumerate(local_expert_indices(num_experts, r, ep_size))]


def layer_expert_indices(mlp: torch.nn.Module, num_experts: int) -> list[int]:
    """The global ids of the experts in this rank's ``MoELayer``: megatron-core records them as
    ``local_expert_indices``; otherwise they follow from the EP rank."""
    idx = getattr(mlp, "local_expert_indices", None)
    if idx is not None:
        return [int(i) for i in idx]
    from megatron.core import parallel_state as ps

    return local_expert_indices(num_experts, ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size())


def gather_expert_state(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Gather the HF-named expert tensors of every EP rank to EP rank 0 (collective over the EP
    group of expert-data-parallel replica 0; other replicas return ``None`` at once).  Returns the
    union on EP rank 0, ``{}`` on the other EP ranks."""
    from megatron.core import parallel_state as ps

    if ps.get_expert_data_parallel_rank() != 0:
        return None
    ep_rank = ps.get_expert_model_parallel_rank()
    ep_size = ps.get_expert_model_parallel_world_size()
    gathered: list[Any] | None = [None] * ep_size if ep_rank == 0 else None
    dist.gather_object(local, gathered, group=ps.get_expert_model_parallel_group(), group_dst=0)
    if gathered is None:
        return {}
    return {k: v for part in gathered for k, v in part.items()}


# ------------------------------------------------------------------ MoE layer for TP without SP


class _SplitSequence(torch.autograd.Function):
    """Forward: this TP rank's slice of dim 0.  Backward: all-gather the slices' gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.chunk(dist.get_world_size(group), dim=0)[dist.get_rank(group)].contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather_dim0(grad, ctx.group), None


class _GatherSequence(torch.autograd.Function):
    """Forward: all-gather the TP ranks' slices on dim 0.  Backward: this rank's slice (the
    gradient arriving here is the same on every TP rank)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.chunk(dist.get_world_size(ctx.group), dim=0)[dist.get_rank(ctx.group)].contiguous(), None


def _all_gather_dim0(x: torch.Tensor, group: Any) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty((x.shape[0] * dist.get_world_size(group), *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x, group=group)
    return out


def _tp_group() -> Any:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None


@functools.cache
def moe_layer_class() -> type:
    """``MoELayer`` subclass that runs sequence-parallel inside the MoE block when TP > 1 and
    ``sequence_parallel`` is off (see the module docstring); a plain ``MoELayer`` otherwise."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    class SequenceSplitMoELayer(MoELayer):
        """Each TP rank routes and computes its slice of the sequence; outputs are all-gathered."""

        def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            group = None if self.config.sequence_parallel else _tp_group()
            if group is None or hidden_states is None:
                return super().forward(hidden_states, *args, **kwargs)
            tp = dist.get_world_size(group)
            s = hidden_states.shape[0]
            pad = -s % tp
            x = F.pad(hidden_states, (0, 0, 0, 0, 0, pad)) if pad else hidden_states
            for key in ("padding_mask", "input_ids"):  # [b, s] per-token side inputs, sliced alike
                side = kwargs.get(key)
                if torch.is_tensor(side):
                    side = F.pad(side, (0, pad), value=0) if pad else side  # 0 = False for padding_mask
                    kwargs[key] = side.chunk(tp, dim=1)[dist.get_rank(group)].contiguous()
            x = _SplitSequence.apply(x, group)
            # MoELayer.forward refuses TP > 1 without sequence_parallel while training; this block
            # *is* sequence-parallel, so let it through.  MoELayer.forward reads self.training for
            # that check only (megatron-core 0.16); the router and experts keep their own flag.
            was_training = self.training
            self.training = False
            try:
                out, bias = super().forward(x, *args, **kwargs)
            finally:
                self.training = was_training
            out = _GatherSequence.apply(out, group)
            return (out[:s] if pad else out), bias

    return SequenceSplitMoELayer


def adapt_moe_layers(gpt: torch.nn.Module) -> int:
    """Make this rank's ``MoELayer`` modules sequence-parallel inside the MoE block when TP > 1 and
    ``sequence_parallel`` is off (module docstring): switch their class to :func:`moe_layer_class`
    (Megatron built them as usual) and all-reduce the router's gradient over TP.  Call once, after
    building the ``GPTModel`` and before wrapping it in DDP.  Returns the number of layers adapted."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    cls = moe_layer_class()
    group = None if gpt.config.sequence_parallel else _tp_group()
    if group is None:
        return 0
    if gpt.config.expert_tensor_parallel_size != 1:
        raise ValueError(f"MoE with tensor_parallel > 1 and no sequence parallelism needs expert_tensor_parallel_size=1, "
                         f"got {gpt.config.expert_tensor_parallel_size}")
    aux = gpt.config.moe_aux_loss_coeff
    if any(aux if isinstance(aux, list) else [aux]) or gpt.config.moe_z_loss_coeff:
        # Megatron reduces the router's load statistics over TP only with sequence_parallel on; here
        # each TP rank would balance its own slice of the sequence.  Not supported rather than wrong.
        raise ValueError("trainer.megatron.moe_aux_loss_coeff / moe_z_loss_coeff must be 0 with tensor_parallel > 1 "
                         "for MoE models (router load statistics would be per TP slice)")
    n = 0
    for layer in gpt.decoder.layers:
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, MoELayer) and not isinstance(mlp, cls):
            mlp.__class__ = cls
            for p in mlp.router.parameters():  # replicated, but each TP rank routes only its slice
                p.register_hook(functools.partial(_all_reduce_grad, group=group))
            for p in mlp.experts.parameters():
                # Megatron's DDP sums expert grads over the expert-data-parallel group (which holds
                # the TP ranks when expert TP = 1) only for params tagged allreduce=False, and
                # megatron-core 0.16 tags them only when EP > 1: at EP = 1 they would be reduced
                # over the dense DP group and miss the other TP ranks' token slices.
                p.allreduce = False
            n += 1
    log.info("MoE: %d layers run sequence-parallel over TP %d (expert TP 1)", n, dist.get_world_size(group))
    return n


def _all_reduce_grad(grad: torch.Tensor, group: Any) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad
