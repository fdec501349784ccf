"""Prompt files and the numeric verifier:

- JSONL and Parquet records with configurable input/label/id/metadata keys;
- seeded shuffling (reproducible, different per epoch), finite epochs, endless cycling;
- a saved cursor resumes exactly: counting prompt ids, nothing is repeated or skipped, also across
  an epoch boundary;
- chat templates through the HF tokenizer of a local tiny model dir (a template we set);
- the ``\\boxed{}`` numeric-answer reward.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from pipeline.configbase import ConfigError
from pipeline.tiny import BOS_ID, DIGIT0_ID, EQUALS_ID, build_tokenizer
from producers.datasets import load_records, make_prompts
from producers.plugins import Prompt, Sample
from producers.rewards.math import extract_boxed, make_reward, parse_number, reward, verify


def _jsonl(tmp_path: Path, n: int = 10) -> Path:
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps({"uid": f"q{i}", "question": f"{i}+1", "answer": i + 1, "source": "synthetic", "junk": 0}) + "\n" for i in range(n)))
    return p


def _ids(prompts: list[Prompt]) -> list[str]:
    return [p.prompt_id for p in prompts]


def test_jsonl_keys_metadata_and_epochs(tmp_path: Path) -> None:
    src = make_prompts(str(_jsonl(tmp_path)), input_key="question", label_key="answer", id_key="uid", metadata_keys=["source"], epochs=2)
    ds = src(7)
    out = list(ds)
    assert len(out) == 20 and Counter(_ids(out)) == {f"q{i}": 2 for i in range(10)}
    p = next(x for x in out if x.prompt_id == "q3")
    assert p.text == "3+1" and p.label == "4" and p.metadata["source"] == "synthetic" and "junk" not in p.metadata
    first, second = _ids(out[:10]), _ids(out[10:])
    assert first != second, "each epoch is shuffled with its own seed"
    assert _ids(list(src(7))) == _ids(out), "same seed, same order"
    assert _ids(list(src(8))) != _ids(out)
    plain = make_prompts(str(_jsonl(tmp_path)), input_key="question", shuffle=False)(0)  # endless, in file order
    assert [p.prompt_id for p in islice(plain, 12)] == [f"train-{i}" for i in range(10)] + ["train-0", "train-1"]


@pytest.mark.parametrize("cut", [0, 3, 10, 13, 19])
def test_resume_from_cursor_neither_repeats_nor_skips(tmp_path: Path, cut: int) -> None:
    src = make_prompts(str(_jsonl(tmp_path)), input_key="question", id_key="uid", epochs=2)
    reference = _ids(list(src(1)))
    ds = src(1)
    before = [next(ds) for _ in range(cut)]
    state = json.loads(json.dumps(ds.state_dict()))  # survives a round trip through a file
    resumed = src(1)
    resumed.load_state_dict(state)
    after = list(resumed)
    assert _ids(before) + _ids(after) == reference
    assert Counter(_ids(before) + _ids(after)) == {f"q{i}": 2 for i in range(10)}


def test_cursor_for_another_file_is_refused(tmp_path: Path) -> None:
    ds = make_prompts(str(_jsonl(tmp_path)), input_key="question")(0)
    with pytest.raises(ValueError, match="saved for 5 records"):
        ds.load_state_dict({"epoch": 0, "index": 1, "num_records": 5})


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "train.parquet"
    pq.write_table(pa.table({"prompt": ["12=", "34="], "answer": ["2", "4"], "level": [1, 2]}), p)
    assert load_records(p) == [{"prompt": "12=", "answer": "2", "level": 1}, {"prompt": "34=", "answer": "4", "level": 2}]
    out = list(make_prompts(str(p), metadata_keys=["level"], shuffle=False, epochs=1)(0))
    assert [(x.prompt_id, x.text, x.label, x.metadata["level"]) for x in out] == [("train-0", "12=", "2", 1), ("train-1", "34=", "4", 2)]


def test_bad_files_and_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        make_prompts(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not JSON"):
        make_prompts(str(bad))
    with pytest.raises(ConfigError, match=r"prompts_args.input_key.*record 0 has no key 'text'"):
        make_prompts(str(_jsonl(tmp_path)), input_key="text")(0)
    with pytest.raises(ConfigError, match="needs tokenizer_path"):
        make_prompts(str(_jsonl(tmp_path)), chat_template=True)


def test_chat_template_through_the_hf_tokenizer(tmp_path: Path) -> None:
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    build_tokenizer(tok_dir)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "<s>{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": "12", "answer": "2"}) + "\n" + json.dumps({"prompt": [{"role": "user", "content": "34"}], "answer": "4"}) + "\n")
    out = list(make_prompts(str(data), chat_template=True, tokenizer_path=str(tok_dir), system_prompt="9", shuffle=False, epochs=1)(0))
    d = DIGIT0_ID
    assert out[0].text == "<s>912=" and out[0].tokens == [BOS_ID, d + 9, d + 1, d + 2, EQUALS_ID]
    assert out[1].text == "<s>934=" and out[1].tokens == [BOS_ID, d + 9, d + 3, d + 4, EQUALS_ID]
    with pytest.raises(ConfigError, match="no chat_template"):
        build_tokenizer(tmp_path)
        make_prompts(str(data), chat_template=True, tokenizer_path=str(tmp_path))
    with pytest.raises(ConfigError, match="chat messages need chat_template"):
        list(make_prompts(str(data), shuffle=False, epochs=1)(0))


# ---------------------------------------------------------------- numeric verifier
@pytest.mark.parametrize(
    ("response", "label", "expected"),
    [
        (r"so the answer is \boxed{42}.", "42", 1.0),
        (r"\boxed{41}", "42", 0.0),
        (r"first \boxed{1} then \boxed{\frac{3}{4}}", "0.75", 1.0),
        (r"\boxed{\dfrac{1}{3}}", "1/3", 1.0),
        (r"$\boxed{1,234}$", "1234", 1.0),
        (r"\boxed{\text{-7}}", "-7", 1.0),
        (r"\boxed{{12}}", "12", 1.0),
        (r"\boxed{50\%}", "50", 1.0),
        (r"\boxed{2.50}", "5/2", 1.0),
        (r"\boxed{x+1}", "1", 0.0),
        (r"\boxed{12", "12", 0.0),  # unbalanced
        ("the answer is 12", "12", 0.0),  # strict: no box
        (r"\boxed{1}", "not a number", 0.0),
        (r"\boxed{1000001}", "1000000", 0.0),  # integers compare exactly
    ],
)
def test_numeric_verifier(response: str, label: str, expected: float) -> None:
    assert verify(response, label) == expected
    s = Sample(Prompt("p", label=label), [], [], response, "stop")
    assert reward(s) == expected


def test_boxed_extraction_and_fallback() -> None:
    assert extract_boxed(r"\boxed{a{b}c} and \boxed{d}") == "d"
    assert extract_boxed(r"\boxed{a{b}c}") == "a{b}c"
    assert extract_boxed("none") is None
    assert parse_number("3/0") is None
    lenient = make_reward(fallback_last_number=True)
    assert lenient(Sample(Prompt("p", label="12"), [], [], "first 3, then 12.", "stop")) == 1.0
    assert lenient(Sample(Prompt("p", label="12"), [], [], "no digits", "stop")) == 0.0


def test_producer_saves_and_restores_the_cursor(tmp_path: Path) -> None:
    """A restarted producer continues the prompt file where the previous one stopped."""
    from producers.config import ProducerConfig
    from producers.producer import Producer

    tok = tmp_path / "tok"
    tok.mkdir()
    build_tokenizer(tok)
    cfg = ProducerConfig(prompts="producers.datasets:make_prompts",
                         prompts_args={"path": str(_jsonl(tmp_path)), "input_key": "question", "id_key": "uid", "epochs": 1})
    cursor = tmp_path / "cursors" / "producer-0.json"

    def producer() -> Producer:
        return Producer(cfg, "producer-0", "tcp://127.0.0.1:9", [], str(tok), seed=3, cursor_path=cursor)

    seen = []
    p = producer()
    for _ in range(4):
        seen.append(p._next_prompt().prompt_id)  # type: ignore[union-attr]
    p.save_cursor()
    p.sock.close(linger=0)
    p.ctx.term()
    assert json.loads(cursor.read_text())["index"] == 4
    p = producer()
    while (nxt := p._next_prompt()) is not None:
        seen.append(nxt.prompt_id)
    p.sock.close(linger=0)
    p.ctx.term()
    assert sorted(seen) == sorted(f"q{i}" for i in range(10)), seen
    assert p.exhausted


def test_shards_partition_each_epoch(tmp_path: Path) -> None:
    src = make_prompts(str(_jsonl(tmp_path, 11)), input_key="question", id_key="uid", epochs=2)
    shards = []
    for i in range(3):
        ds = src(100 + i)  # each producer has its own seed
        ds.shard(i, 3)
        shards.append(_ids(list(ds)))
    assert Counter(x for s in shards for x in s) == {f"q{i}": 2 for i in range(11)}
    assert all(not set(a) & set(b) for a in shards for b in shards if a is not b)
    ds = src(0)
    ds.shard(1, 3)
    with pytest.raises(ValueError, match="saved for shard"):
        ds.load_state_dict({"epoch": 0, "index": 0, "num_records": 11, "shard": [0, 3]})


# ---------------------------------------------------------------- dotted keys, presets, HF datasets
def _verl_rows(n: int = 6) -> list[dict]:
    return [{"data_source": "synthetic", "prompt": [{"role": "user", "content": f"{i}{i + 1}"}], "ability": "digits",
             "reward_model": {"style": "rule", "ground_truth": str(i + 1)}, "extra_info": {"index": i, "split": "train"}} for i in range(n)]


def _chat_tokenizer(tmp_path: Path) -> Path:
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir(exist_ok=True)
    build_tokenizer(tok_dir)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "<s>{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tok_dir


def test_dotted_keys_and_the_verl_preset(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(_verl_rows()), path)
    tok = _chat_tokenizer(tmp_path)
    out = list(make_prompts(str(path), preset="verl", tokenizer_path=str(tok), shuffle=False, epochs=1)(0))
    assert [p.label for p in out] == ["1", "2", "3", "4", "5", "6"]  # reward_model.ground_truth, not ''
    assert out[1].text == "<s>12=" and out[1].tokens == [BOS_ID, DIGIT0_ID + 1, DIGIT0_ID + 2, EQUALS_ID]
    assert out[0].metadata["data_source"] == "synthetic" and out[0].metadata["ability"] == "digits"
    # explicit keys win over the preset; dotted keys work for ids and metadata too
    out = list(make_prompts(str(path), preset="verl", tokenizer_path=str(tok), id_key="extra_info.index",
                            metadata_keys=["extra_info.split"], shuffle=False, epochs=1)(0))
    assert [p.prompt_id for p in out] == [str(i) for i in range(6)] and out[0].metadata["extra_info.split"] == "train"
    # a top-level key with a dot in its name wins over the nested path
    flat = tmp_path / "flat.jsonl"
    flat.write_text(json.dumps({"prompt": "1=", "a.b": "top", "a": {"b": "nested"}}) + "\n")
    assert next(make_prompts(str(flat), label_key="a.b")(0)).label == "top"


def test_missing_key_is_an_error_naming_key_and_row(tmp_path: Path) -> None:
    rows = _verl_rows(4)
    del rows[2]["reward_model"]["ground_truth"]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = _chat_tokenizer(tmp_path)
    with pytest.raises(ConfigError, match=r"'producer.prompts_args.label_key': record 2 has no key 'reward_model.ground_truth' "
                                          r"\(.*bad.*its keys: \[.*'reward_model.style'"):
        make_prompts(str(path), preset="verl", tokenizer_path=str(tok))(0)
    with pytest.raises(ConfigError, match=r"label_key': record 0 has no key 'answer ' \(train: its keys: \['uid', 'question', 'answer'"):
        make_prompts(str(_jsonl(tmp_path)), input_key="question", label_key="answer ")(0)
    no_label = list(make_prompts(str(_jsonl(tmp_path)), input_key="question", label_key="", epochs=1)(0))
    assert {p.label for p in no_label} == {""}  # label_key = "" says: no labels
    with pytest.raises(ConfigError, match=r"preset.*unknown preset 'trl'"):
        make_prompts(str(path), preset="trl")
    with pytest.raises(ConfigError, match="needs tokenizer_path"):
        make_prompts(str(path), preset="slime")


def test_slime_preset(tmp_path: Path) -> None:
    path = tmp_path / "slime.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": "34"}], "label": "4", "metadata": {"k": i}}) + "\n" for i in range(3)))
    out = list(make_prompts(str(path), preset="slime", tokenizer_path=str(_chat_tokenizer(tmp_path)), shuffle=False, epochs=1)(0))
    assert [(p.text, p.label, p.metadata["metadata"]["k"]) for p in out] == [("<s>34=", "4", 0), ("<s>34=", "4", 1), ("<s>34=", "4", 2)]


def test_hf_datasets_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # as in a run's processes: nothing is downloaded
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets", reason="the Hugging Face datasets source is the [data] extra")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    from producers.datasets import make_hf_prompts

    rows = _verl_rows(5)
    files = tmp_path / "train.jsonl"
    files.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = str(_chat_tokenizer(tmp_path))
    from_files = list(make_hf_prompts("json", data_files=str(files), preset="verl", tokenizer_path=tok, shuffle=False, epochs=1)(0))
    assert [p.label for p in from_files] == ["1", "2", "3", "4", "5"] and from_files[0].text == "<s>01="
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    from_disk = list(make_hf_prompts(str(saved), preset="verl", tokenizer_path=tok, shuffle=False, epochs=1)(0))
    assert [(p.text, p.label) for p in from_disk] == [(p.text, p.label) for p in from_files]
    with pytest.raises(ConfigError, match=r"'producer.prompts_args.dataset': cannot load dataset 'no-such-org/no-such-dataset'"):
        make_hf_prompts("no-such-org/no-such-dataset")


@pytest.mark.slow
def test_verl_parquet_trains_the_tiny_model(tmp_path: Path) -> None:
    """The tiny example's task as a verl-schema parquet file (chat messages, label under
    reward_model.ground_truth): the run learns from it."""
    import random
    import shutil
    import subprocess

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.tiny import make_tiny_model
    from tests.helpers import REPO, env, slipstream

    rng = random.Random(0)
    rows = []
    for i in range(2000):
        digits = [rng.randrange(10) for _ in range(rng.randint(3, 5))]
        rows.append({"data_source": "maxdigit", "prompt": [{"role": "user", "content": "".join(map(str, digits))}], "ability": "digits",
                     "reward_model": {"style": "rule", "ground_truth": str(max(digits))}, "extra_info": {"index": i}})
    data = tmp_path / "maxdigit.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    model = make_tiny_model(tmp_path / "model")
    tok = _chat_tokenizer(tmp_path)  # the tiny tokenizer plus a chat template: <s> + content + "="
    shutil.copy(tok / "tokenizer_config.json", model / "tokenizer_config.json")
    run_dir = tmp_path / "run"
    args = ["run", str(REPO / "examples" / "tiny" / "config.toml"), "--run-dir", str(run_dir), "--set", f"model.path='{model}'",
            "--set", "run.steps=80", "--set", "producer.prompts='producers.datasets:make_prompts'",
            "--set", f"producer.prompts_args={{path='{data}', preset='verl', tokenizer_path='{model}'}}"]
    r = subprocess.run(slipstream(*args), capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    first = sum(s["reward_mean"] for s in steps[:10]) / 10
    last = sum(s["reward_mean"] for s in steps[-10:]) / 10
    assert len(steps) == 80 and last - first >= 0.25, f"reward {first:.3f} -> {last:.3f}"
    consumed = [json.loads(line) for line in (run_dir / "consumed.jsonl").read_text().splitlines()]
    assert all(c["prompt_id"].startswith("maxdigit-") for c in consumed[:50]), consumed[0]
