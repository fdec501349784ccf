"""Hugging Face <-> Megatron-core weight mapping for Qwen3, Qwen3-MoE, Qwen2/Qwen2.5 and Llama models.

What:
- :func:`hf_model_spec` reads a HF ``config.json`` (dict or ``PretrainedConfig``) into a
  :class:`HFModelSpec`; :func:`transformer_config_kwargs` and :func:`gpt_model_kwargs` turn that into
  megatron-core ``TransformerConfig`` / ``GPTModel`` arguments (local layer spec: RMSNorm, SwiGLU,
  RoPE, GQA, optional qk-norm and qkv bias, tied or untied embeddings).
- :func:`load_hf_into_megatron` copies HF-named tensors into one rank's ``GPTModel`` (its TP shard
  and PP stage); :func:`export_hf_state` does the reverse for the whole model: TP shards are
  gathered, PP stages collected, and global rank 0 gets exactly the names and shapes of the HF
  model's ``named_parameters()`` (tied models: ``model.embed_tokens.weight`` and no ``lm_head``);
  :func:`export_hf_stage` stops before the PP gather: each stage's leader gets its own stage's
  tensors (per-stage weight publishing, DESIGN §8).
- :func:`apply_padding_idx` gives Megatron's input embedding HF's ``padding_idx`` semantics (no
  lookup gradient for ``pad_token_id``); without it a random-init checkpoint's zero pad row gets a
  ~1/sqrt(eps) gradient through the first RMSNorm that swamps the clipped grad norm.

Why our own: the families are a handful of flags apart, the mapping is ~200 lines, and a test of
logits parity against the transformers forward keeps it honest (``tests/test_bridge.py``).
mbridge needs four workarounds on CPU and is no longer released (docs/notes/megatron-on-cpu.md).

Layouts (megatron-core 0.16, local spec):
- ``linear_qkv.weight`` is ``[ng * (q_per_group + 2) * head_dim, hidden]``: for each query group,
  its ``q_per_group`` query heads, then its key head, then its value head.  TP rank ``r`` holds
  groups ``[r * ng/tp, (r+1) * ng/tp)``, so the row split is contiguous in that layout.
- ``linear_fc1.weight`` is ``[gate; up]`` *per TP rank*: rank ``r`` holds ``[gate_r; up_r]``.
- Column-parallel (split dim 0): linear_qkv, linear_fc1, word_embeddings, output_layer.
  Row-parallel (split dim 1): linear_proj, linear_fc2.  Norms are replicated.
- MoE (qwen3_moe, :mod:`consumers.bridge_moe`): the router is replicated; experts are never
  TP-sharded (``expert_tensor_parallel_size = 1``) and split over EP ranks: EP rank ``r`` holds
  global experts ``[r * E/EP, (r+1) * E/EP)`` as ``local_experts.{0..E/EP-1}``.

How (inside an initialised ``parallel_state``):

    spec = hf_model_spec(json.load(open(f"{path}/config.json")))
    model = GPTModel(TransformerConfig(**transformer_config_kwargs(spec), ...), **gpt_model_kwargs(spec), ...)
    load_hf_into_megatron(model, load_hf_state(path), tp_rank, tp_size, spec)
    apply_padding_idx(model, spec)
    named = export_hf_state(model, spec)     # full HF state on global rank 0, {} elsewhere

``consumers.model.build_trainable_model`` does all of this (for MoE models it also calls
``bridge_moe.adapt_moe_layers(gpt)`` before DDP, which TP > 1 needs: see :mod:`consumers.bridge_moe`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from consumers import bridge_moe

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama", "qwen3_moe")


class UnsupportedModelError(ValueError):
    """The HF config uses a feature the bridge does not map (says which)."""


@dataclass(frozen=True)
class HFModelSpec:
    """The architecture facts the mapping needs, read from a HF config."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    rope_scaling_factor: float | None = None  # Llama 3.1-style scaling (rope_type "llama3")
    pad_token_id: int | None = None  # HF's nn.Embedding(padding_idx=...): no lookup gradient for it
    num_experts: int = 0  # MoE (qwen3_moe): experts per layer, 0 = dense
    moe_topk: int = 0
    moe_ffn_hidden_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities (Megatron: not pre-softmax)

    @property
    def q_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def _rope(cfg: Mapping[str, Any]) -> tuple[float, float | None]:
    """(rope_theta, llama3 scaling factor or None). transformers >= 5 keeps both in
    ``rope_parameters``; older configs have ``rope_theta`` and ``rope_scaling`` at the top."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type == "llama3":
        src = params if params.get("rope_type") == "llama3" else scaling
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for key, want in expected.items():
            if key in src and float(src[key]) != want:
                raise UnsupportedModelError(f"llama3 rope scaling with {key}={src[key]} (megatron-core fixes {want})")
        return float(theta), float(src.get("factor", 8.0))
    raise UnsupportedModelError(f"rope_type {rope_type!r} is not supported (only default and llama3)")


def hf_model_spec(hf_config: Mapping[str, Any] | Any) -> HFModelSpec:
    """Parse a HF config (the ``config.json`` dict or a transformers ``PretrainedConfig``)."""
    cfg: dict[str, Any] = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
    model_type = cfg.get("model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act {cfg['hidden_act']!r} (only silu / SwiGLU)")
    if cfg.get("use_sliding_window"):
        raise UnsupportedModelError("sliding-window attention is not supported")
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true is not supported")
    if model_type != "qwen2" and cfg.get("attention_bias"):
        # Llama/Qwen3 put the bias on o_proj too; Megatron's add_qkv_bias covers q/k/v only
        raise UnsupportedModelError(f"attention_bias=true is not supported for {model_type}")
    moe: dict[str, Any] = {}
    if model_type == "qwen3_moe":
        if int(cfg.get("decoder_sparse_step", 1)) != 1 or cfg.get("mlp_only_layers"):
            raise UnsupportedModelError("qwen3_moe with dense layers (decoder_sparse_step / mlp_only_layers) is not supported")
        moe = {
            "num_experts": int(cfg.get("num_experts") or cfg["num_local_experts"]), "moe_topk": int(cfg["num_experts_per_tok"]),
            "moe_ffn_hidden_size": int(cfg["moe_intermediate_size"]), "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)),
        }
    theta, factor = _rope(cfg)
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    return HFModelSpec(
        model_type=model_type,
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        ffn_hidden_size=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",  # Qwen2 always has q/k/v biases (and none on o_proj)
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        rope_scaling_factor=factor,
        pad_token_id=_pad_id(cfg.get("pad_token_id"), int(cfg["vocab_size"])),
        **moe,
    )


def _pad_id(value: Any, vocab: int) -> int | None:
    if isinstance(value, list):  # some configs list several; nn.Embedding takes one
        value = value[0] if value else None
    return int(value) if value is not None and 0 <= int(value) < vocab else None


def load_hf_spec(path: str | os.PathLike[str]) -> HFModelSpec:
    return hf_model_spec(json.loads((Path(path) / "config.json").read_text()))


def check_parallel_sizes(spec: HFModelSpec, tp: int, pp: int, ep: int = 1) -> None:
    """Raise a clear error if the model cannot be split ``tp`` x ``pp`` ways (and its experts ``ep`` ways)."""
    if ep > 1 and not spec.num_experts:
        raise UnsupportedModelError(f"expert_parallel={ep} needs a MoE model; {spec.model_type} is dense (use 1)")
    if spec.num_experts and spec.num_experts % ep:
        raise UnsupportedModelError(f"num_experts={spec.num_experts} is not divisible by expert_parallel={ep}")
    for what, n in (
        ("num_attention_heads", spec.num_heads), ("num_key_value_heads", spec.num_kv_heads),
        ("intermediate_size", spec.ffn_hidden_size), ("vocab_size", spec.vocab_size),
    ):
        if n % tp:
            raise UnsupportedModelError(f"{what}={n} is not divisible by tensor_parallel={tp}")
    if spec.num_layers % pp:
        raise UnsupportedModelError(f"num_hidden_layers={spec.num_layers} is not divisible by pipeline_parallel={pp}")


def transformer_config_kwargs(spec: HFModelSpec) -> dict[str, Any]:
    """The architecture part of megatron-core's ``TransformerConfig`` for this model."""
    return {
        "num_layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "num_attention_heads": spec.num_heads,
        "num_query_groups": spec.num_kv_heads,
        "kv_channels": spec.head_dim,
        "ffn_hidden_size": spec.ffn_hidden_size,
        "normalization": "RMSNorm",
        "layernorm_epsilon": spec.rms_norm_eps,
        "gated_linear_unit": True,
        "activation_func": F.silu,
        "add_bias_linear": False,
        "add_qkv_bias": spec.qkv_bias,
        "qk_layernorm": spec.qk_norm,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "bias_activation_fusion": False,
        "masked_softmax_fusion": False,
        "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False,
        **_moe_config_kwargs(spec),
    }


