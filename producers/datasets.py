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
- keys may be dotted paths into nested records: ``label_key = "reward_model.ground_truth"``
  (verl's schema).  A key missing from a record is a ConfigError naming the key and the record
  when the file is loaded, never an empty string; ``label_key = ""`` means the rows have no label;
- ``preset = "verl"`` / ``"slime"`` fills in the keys of those frameworks' prompt files (verl:
  ``prompt`` = chat messages, label ``reward_model.ground_truth``, metadata ``data_source`` and
  ``ability``; slime: ``prompt``, label ``label``, metadata ``metadata``; both render messages with
  the chat template, so they need ``tokenizer_path``).  Keys given next to a preset win over it;
- :func:`make_hf_prompts` reads the rows with Hugging Face ``datasets`` instead (``pip install
  'slipstream[data]'``): local data files (``data_files``, any format ``datasets`` reads), a
  directory written by ``Dataset.save_to_disk``, or a dataset already in the ``datasets`` cache
  (the run is offline: nothing is downloaded).

    prompts = "producers.datasets:make_prompts"
    prompts_args = { path = "data/gsm8k/train.parquet", preset = "verl", tokenizer_path = "Qwen/Qwen3-0.6B" }
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.configbase import ConfigError
from producers.plugins import Prompt

log = logging.getLogger(__name__)

KEY = "producer.prompts_args"
_MISSING = object()  # get_key's "no default: raise KeyError"
_ABSENT = object()  # a default that tells a missing key from a None value

#: Keys of the prompt files of peer frameworks (``preset = ...``); explicit keys win.
PRESETS: dict[str, dict[str, Any]] = {
    "verl": {"input_key": "prompt", "label_key": "reward_model.ground_truth", "metadata_keys": ["data_source", "ability"],
             "chat_template": True},
    "slime": {"input_key": "prompt", "label_key": "label", "metadata_keys": ["metadata"], "chat_template": True},
}


def get_key(record: Any, key: str, default: Any = _MISSING) -> Any:
    """``record[key]``, where a dotted ``key`` walks nested mappings (``reward_model.ground_truth``).
    A top-level key that itself contains dots wins.  Missing: ``default``, or KeyError."""
    if isinstance(record, dict) and key in record:
        return record[key]
    node = record
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _MISSING:
                raise KeyError(key)
            return default
        node = node[part]
    return node


def _key_paths(record: Any, prefix: str = "", depth: int = 3) -> list[str]:
    """Dotted paths of a record's keys (for error messages)."""
    if not isinstance(record, dict) or depth == 0:
        return [prefix] if prefix else []
    out: list[str] = []
    for k, v in record.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        out += _key_paths(v, path, depth - 1) if isinstance(v, dict) and v else [path]
    return out


def check_keys(records: list[Any], keys: dict[str, str], where: str = "") -> None:
    """Every record has every key (``{config key name: dotted record key}``; empty keys are skipped);
    else a ConfigError naming the config key, the record key and the record."""
    for i, r in enumerate(records):
        for name, key in keys.items():
            if not key:
                continue
            if not isinstance(r, dict) or get_key(r, key, _ABSENT) is _ABSENT:
                have = _key_paths(r) if isinstance(r, dict) else type(r).__name__
                raise ConfigError(f"{KEY}.{name}", f"record {i} has no key {key!r} ({where + ': ' if where else ''}its keys: {have})")


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
        check_keys(records, {"input_key": input_key, "label_key": label_key, "id_key": id_key}, name)
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
        content = get_key(r, self.input_key)
        if self.render is not None:
            text, tokens = self.render(content)
        elif isinstance(content, str):
            text, tokens = content, None
        else:
            raise ConfigError(f"{KEY}.input_key", f"record {row}: {self.input_key!r} is {type(content).__name__}; chat messages need chat_template = true")
        pid = str(get_key(r, self.id_key)) if self.id_key else f"{self.name}-{row}"
        meta = {k: v for k in self.metadata_keys if (v := get_key(r, k, _ABSENT)) is not _ABSENT}
        meta.update({"epoch": self.epoch, "row": row})
        label = get_key(r, self.label_key) if self.label_key else ""
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
    from pipeline.hub import local_model_dir
    from producers.tokenizer import load_tokenizer

    tok = load_tokenizer(local_model_dir(tokenizer_path, f"{KEY}.tokenizer_path"), f"{KEY}.tokenizer_path")
    if not tok.chat_template:
        raise ConfigError(f"{KEY}.chat_template", f"the tokenizer at {tokenizer_path!r} has no chat_template")

    def render(content: Any) -> tuple[str, list[int] | None]:
        messages = [{"role": "user", "content": content}] if isinstance(content, str) else list(content)
        if system_prompt and not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system_prompt})
        text = tok.render_chat(messages)
        return text, tok.encode(text, add_special_tokens=False).ids

    return render


