"""The SFT stage: supervised warm-up on demonstrations inside the trainer, before RL starts.

What: ``[sft]`` (:class:`consumers.config.SFTConfig`) names a JSONL file of demonstrations, one
object per line with ``prompt`` and ``response``, each either text or a list of token ids.  Text
is tokenized with the model's tokenizer (``AutoTokenizer``, :mod:`producers.tokenizer`) exactly as
the producers tokenize prompts (``encode(prompt).ids``, special tokens included); a text response is encoded without
special tokens and, with ``append_eos``, gets the model's ``eos_token_id``.  Token lists are used
verbatim.  :func:`run_sft` then takes ``steps`` optimizer steps of cross-entropy on the response
tokens (token mean; :meth:`TrainerRank.sft_step`), ``batch_size`` examples per step drawn by a
seeded shuffle that cycles through the data, split over DP ranks.

Why inside the trainer: the SFT stage needs no producers or broker.  The loop runs it before it
connects, publishes the SFT weights to the engines before its ``hello`` and announces them as
version ``queue.max_staleness + 1``, so that rollouts the producers sampled with the pre-SFT
weights (version 0) while SFT ran exceed the staleness bound and are never trained on
(:func:`consumers.checkpoint.prepare_start`).
The Adam state carries over from SFT into RL.

How: ``slipstream run config.toml`` with an ``[sft]`` table (see examples/sft/config.toml), or
``run_sft(rank, cfg.sft, model_path)`` in tests.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from consumers.config import SFTConfig

log = logging.getLogger(__name__)

Example = tuple[list[int], list[int]]


def load_examples(path: str | Path, model_path: str | Path, append_eos: bool = True) -> list[Example]:
    """``(prompt_ids, response_ids)`` for each line of the JSONL file ``path``."""
    tok = None
    eos: int | None = None
    out: list[Example] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if "prompt" not in rec or "response" not in rec:
                raise ValueError(f"{path}:{n}: each line needs 'prompt' and 'response'")
            pair = []
            for key in ("prompt", "response"):
                v = rec[key]
                if isinstance(v, list):
                    pair.append([int(t) for t in v])
                    continue
                if tok is None:
                    from producers.tokenizer import load_tokenizer

                    tok = load_tokenizer(model_path)
                    config = Path(model_path) / "config.json"
                    eos = json.loads(config.read_text()).get("eos_token_id") if config.exists() else None
                    eos = eos[0] if isinstance(eos, list) and eos else eos  # Llama 3 lists several
                    eos = tok.eos_token_id if eos is None else eos
                if key == "prompt":
                    pair.append(list(tok.encode(v).ids))
                else:
                    ids = list(tok.encode(v, add_special_tokens=False).ids)
                    pair.append([*ids, int(eos)] if append_eos and eos is not None else ids)
            if not pair[1]:
                raise ValueError(f"{path}:{n}: empty response")
            out.append((pair[0], pair[1]))
    if not out:
        raise ValueError(f"{path}: no SFT examples")
    return out


def run_sft(rank: Any, sft_cfg: SFTConfig, model_path: str | Path, run_dir: str | Path | None = None) -> list[dict[str, float]]:
    """Run the SFT stage on ``rank`` (collective over all trainer ranks); returns per-step stats
    (and appends them to ``RUN_DIR/sft_steps.jsonl`` on global rank 0).  Sets ``rank.policy_version`` to 1."""
    import torch.distributed as dist

    examples = load_examples(sft_cfg.data, model_path, sft_cfg.append_eos)
    lr = sft_cfg.lr or rank.cfg.lr
    groups = rank.optimizer.param_groups
    old = [g["lr"] for g in groups]
    for g in groups:
        g["lr"] = lr
    rng = random.Random(sft_cfg.seed)
    order: list[int] = []
    history = []
    log.info("SFT stage: %d steps, %d examples per step, lr %g, %d examples in %s", sft_cfg.steps, sft_cfg.batch_size, lr, len(examples), sft_cfg.data)
    try:
        for step in range(1, sft_cfg.steps + 1):
            batch = []
            while len(batch) < sft_cfg.batch_size:
                if not order:
                    order = list(range(len(examples)))
                    rng.shuffle(order)
                batch.append(examples[order.pop()])
            stats = rank.sft_step(batch[rank.dp_rank :: rank.dp_size])
            stats["sft_step"] = float(step)
            history.append(stats)
            if step == 1 or step % 10 == 0 or step == sft_cfg.steps:
                log.info("SFT step %d/%d: loss %.4f grad_norm %.3f", step, sft_cfg.steps, stats["loss"], stats["grad_norm"])
            if run_dir is not None and dist.get_rank() == 0:
                with (Path(run_dir) / "sft_steps.jsonl").open("a") as f:
                    f.write(json.dumps({"step": step, "loss": stats["loss"], "grad_norm": stats["grad_norm"],
                                        "tokens_trained": stats["tokens_trained"]}) + "\n")
    finally:
        for g, v in zip(groups, old, strict=True):
            g["lr"] = v
    rank.policy_version = 1
    return history
