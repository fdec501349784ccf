"""Tokenizers are loaded with transformers' AutoTokenizer everywhere (producers/tokenizer.py).

- a model that ships only ``tokenizer.model`` (sentencepiece, no ``tokenizer.json``) loads, and the
  producer, the SFT stage and prompt files tokenize with it exactly as sentencepiece does (BOS from
  ``tokenizer_config.json``'s ``add_bos_token``, EOS appended to SFT responses);
- the chat template is taken from ``tokenizer_config.json`` (and from ``chat_template.jinja`` when
  the model ships one), and a chat prompt's tokens are the rendered template's;
- the tiny example's tokenizer gives the same ids through AutoTokenizer as through
  ``tokenizers.Tokenizer`` (what the producer used before), with special tokens skipped on decode;
- no tokenizer at all is a ConfigError naming ``model.path`` and listing what is there.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from pipeline.configbase import ConfigError
from pipeline.tiny import build_tokenizer
from producers.plugins import Prompt
from producers.tokenizer import load_tokenizer

CHAT = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
CORPUS = [f"the quick brown fox jumps over the lazy dog {i}" for i in range(200)] + ["one two three four five six seven eight nine"] * 50


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sentencepiece-only tokenizer: tokenizer.model + tokenizer_config.json (Llama style)."""
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece models need the sentencepiece package (the [test] extra)")
    d = tmp_path_factory.mktemp("spm")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=60, model_type="bpe",
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (d / "tokenizer.model").write_bytes(model.getvalue())
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                                                         "unk_token": "<unk>", "add_bos_token": True, "chat_template": CHAT}))
    assert sorted(p.name for p in d.iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    return d


@pytest.fixture(scope="module")
def sp(spm_dir: Path):  # type: ignore[no-untyped-def]
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))


def test_sentencepiece_only_tokenizer(spm_dir: Path, sp) -> None:  # type: ignore[no-untyped-def]
    tok = load_tokenizer(spm_dir)
    for text in ("the lazy fox jumps", "one two three", "nine dog 7"):
        assert tok.encode(text).ids == [1, *sp.encode(text)], text
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text)
        assert tok.decode(tok.encode(text).ids) == sp.decode(sp.encode(text))
    assert tok.eos_token_id == 2


def test_producer_and_sft_use_the_sentencepiece_tokenizer(spm_dir: Path, sp, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from consumers.sft import load_examples
    from producers.config import ProducerConfig
    from producers.producer import Producer

    p = Producer(ProducerConfig(), "producer-0", "tcp://127.0.0.1:9", [], str(spm_dir), seed=0)
    try:
        assert p._tokens(Prompt("a", text="the quick dog")) == [1, *sp.encode("the quick dog")]
    finally:
        p.sock.close(linger=0)
        p.ctx.term()
    demos = tmp_path / "sft.jsonl"
    demos.write_text(json.dumps({"prompt": "one two", "response": "three four"}) + "\n")
    [(prompt, response)] = load_examples(demos, spm_dir)
    assert prompt == [1, *sp.encode("one two")] and response == [*sp.encode("three four"), 2]


def test_chat_template_from_tokenizer_config(spm_dir: Path, tmp_path: Path) -> None:
    from producers.datasets import make_prompts

    tok = load_tokenizer(spm_dir)
    assert tok.chat_template == CHAT
    messages = [{"role": "user", "content": "one two"}]
    assert tok.render_chat(messages) == "[user] one two\n[assistant]"
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": messages, "answer": "3"}) + "\n")
    [prompt] = list(make_prompts(str(data), chat_template=True, tokenizer_path=str(spm_dir), shuffle=False, epochs=1)(0))
    assert prompt.text == "[user] one two\n[assistant]"
    assert prompt.tokens == tok.encode(prompt.text, add_special_tokens=False).ids == tok.apply_chat_template(messages)


def test_chat_template_jinja_file(tmp_path: Path) -> None:
    build_tokenizer(tmp_path)
    assert load_tokenizer(tmp_path).chat_template is None
    (tmp_path / "chat_template.jinja").write_text("<s>{% for m in messages %}{{ m['content'] }}{% endfor %}=")
    tok = load_tokenizer(tmp_path)
    assert tok.render_chat([{"role": "user", "content": "12"}]) == "<s>12="
    assert tok.apply_chat_template([{"role": "user", "content": "12"}]) == [1, 4, 5, 13]


def test_tiny_tokenizer_ids_unchanged(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    build_tokenizer(tmp_path)
    raw, tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json")), load_tokenizer(tmp_path)
    for text in ("123=", "9", "=40", "<s>7"):
        assert tok.encode(text).ids == raw.encode(text).ids
        assert tok.encode(text, add_special_tokens=False).ids == raw.encode(text, add_special_tokens=False).ids
    assert tok.decode([1, 4, 5, 2]) == "1 2"  # <s> and </s> are special in tokenizer_config.json: skipped


def test_missing_tokenizer_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"'model.path': cannot load a tokenizer from .* \(tokenizer files there: none; expected one of tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ConfigError, match=r"'model.path': tokenizer directory .* does not exist"):
        load_tokenizer(tmp_path / "nope")
