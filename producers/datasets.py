"""Prompt data from JSONL and Parquet files: the built-in file prompt source.

    [producer]
    prompts = "producers.datasets:make_prompts"
    prompts_args = { path = "data/train.jsonl", input_key = "question", label_key = "answer",
                     metadata_keys = ["source"], shuffle = true, epochs = 0 }

- one record per line (``.jsonl``) or per row (``.parquet``, needs ``pyarrow``);
- ``input_key`` holds the prompt text, or a list of chat messages (``[{"role": ..., "content": ...}]``);
- ``chat_template = true`` renders it with the Hugging Face tokenizer's chat template
  (``tokenizer_path`` = the model directory; ``system_prompt`` optional) and tokenizes it there, so
  the prompt's token ids come from the template exactly (no second BOS);
- ``id_key`` names a unique id field (default: the row number, ``<file stem>-<row>``);
- seeded shuffling: epoch ``e`` visits the rows in the order of a permutation seeded by
  ``(seed, e)``, so the order is reproducible and differs per epoch; ``epochs = 0`` cycles forever;
- with several producers, producer ``i`` of ``n`` reads only rows ``r % n == i`` (:meth:`PromptDataset.shard`,
  called by the producer), so an epoch is one pass over the file in total;
- the cursor ``(epoch, index)`` is the next row to hand out.  ``state_dict()`` / ``load_state_dict()``
  save and restore it: a restored dataset continues exactly where the saved one stopped (no prompt
  repeated or skipped).  Prompts handed out but not yet turned into a group when a producer dies are
  not replayed (the broker requeues only groups it has seen).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.configbase import ConfigError
from producers.plugins import Prompt

log = logging.getLogger(__name__)

KEY = "producer.prompts_args"


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``.jsonl`` (or ``.json`` list) or ``.parquet`` file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{KEY}.path", f"prompt file {str(p)!r} does not exist")
    if p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(f"{KEY}.path", "reading Parquet needs pyarrow (pip install pyarrow)") from None
        return list(pq.read_table(p).to_pylist())
    if p.suffix == ".json":
        data = json.loads(p.read_text())
        if not isinstance(data, list):
            raise ConfigError(f"{KEY}.path", f"{p} must hold a JSON list of records")
        return data
    records = []
    with p.open() as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{KEY}.path", f"{p}:{n}: not JSON: {e}") from None
    return records


class PromptDataset(Iterator[Prompt]):
    """An iterator of :class:`Prompt` over file records, with a saveable cursor."""

    def __init__(
        self,
        records: list[dict[str, Any]],
        seed: int = 0,
        input_key: str = "prompt",
        label_key: str = "answer",
        id_key: str = "",
        metadata_keys: list[str] | None = None,
        shuffle: bool = True,
        epochs: int = 0,
        name: str = "prompts",
        render: Callable[[Any], tuple[str, list[int] | None]] | None = None,
    ) -> None:
        if not records:
            raise ConfigError(f"{KEY}.path", "the prompt file has no records")
        for i, r in enumerate(records):
            if not isinstance(r, dict) or input_key not in r:
                raise ConfigError(f"{KEY}.input_key", f"record {i} has no key {input_key!r} (keys: {sorted(r) if isinstance(r, dict) else type(r).__name__})")
        self.records = records
        self.seed = seed
        self.input_key, self.label_key, self.id_key = input_key, label_key, id_key
        self.metadata_keys = list(metadata_keys or [])
        self.shuffle = shuffle
        self.epochs = epochs
        self.name = name
        self.render = render
        self.epoch = 0
        self.index = 0
        self.rows = list(range(len(records)))
        self.shard_index, self.num_shards = 0, 1
        self._order_epoch = -1
        self._order: list[int] = []

    def __len__(self) -> int:
        return len(self.rows)

    def shard(self, index: int, count: int) -> None:
        """Keep only rows ``r`` with ``r % count == index`` (producer ``index`` of ``count``): the
        producers of a run then share an epoch without overlap.  Call before iterating."""
        if not 0 <= index < count:
            raise ValueError(f"shard index {index} not in [0, {count})")
        self.shard_index, self.num_shards = index, count
        self.rows = [r for r in range(len(self.records)) if r % count == index]
        if not self.rows:
            raise ConfigError(f"{KEY}.path", f"{len(self.records)} records leave shard {index} of {count} empty")
        self._order_epoch = -1

    def order(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            self._order = list(self.rows)
            if self.shuffle:
                random.Random(f"{self.seed}-{epoch}").shuffle(self._order)
            self._order_epoch = epoch
        return self._order

    def __next__(self) -> Prompt:
        if self.index >= len(self.rows):
            self.epoch += 1
            self.index = 0
        if self.epochs and self.epoch >= self.epochs:
            raise StopIteration
        row = self.order(self.epoch)[self.index]
        self.index += 1
        return self.prompt(row)

    def prompt(self, row: int) -> Prompt:
        r = self.records[row]
        content = r[self.input_key]
        if self.render is not None:
            text, tokens = self.render(content)
        elif isinstance(content, str):
            text, tokens = content, None
        else:
            raise ConfigError(f"{KEY}.input_key", f"record {row}: {self.input_key!r} is {type(content).__name__}; chat messages need chat_template = true")
        pid = str(r[self.id_key]) if self.id_key else f"{self.name}-{row}"
        meta = {k: r[k] for k in self.metadata_keys if k in r}
        meta.update({"epoch": self.epoch, "row": row})
        label = r.get(self.label_key, "")
        return Prompt(prompt_id=pid, text=text, tokens=tokens, label="" if label is None else str(label), metadata=meta)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_records": len(self.records), "shuffle": self.shuffle,
                "shard": [self.shard_index, self.num_shards]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_records", len(self.records)) != len(self.records):
            raise ValueError(f"cursor was saved for {state['num_records']} records, this file has {len(self.records)}")
        if list(state.get("shard", [self.shard_index, self.num_shards])) != [self.shard_index, self.num_shards]:
            raise ValueError(f"cursor was saved for shard {state['shard']}, this is shard {[self.shard_index, self.num_shards]}")
        if state.get("seed", self.seed) != self.seed or state.get("shuffle", self.shuffle) != self.shuffle:
            log.warning("restoring a prompt cursor saved with another seed/shuffle: the order differs")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def chat_renderer(tokenizer_path: str, system_prompt: str = "") -> Callable[[Any], tuple[str, list[int] | None]]:
    """Render text or messages with the HF tokenizer's chat template; returns (text, token ids)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"{KEY}.chat_template", f"the tokenizer at {tokenizer_path!r} has no chat_template")

    def render(content: Any) -> tuple[str, list[int] | None]:
        messages = [{"role": "user", "content": content}] if isinstance(content, str) else list(content)
        if system_prompt and not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system_prompt})
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return text, list(ids)

    return render


def make_prompts(
    path: str,
    input_key: str = "prompt",
    label_key: str = "answer",
    id_key: str = "",
    metadata_keys: list[str] | None = None,
    shuffle: bool = True,
    epochs: int = 0,
    chat_template: bool = False,
    tokenizer_path: str = "",
    system_prompt: str = "",
) -> Callable[[int], PromptDataset]:
    """Factory named by ``producer.prompts`` with ``producer.prompts_args``: returns ``source(seed)``."""
    records = load_records(path)
    if chat_template and not tokenizer_path:
        raise ConfigError(f"{KEY}.tokenizer_path", "chat_template = true needs tokenizer_path (the model directory)")
    render = chat_renderer(tokenizer_path, system_prompt) if chat_template else None
    log.info("prompt file %s: %d records", path, len(records))

    def source(seed: int) -> PromptDataset:
        return PromptDataset(records, seed, input_key, label_key, id_key, metadata_keys, shuffle, epochs, Path(path).stem, render)

    return source
