"""Load a model's tokenizer the way transformers does: ``AutoTokenizer.from_pretrained``.

What: :func:`load_tokenizer` returns a :class:`ModelTokenizer` for a checkpoint directory.  It is
what the producer, the evaluator, multi-turn rollouts, the SFT stage and the prompt files use, so
``tokenizer_config.json`` is honoured everywhere: special tokens (BOS added by the template or the
post-processor), the chat template, and sentencepiece models that ship only ``tokenizer.model``
(transformers converts them; that needs the ``sentencepiece`` package, see the ``[tokenizers]``
extra).

Why a wrapper: plug-ins were written against ``tokenizers.Tokenizer`` (``encode(text).ids``,
``decode(ids, skip_special_tokens=True)``).  The wrapper keeps that interface on top of the
transformers tokenizer, and exposes the transformers object as :attr:`ModelTokenizer.hf` for
everything else (``apply_chat_template``, ``eos_token_id``, ...).

How::

    tok = load_tokenizer("runs/tiny-qwen3")
    tok.encode("123=").ids            # special tokens as the model's tokenizer adds them
    tok.encode("4", add_special_tokens=False).ids
    tok.decode([4, 2], skip_special_tokens=True)
    tok.apply_chat_template([{"role": "user", "content": "hi"}])   # token ids of the rendered prompt
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.configbase import ConfigError

log = logging.getLogger(__name__)

#: Files one of which a checkpoint's tokenizer needs (besides sentencepiece ``*.model``, ``*.tiktoken``).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")


@dataclass(frozen=True)
class Encoding:
    """The part of ``tokenizers.Encoding`` that slipstream and its plug-ins use."""

    ids: list[int]


class ModelTokenizer:
    """A transformers tokenizer behind the ``tokenizers.Tokenizer`` calls plug-ins use."""

    def __init__(self, hf: Any, path: str) -> None:
        self.hf = hf
        self.path = path

    def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
        return Encoding(list(self.hf(text, add_special_tokens=add_special_tokens)["input_ids"]))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens))

    @property
    def chat_template(self) -> str | None:
        return getattr(self.hf, "chat_template", None) or None

    @property
    def eos_token_id(self) -> int | None:
        eos = getattr(self.hf, "eos_token_id", None)
        return None if eos is None else int(eos)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages`` (text)."""
        if not self.chat_template:
            raise ValueError(f"the tokenizer at {self.path!r} has no chat_template (tokenizer_config.json or chat_template.jinja)")
        return str(self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat: the template's text tokenized without adding special
        tokens again (the template writes BOS itself where the model wants one)."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False).ids


def load_tokenizer(path: str | Path, key: str = "model.path") -> ModelTokenizer:
    """``AutoTokenizer.from_pretrained(path)`` wrapped; a failure is a ConfigError naming ``key``."""
    from transformers import AutoTokenizer

    p = str(path)
    if not Path(p).is_dir():
        raise ConfigError(key, f"tokenizer directory {p!r} does not exist")
    files = sorted(f.name for f in Path(p).iterdir() if f.name in TOKENIZER_FILES or f.suffix in (".model", ".tiktoken"))
    if not files:  # transformers would build an empty tokenizer from config.json alone
        raise ConfigError(key, f"cannot load a tokenizer from {p!r} (tokenizer files there: none; expected one of "
                               f"{', '.join(TOKENIZER_FILES)}, *.model or *.tiktoken)")
    try:
        hf = AutoTokenizer.from_pretrained(p)
    except Exception as e:  # transformers raises OSError, ValueError, ImportError (sentencepiece missing), ...
        raise ConfigError(key, f"cannot load a tokenizer from {p!r} with transformers' AutoTokenizer "
                               f"(tokenizer files there: {files}): {type(e).__name__}: {e}") from None
    if len(hf) < 2:
        raise ConfigError(key, f"the tokenizer loaded from {p!r} has {len(hf)} token(s) (tokenizer files there: {files})")
    log.info("tokenizer %s from %s (vocab %d, chat template: %s)", type(hf).__name__, p, len(hf),
             "yes" if getattr(hf, "chat_template", None) else "no")
    return ModelTokenizer(hf, p)