def _moe_config_kwargs(spec: HFModelSpec) -> dict[str, Any]:
    """MoE part of the TransformerConfig (EP and expert TP are set by consumers.model): Qwen3-MoE
    routes with softmax over all experts, top-k, then renormalises iff ``norm_topk_prob`` -- Megatron's top-k-then-softmax
    (``moe_router_pre_softmax=False``) is the renormalised form, pre-softmax the other one."""
    if not spec.num_experts:
        return {}
    return {
        "num_moe_experts": spec.num_experts, "moe_router_topk": spec.moe_topk,
        "moe_ffn_hidden_size": spec.moe_ffn_hidden_size, "moe_router_pre_softmax": not spec.norm_topk_prob,
        "moe_grouped_gemm": False, "moe_aux_loss_coeff": 0.0, "moe_router_load_balancing_type": "none",
    }


def gpt_model_kwargs(spec: HFModelSpec) -> dict[str, Any]:
    """``GPTModel`` arguments other than ``config``, ``pre_process`` and ``post_process``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    kwargs: dict[str, Any] = {
        "transformer_layer_spec": get_gpt_layer_local_spec(
            num_experts=spec.num_experts or None, moe_grouped_gemm=False, qk_layernorm=spec.qk_norm, normalization="RMSNorm"
        ),
        "vocab_size": spec.vocab_size,
        "max_sequence_length": spec.max_position_embeddings,
        "position_embedding_type": "rope",
        "rotary_base": spec.rope_theta,
        "share_embeddings_and_output_weights": spec.tie_word_embeddings,
    }
    if spec.rope_scaling_factor is not None:
        kwargs.update(rope_scaling=True, rope_scaling_factor=spec.rope_scaling_factor)
    return kwargs


def apply_padding_idx(model: torch.nn.Module, spec: HFModelSpec) -> Any:
    """Give Megatron's input embedding HF's ``padding_idx`` semantics: the lookup of
    ``pad_token_id`` passes no gradient to the embedding row (the tied output layer still does).

    HF Llama/Qwen build ``nn.Embedding(vocab, hidden, padding_idx=pad_token_id)``; Megatron has no
    such notion.  It matters: random-init HF checkpoints have an all-zero pad row, whose RMSNorm
    gradient is ~1/sqrt(eps) and would dominate the clipped global grad norm whenever a sampled
    response contains the pad token.  Returns the hook handle (None if not applicable)."""
    gpt = unwrap_gpt(model)
    if spec.pad_token_id is None or not gpt.pre_process:
        return None
    pad = spec.pad_token_id

    def hook(_mod: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        is_pad = (args[0] == pad).unsqueeze(-1)
        return torch.where(is_pad, out.detach(), out)

    return gpt.embedding.word_embeddings.register_forward_hook(hook)


def hf_param_names(spec: HFModelSpec) -> list[str]:
    """The HF model's ``named_parameters()`` names, in its order."""
    names = ["model.embed_tokens.weight"]
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj"):
            names.append(f"{p}.self_attn.{proj}.weight")
            if spec.qkv_bias:
                names.append(f"{p}.self_attn.{proj}.bias")
        names.append(f"{p}.self_attn.o_proj.weight")
        if spec.qk_norm:
            names += [f"{p}.self_attn.q_norm.weight", f"{p}.self_attn.k_norm.weight"]
        if spec.num_experts:  # transformers >= 5: fused expert tensors, then the router
            names += [f"{p}.mlp.experts.gate_up_proj", f"{p}.mlp.experts.down_proj", f"{p}.mlp.gate.weight"]
        else:
            names += [f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight", f"{p}.mlp.down_proj.weight"]
        names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
    names.append("model.norm.weight")
    if not spec.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def _safetensors_files(root: Path) -> list[str]:
    index = root / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (root / "model.safetensors").exists():
        return ["model.safetensors"]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {root}")


def load_hf_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a HF checkpoint's safetensors (single file or sharded with an index) into CPU tensors:
    the whole checkpoint.  Trainer ranks use :class:`HFCheckpoint` instead (their slices only)."""
    from safetensors.torch import load_file

    root = Path(path)
    state: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(root):
        state.update(load_file(str(root / f)))
    return state


class HFCheckpoint(Mapping[str, torch.Tensor]):
    """A HF checkpoint's safetensors, read lazily: ``read(name, dim, rank, size)`` reads only
    chunk ``rank`` of ``size`` along ``dim`` (``safe_open(...).get_slice``), so a trainer rank holds
    its own TP slices, never the whole checkpoint.  As a Mapping, ``ckpt[name]`` reads a whole
    tensor.  Chunks are those of ``torch.chunk`` (the layout :func:`_shard` uses).

    Memory: safetensors maps the file and hands out tensors backed by that mapping; every page a
    read touches counts in the process's RSS for as long as the mapping lives.  So each read opens
    the file and lets the mapping go with the returned tensor (callers copy it into a parameter and
    drop it), instead of keeping one mapping per file open for the whole load, under which the
    touched pages of every tensor would add up."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self.root = Path(path)
        self._where: dict[str, str] = {}
        for f in _safetensors_files(self.root):
            with safe_open(str(self.root / f), framework="pt") as h:
                self._where.update(dict.fromkeys(h.keys(), f))
        self._overlay: dict[str, torch.Tensor] = {}  # split fused experts (MoE)

    def _open(self, name: str) -> Any:
        from safetensors import safe_open

        return safe_open(str(self.root / self._where[name]), framework="pt")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._overlay:
            return self._overlay[name]
        with self._open(name) as h:
            return h.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        yield from self._where
        yield from (n for n in self._overlay if n not in self._where)

    def __len__(self) -> int:
        return len(set(self._where) | set(self._overlay))

    def __contains__(self, name: object) -> bool:
        return name in self._overlay or name in self._where

    def read(self, name: str, dim: int | None = None, rank: int = 0, size: int = 1) -> torch.Tensor:
        if dim is None or size == 1 or name in self._overlay:
            t = self[name]
            return t if dim is None else _shard(t, dim, rank, size)
        with self._open(name) as h:
            sl = h.get_slice(name)
            n = sl.get_shape()[dim]
            step = -(-n // size)  # torch.chunk's chunk size
            start, stop = min(rank * step, n), min((rank + 1) * step, n)
            return sl[start:stop] if dim == 0 else sl[:, start:stop]

    def split_fused_experts(self) -> HFCheckpoint:
        """Fused MoE expert tensors (``experts.gate_up_proj``) split per expert, as
        :func:`consumers.bridge_moe.split_fused_experts` does (those tensors are read whole)."""
        fused = [k for k in self._where if k.endswith(".mlp.experts.gate_up_proj")]
        if fused:
            base = {k: self[k] for k in fused} | {k[: -len("gate_up_proj")] + "down_proj": self[k[: -len("gate_up_proj")] + "down_proj"] for k in fused}
            self._overlay.update(bridge_moe.split_fused_experts(base))
            for k in base:
                self._where.pop(k, None)
        return self


def open_hf_checkpoint(path: str | os.PathLike[str]) -> HFCheckpoint:
    return HFCheckpoint(path)


def _read(hf: Mapping[str, torch.Tensor], name: str, dim: int | None = None, rank: int = 0, size: int = 1) -> torch.Tensor:
    """Tensor ``name`` of ``hf`` (a dict or an :class:`HFCheckpoint`), or chunk ``rank`` of ``size`` along ``dim``."""
    if isinstance(hf, HFCheckpoint):
        return hf.read(name, dim, rank, size)
    t = hf[name]
    return t if dim is None else _shard(t, dim, rank, size)


# ------------------------------------------------------------------ per-parameter mapping

# kinds: "rep" replicated, "embed" split on dim 0 (vocab-parallel embedding / output layer),
# "row" split on dim 1, "qkv" fused q/k/v (weight or bias; dim 0), "fc1" fused gate/up (dim 0).
# expert=True: an MoE expert weight, never TP-sharded (expert TP = 1) and split over EP ranks instead.


@dataclass(frozen=True)
class _Entry:
    megatron_name: str
    kind: str
    hf_names: tuple[str, ...]
    expert: bool = False


def unwrap_gpt(model: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside DDP / Float16Module wrappers."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    m = model
    while not isinstance(m, GPTModel):
        if not hasattr(m, "module"):
            raise TypeError(f"{type(model).__name__} does not wrap a GPTModel")
        m = m.module
    return m


def _entries(gpt: torch.nn.Module, spec: HFModelSpec) -> list[_Entry]:
    """The mapping for the parameters this rank's stage holds."""
    out: list[_Entry] = []
    if gpt.pre_process:
        out.append(_Entry("embedding.word_embeddings.weight", "embed", ("model.embed_tokens.weight",)))
    for j, layer in enumerate(gpt.decoder.layers):
        i = layer.layer_number - 1  # global, 0-based
        m, h = f"decoder.layers.{j}", f"model.layers.{i}"
        attn = f"{h}.self_attn"
        out.append(_Entry(f"{m}.input_layernorm.weight", "rep", (f"{h}.input_layernorm.weight",)))
        out.append(_Entry(f"{m}.self_attention.linear_qkv.weight", "qkv",
                          (f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight")))
        if spec.qkv_bias:
            out.append(_Entry(f"{m}.self_attention.linear_qkv.bias", "qkv",
                              (f"{attn}.q_proj.bias", f"{attn}.k_proj.bias", f"{attn}.v_proj.bias")))
        out.append(_Entry(f"{m}.self_attention.linear_proj.weight", "row", (f"{attn}.o_proj.weight",)))
        if spec.qk_norm:
            out.append(_Entry(f"{m}.self_attention.q_layernorm.weight", "rep", (f"{attn}.q_norm.weight",)))
            out.append(_Entry(f"{m}.self_attention.k_layernorm.weight", "rep", (f"{attn}.k_norm.weight",)))
        out.append(_Entry(f"{m}.pre_mlp_layernorm.weight", "rep", (f"{h}.post_attention_layernorm.weight",)))
        if spec.num_experts:  # this EP rank's experts; per-expert HF names (the file layout)
            out.append(_Entry(f"{m}.mlp.router.weight", "rep", (f"{h}.mlp.gate.weight",)))
            for j, e in enumerate(bridge_moe.layer_expert_indices(layer.mlp, spec.num_experts)):
                me, he = f"{m}.mlp.experts.local_experts.{j}", f"{h}.mlp.experts.{e}"
                out.append(_Entry(f"{me}.linear_fc1.weight", "fc1", (f"{he}.gate_proj.weight", f"{he}.up_proj.weight"), True))
                out.append(_Entry(f"{me}.linear_fc2.weight", "row", (f"{he}.down_proj.weight",), True))
            continue
        out.append(_Entry(f"{m}.mlp.linear_fc1.weight", "fc1", (f"{h}.mlp.gate_proj.weight", f"{h}.mlp.up_proj.weight")))
        out.append(_Entry(f"{m}.mlp.linear_fc2.weight", "row", (f"{h}.mlp.down_proj.weight",)))
    if gpt.post_process:
        out.append(_Entry("decoder.final_layernorm.weight", "rep", ("model.norm.weight",)))
        if not spec.tie_word_embeddings:
            out.append(_Entry("output_layer.weight", "embed", ("lm_head.weight",)))
        elif not gpt.pre_process:
            # tied, last stage of PP > 1: a copy of the embedding kept in sync by Megatron
            out.append(_Entry("output_layer.weight", "embed", ("model.embed_tokens.weight",)))
    return out


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: HFModelSpec) -> torch.Tensor:
    """HF q/k/v (weights [heads*hd, hidden] or biases [heads*hd]) -> Megatron's full fused layout."""
    ng, hd = spec.num_kv_heads, spec.head_dim
    tail = q.shape[1:]
    qkv = torch.cat(
        [q.reshape(ng, spec.q_per_group * hd, *tail), k.reshape(ng, hd, *tail), v.reshape(ng, hd, *tail)], dim=1
    )
    return qkv.reshape(-1, *tail)


def _split_qkv(qkv: torch.Tensor, spec: HFModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_fuse_qkv` for the full (TP-gathered) fused tensor."""
    ng, hd = spec.num_kv_heads, spec.head_dim
    tail = qkv.shape[1:]
    grouped = qkv.reshape(ng, (spec.q_per_group + 2) * hd, *tail)
    q, k, v = torch.split(grouped, [spec.q_per_group * hd, hd, hd], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def _shard(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    return torch.chunk(t, size, dim=dim)[rank] if size > 1 else t


def _to_megatron(entry: _Entry, hf: Mapping[str, torch.Tensor], spec: HFModelSpec, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's shard of ``entry`` from the HF tensors; from an :class:`HFCheckpoint` only
    that shard is read (a q/k/v shard is the same kv groups of each, fused)."""
    if entry.expert:
        tp_rank, tp_size = 0, 1
    for name in entry.hf_names:
        if name not in hf:
            raise KeyError(f"HF checkpoint has no tensor {name!r} (needed for {entry.megatron_name})")
    names = entry.hf_names
    if entry.kind == "rep":
        return _read(hf, names[0])
    if entry.kind == "embed":
        return _read(hf, names[0], 0, tp_rank, tp_size)
    if entry.kind == "row":
        return _read(hf, names[0], 1, tp_rank, tp_size)
    if entry.kind == "qkv":  # kv groups are contiguous in the fused layout: shard each of q, k, v, then fuse
        local = dataclasses.replace(spec, num_kv_heads=spec.num_kv_heads // tp_size, num_heads=spec.num_heads // tp_size)
        return _fuse_qkv(*(_read(hf, n, 0, tp_rank, tp_size) for n in names), local)
    if entry.kind == "fc1":
        return torch.cat([_read(hf, names[0], 0, tp_rank, tp_size), _read(hf, names[1], 0, tp_rank, tp_size)], dim=0)
    raise AssertionError(entry.kind)


_PARTITION = {"embed": (0, 1), "qkv": (0, 1), "fc1": (0, 2), "row": (1, 1)}  # kind -> (dim, stride)


def _ensure_tp_attributes(param: torch.nn.Parameter, kind: str, tp_size: int) -> None:
    """Megatron tags TP-sharded params (``tensor_model_parallel``, ``partition_dim``,
    ``partition_stride``) only while initialising them; with ``perform_initialization=False`` they
    stay untagged and the grad norm then counts TP rank 0's shard only.  Tag them if missing."""
    if kind not in _PARTITION or getattr(param, "tensor_model_parallel", False):
        return
    dim, stride = _PARTITION[kind]
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = stride


@torch.no_grad()
def load_hf_into_megatron(
    model: torch.nn.Module,
    hf_state: Mapping[str, torch.Tensor],
    tp_rank: int,
    tp_size: int,
    spec: HFModelSpec,
) -> int:
    """Copy HF-named tensors into this rank's (possibly wrapped) ``GPTModel``: its TP shard of the
    layers of its PP stage (the model knows its stage: ``pre_process``/``post_process`` and each
    layer's global ``layer_number``).  Returns the number of parameters written; raises if a Megatron
    parameter has no mapping or a shape differs."""
    gpt = unwrap_gpt(model)
    params = dict(gpt.named_parameters())
    written = 0
    if spec.num_experts:
        hf_state = hf_state.split_fused_experts() if isinstance(hf_state, HFCheckpoint) else bridge_moe.split_fused_experts(hf_state)
    for entry in _entries(gpt, spec):
        if entry.megatron_name not in params:
            raise KeyError(f"Megatron model has no parameter {entry.megatron_name!r}")
        target = params.pop(entry.megatron_name)
        value = _to_megatron(entry, hf_state, spec, tp_rank, tp_size)
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"{entry.megatron_name}: shape {tuple(target.shape)} but HF {entry.hf_names} gives {tuple(value.shape)} "
                f"at TP rank {tp_rank}/{tp_size}"
            )
        target.data.copy_(value)
        if not entry.expert:
            _ensure_tp_attributes(target, entry.kind, tp_size)
        written += target.numel()
    if params:
        raise KeyError(f"Megatron parameters without an HF mapping: {sorted(params)}")
    return written


def _gather_tp(t: torch.Tensor, group: Any, size: int) -> list[torch.Tensor]:
    if size == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _to_hf(entry: _Entry, local: torch.Tensor, spec: HFModelSpec, group: Any, tp_size: int) -> dict[str, torch.Tensor]:
    if entry.expert:
        group, tp_size = None, 1
    if entry.kind == "rep":
        return {entry.hf_names[0]: local.clone()}
    parts = _gather_tp(local.detach(), group, tp_size)
    if entry.kind == "embed":
        return {entry.hf_names[0]: torch.cat(parts, dim=0)}
    if entry.kind == "row":
        return {entry.hf_names[0]: torch.cat(parts, dim=1)}
    if entry.kind == "qkv":
        return dict(zip(entry.hf_names, _split_qkv(torch.cat(parts, dim=0), spec), strict=True))
    if entry.kind == "fc1":
        gates, ups = zip(*(torch.chunk(p, 2, dim=0) for p in parts), strict=True)
        return {entry.hf_names[0]: torch.cat(gates, dim=0), entry.hf_names[1]: torch.cat(ups, dim=0)}
    raise AssertionError(entry.kind)


def _host(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in named.items()}


def _gather_objects_on(device: torch.device, gather: Any, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """``gather(local)`` (an object collective: the tensors are pickled) with ``local`` in host
    memory on the way, and the result back on ``device``.  Pickled CUDA tensors would land on the
    *sender's* device index in the receiving process (another rank's GPU); so these gathers (EP's
    experts, and the PP gather of :func:`export_hf_state`, which per-stage publishing avoids) are
    the only places an export passes through host memory."""
    out = gather(_host(local))
    return None if out is None else {k: v.to(device) for k, v in out.items()}


def _stage_state(model: torch.nn.Module, spec: HFModelSpec, dtype: torch.dtype | None) -> dict[str, torch.Tensor] | None:
    """This rank's PP stage as HF-named tensors on the model's device (per-expert names with MoE)
    on the stage's leader (TP rank 0 of data-parallel replica 0, which also receives the stage's
    experts from its EP peers), None elsewhere.  Collective over the TP group (and the EP group
    with EP > 1)."""
    from megatron.core import parallel_state as ps

    gpt = unwrap_gpt(model)
    params = dict(gpt.named_parameters())
    device = next(iter(params.values())).device
    entries = _entries(gpt, spec)
    ep_size = ps.get_expert_model_parallel_world_size() if (spec.num_experts and dist.is_initialized()) else 1
    experts: dict[str, torch.Tensor] | None = None
    if ep_size > 1:  # expert weights live on EP ranks, which are also other DP (or TP) ranks
        local = {
            name: t.to(dtype=dtype or t.dtype)
            for entry in entries if entry.expert
            for name, t in _to_hf(entry, params[entry.megatron_name], spec, None, 1).items()
        }
        experts = _gather_objects_on(device, bridge_moe.gather_expert_state, local)
        entries = [e for e in entries if not e.expert]
    if dist.is_initialized() and ps.get_data_parallel_rank() != 0:
        return None
    tp_size = ps.get_tensor_model_parallel_world_size()
    tp_group = ps.get_tensor_model_parallel_group() if tp_size > 1 else None
    stage: dict[str, torch.Tensor] = {}
    for entry in entries:
        if entry.megatron_name == "output_layer.weight" and spec.tie_word_embeddings:
            continue  # the tied copy on the last stage; the first stage exports the embedding
        for name, t in _to_hf(entry, params[entry.megatron_name], spec, tp_group, tp_size).items():
            stage[name] = t.to(dtype=dtype or t.dtype)
    if ps.get_tensor_model_parallel_rank() != 0:
        return None
    if ep_size > 1:
        if not experts:  # Megatron's rank order puts EP rank 0 of replica 0 on the stage's TP/DP rank 0
            raise RuntimeError(f"rank {dist.get_rank()}: TP/DP rank 0 of its stage but not EP rank 0 of expert replica 0")
        stage.update(experts)
    return stage


def _hf_order(stage: dict[str, torch.Tensor], spec: HFModelSpec) -> dict[str, torch.Tensor]:
    """Fuse per-expert tensors (MoE) and order by :func:`hf_param_names` (names absent from
    ``stage`` are skipped, as are names the HF model does not have)."""
    if spec.num_experts:
        stage = bridge_moe.fuse_experts(stage, spec.num_layers, spec.num_experts)
    return {n: stage[n] for n in hf_param_names(spec) if n in stage}


@torch.no_grad()
def export_hf_stage(model: torch.nn.Module, spec: HFModelSpec, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """This PP stage's HF-named tensors (on the model's device) on the stage's leader (TP rank 0 of data-parallel
    replica 0; see :func:`is_stage_leader`), ``{}`` on other ranks.  Nothing crosses the PP group:
    this is what per-stage publishing (:mod:`consumers.stage_publish`) sends from each stage.

    Collective like :func:`export_hf_state`, minus the PP gather.  The names are the HF names of
    the stage's layers (the first stage also has the embedding, the last one the final norm and
    ``lm_head``), in :func:`hf_param_names` order; the stages' exports are disjoint and together
    are exactly :func:`export_hf_state`'s.
    """
    stage = _stage_state(model, spec, dtype)
    return {} if stage is None else _hf_order(stage, spec)


def is_stage_leader() -> bool:
    """True on the rank that holds its PP stage's export (:func:`export_hf_stage`): the member of
    global rank 0's pipeline group for its stage (TP rank 0 of data-parallel replica 0)."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        return True
    return 0 in dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())


@torch.no_grad()
def export_hf_state(model: torch.nn.Module, spec: HFModelSpec, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The full model as HF-named tensors on the model's device, on global rank 0 (``{}`` on
    other ranks).  Weights stay on the device (DESIGN §8): only the object gathers of EP experts
    and of PP stages pass through host memory (see :func:`_gather_objects_on`).

    Collective: every rank of data-parallel replica 0 must call it (TP peers all-gather their
    shards; each PP stage's TP-rank-0 sends its layers to global rank 0); with expert parallelism
    every rank of expert-data-parallel replica 0 too (EP peers send their experts to EP rank 0, the
    stage's TP/DP rank 0).  Other ranks may call it and return ``{}``.  Names and order are
    :func:`hf_param_names`.  (Checkpoints and HF export use this; weight publishing with
    ``weights.per_stage_publish`` uses :func:`export_hf_stage` instead.)
    """
    from megatron.core import parallel_state as ps

    stage = _stage_state(model, spec, dtype)
    if stage is None:
        return {}
    pp_size = ps.get_pipeline_model_parallel_world_size()
    if pp_size > 1:
        pp_group = ps.get_pipeline_model_parallel_group()
        first = ps.get_pipeline_model_parallel_rank() == 0

        def gather(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
            gathered: list[Any] | None = [None] * pp_size if first else None
            dist.gather_object(part, gathered, group=pp_group, group_dst=0)
            return None if gathered is None else {k: v for p in gathered for k, v in p.items()}

        device = next(iter(stage.values())).device if stage else torch.device("cpu")
        merged = _gather_objects_on(device, gather, stage)
        if merged is None:
            return {}
        stage = merged
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    out = _hf_order(stage, spec)
    missing = [n for n in hf_param_names(spec) if n not in out]
    if missing:
        raise RuntimeError(f"export is missing HF tensors: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    return out


def split_fused_experts(hf: Mapping[str, torch.Tensor], spec: HFModelSpec | None = None) -> dict[str, torch.Tensor]:
    """Kept for callers of the old name: :func:`consumers.bridge_moe.split_fused_experts`."""
    return bridge_moe.split_fused_experts(hf)