def _keys(preset: str, given: dict[str, Any]) -> dict[str, Any]:
    """The preset's keys (if any) overridden by the ones given explicitly (not None)."""
    defaults: dict[str, Any] = {"input_key": "prompt", "label_key": "answer", "metadata_keys": None, "chat_template": False}
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"{KEY}.preset", f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        defaults.update(PRESETS[preset])
    return {k: (given[k] if given.get(k) is not None else v) for k, v in defaults.items()}


def _source(records: list[dict[str, Any]], name: str, keys: dict[str, Any], id_key: str, shuffle: bool, epochs: int,
            tokenizer_path: str, system_prompt: str) -> Callable[[int], PromptDataset]:
    if keys["chat_template"] and not tokenizer_path:
        raise ConfigError(f"{KEY}.tokenizer_path", "chat_template = true needs tokenizer_path (the model directory or hub id)")
    render = chat_renderer(tokenizer_path, system_prompt) if keys["chat_template"] else None

    def source(seed: int) -> PromptDataset:
        return PromptDataset(records, seed, keys["input_key"], keys["label_key"], id_key, keys["metadata_keys"], shuffle, epochs,
                             Path(name).stem, render)

    return source


def make_prompts(
    path: str,
    input_key: str | None = None,
    label_key: str | None = None,
    id_key: str = "",
    metadata_keys: list[str] | None = None,
    shuffle: bool = True,
    epochs: int = 0,
    chat_template: bool | None = None,
    tokenizer_path: str = "",
    system_prompt: str = "",
    preset: str = "",
) -> Callable[[int], PromptDataset]:
    """Factory named by ``producer.prompts`` with ``producer.prompts_args``: returns ``source(seed)``.
    Defaults: ``input_key = "prompt"``, ``label_key = "answer"``, no chat template, unless ``preset``
    (``"verl"``, ``"slime"``) says otherwise."""
    keys = _keys(preset, {"input_key": input_key, "label_key": label_key, "metadata_keys": metadata_keys, "chat_template": chat_template})
    records = load_records(path)
    log.info("prompt file %s: %d records%s", path, len(records), f" ({preset} keys)" if preset else "")
    return _source(records, path, keys, id_key, shuffle, epochs, tokenizer_path, system_prompt)


def load_hf_records(dataset: str, name: str = "", split: str = "train", data_files: str | list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of a Hugging Face ``datasets`` dataset, offline: ``data_files`` read by the builder
    ``dataset`` (``"parquet"``, ``"json"``, ``"csv"``, ...), a ``save_to_disk`` directory, or a
    dataset id already in the ``datasets`` cache."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{KEY}.dataset", "the Hugging Face datasets source needs the datasets package: pip install 'slipstream[data]'") from None
    try:
        if not data_files and Path(dataset).is_dir() and any((Path(dataset) / f).exists() for f in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(dataset)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(dataset, name or None, split=split, data_files=data_files)
    except Exception as e:  # datasets raises FileNotFoundError, ConnectionError, ValueError, ...
        raise ConfigError(f"{KEY}.dataset", f"cannot load dataset {dataset!r} (name {name!r}, split {split!r}, data_files {data_files!r}) "
                                            f"with datasets {datasets.__version__} (HF_DATASETS_OFFLINE={os.environ.get('HF_DATASETS_OFFLINE', '')!r}): "
                                            f"{type(e).__name__}: {e}") from None
    return list(ds.to_list())


def make_hf_prompts(
    dataset: str,
    name: str = "",
    split: str = "train",
    data_files: str | list[str] | None = None,
    input_key: str | None = None,
    label_key: str | None = None,
    id_key: str = "",
    metadata_keys: list[str] | None = None,
    shuffle: bool = True,
    epochs: int = 0,
    chat_template: bool | None = None,
    tokenizer_path: str = "",
    system_prompt: str = "",
    preset: str = "",
) -> Callable[[int], PromptDataset]:
    """Like :func:`make_prompts`, with the rows read by Hugging Face ``datasets`` (:func:`load_hf_records`)."""
    keys = _keys(preset, {"input_key": input_key, "label_key": label_key, "metadata_keys": metadata_keys, "chat_template": chat_template})
    records = load_hf_records(dataset, name, split, data_files)
    if not records:
        raise ConfigError(f"{KEY}.dataset", f"dataset {dataset!r} split {split!r} has no rows")
    log.info("dataset %s (split %s): %d rows%s", dataset, split, len(records), f" ({preset} keys)" if preset else "")
    return _source(records, f"{Path(dataset).name}-{split}", keys, id_key, shuffle, epochs, tokenizer_path, system_prompt)
