"""Prompt datasets: verl parquet and plain jsonl, length filtering, seeded order, and the one-line
errors for bad input."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hybridflow_mg.config.load import ConfigError, build
from hybridflow_mg.data import (
    DataConfig,
    PromptBatches,
    Tokenizer,
    build_prompt_data,
    load_prompts,
    sentencepiece_to_hf,
    train_sentencepiece,
)

CHAT_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}[assistant]"
QUESTIONS = [f"what is {a} plus {b}? " * (1 + a % 4) for a, b in zip(range(20), range(40, 60))]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    corpus = QUESTIONS + ["[system][user][assistant]\nsystem user assistant 0123456789 ,.:?!"]
    return Tokenizer.from_path(train_sentencepiece(corpus, tmp_path_factory.mktemp("sp") / "t.model", vocab_size=64))


@pytest.fixture(scope="module")
def hf_tok(sp_tok, tmp_path_factory):
    return Tokenizer.from_path(sentencepiece_to_hf(sp_tok.path, tmp_path_factory.mktemp("hf"), chat_template=CHAT_TEMPLATE))


def _verl_rows(n=len(QUESTIONS)):
    return [
        {
            "data_source": "openai/gsm8k" if i % 2 else "lighteval/MATH",
            "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": QUESTIONS[i]}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(i + 40 + i)},
            "extra_info": {"split": "train", "index": i},
        }
        for i in range(n)
    ]


def _write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_verl_parquet_round_trip(hf_tok, tmp_path):
    rows = _verl_rows()
    data = load_prompts([_write_parquet(tmp_path / "train.parquet", rows)], hf_tok, max_prompt_length=10_000)
    assert len(data) == len(rows) and data.num_dropped_too_long == 0
    for item, row in zip(data.items, rows):
        text = "".join(f"[{m['role']}]{m['content']}\n" for m in row["prompt"]) + "[assistant]"
        assert item.prompt_ids == hf_tok.encode(text) == hf_tok.apply_chat_template(row["prompt"])
        assert item.ground_truth == row["reward_model"]["ground_truth"]
        assert item.data_source == row["data_source"]
        assert item.extra_info == row["extra_info"]
    assert [it.index for it in data.items] == list(range(len(rows)))


def test_plain_jsonl_text_and_ids(sp_tok, tmp_path):
    rows = [{"question": q, "answer": str(i)} for i, q in enumerate(QUESTIONS[:4])]
    rows.append({"question": sp_tok.encode("what is 1", add_bos=True), "answer": "x"})
    path = _write_jsonl(tmp_path / "plain.jsonl", rows)
    data = load_prompts([path], sp_tok, prompt_key="question", ground_truth_key="answer", default_data_source="openai/gsm8k")
    assert [it.prompt_ids for it in data.items[:4]] == [sp_tok.encode(q, add_bos=True) for q in QUESTIONS[:4]]
    assert data.items[4].prompt_ids == sp_tok.encode("what is 1", add_bos=True)  # ids pass through
    assert [it.ground_truth for it in data.items] == ["0", "1", "2", "3", "x"]
    assert {it.data_source for it in data.items} == {"openai/gsm8k"} and data.items[0].extra_info == {}
    chat = load_prompts([path], sp_tok, prompt_key="question", ground_truth_key="answer", text_prompts_as_chat=True)
    assert chat.items[0].prompt_ids == sp_tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}])


def test_long_prompts_are_dropped_and_counted(sp_tok, tmp_path):
    rows = _verl_rows()
    lengths = [len(sp_tok.apply_chat_template(r["prompt"])) for r in rows]
    limit = sorted(lengths)[len(lengths) // 2]
    path = _write_parquet(tmp_path / "t.parquet", rows)
    data = load_prompts([path, path], sp_tok, max_prompt_length=limit, truncation="drop")  # indices continue
    assert data.num_rows == 2 * len(rows)
    assert data.num_dropped_too_long == 2 * sum(n > limit for n in lengths) and data.num_truncated == 0
    assert all(len(it.prompt_ids) <= limit for it in data.items)
    assert [it.index for it in data.items] == [i for i in range(2 * len(rows)) if lengths[i % len(rows)] <= limit]
    assert f"{data.num_dropped_too_long} dropped and 0 truncated" in data.summary()
    n = len(rows)
    with pytest.raises(ValueError, match=rf"all {n} prompts .* longer than max_prompt_length=3 tokens \({n} dropped\)"):
        load_prompts([path], sp_tok, max_prompt_length=3, truncation="drop")


def test_a_long_prompt_is_an_error_naming_its_row_unless_truncation_says_otherwise(sp_tok, tmp_path):
    rows = _verl_rows()
    full = [sp_tok.apply_chat_template(r["prompt"]) for r in rows]  # templated ids are what is measured
    limit = sorted(map(len, full))[len(full) // 2]
    first_long = next(i for i, ids in enumerate(full) if len(ids) > limit)
    path = _write_parquet(tmp_path / "t.parquet", rows)
    with pytest.raises(ValueError, match=rf"row {first_long}: the prompt has {len(full[first_long])} tokens after the "
                                         rf"chat template, more than data.max_prompt_length={limit}; .*data.truncation"):
        load_prompts([path], sp_tok, max_prompt_length=limit)  # the default is error
    for side in ("left", "right"):
        data = load_prompts([path], sp_tok, max_prompt_length=limit, truncation=side)
        assert len(data) == len(rows) and data.num_dropped_too_long == 0
        assert data.num_truncated == sum(len(ids) > limit for ids in full)
        for item, ids in zip(data.items, full):
            assert item.prompt_ids == (ids if len(ids) <= limit else ids[-limit:] if side == "left" else ids[:limit])
        assert f"0 dropped and {data.num_truncated} truncated" in data.summary()
    with pytest.raises(ValueError, match="truncation must be one of error, drop, left, right, got 'middle'"):
        DataConfig(train_files=["a.parquet"], truncation="middle")


def test_seeded_shuffle_and_batching(sp_tok, tmp_path):
    path = _write_parquet(tmp_path / "t.parquet", _verl_rows())
    cfg = DataConfig(train_files=[path], val_files=[path], prompts_per_step=6, max_prompt_length=10_000)
    train, val = build_prompt_data(cfg, sp_tok, default_seed=7)
    again, _ = build_prompt_data(cfg, sp_tok, default_seed=7)  # another "rank" with the same seed
    other, _ = build_prompt_data(cfg, sp_tok, default_seed=8)
    assert train.num_batches == 3  # 20 prompts, 6 per step, the partial batch dropped
    assert train.order(0) == again.order(0) and train.order(1) == again.order(1)
    assert train.order(0) != train.order(1) and train.order(0) != other.order(0)
    assert sorted(train.order(0)) == list(range(20))

    steps = [next(train).indices for _ in range(4)]  # runs into epoch 1
    assert all(len(s) == 6 for s in steps)
    assert steps[:3] == [b.indices for b in train.epoch_batches(0)]
    assert steps[3] == next(iter(train.epoch_batches(1))).indices and train.epoch == 1

    resumed, _ = build_prompt_data(cfg, sp_tok, default_seed=7)
    resumed.load_state_dict(train.state_dict())
    assert next(resumed).indices == next(train).indices
    with pytest.raises(ValueError, match="resume with the same data.seed"):
        other.load_state_dict(train.state_dict())

    assert val.num_batches == 1 and val.order(0) == list(range(20)) and len(next(val)) == 20
    no_shuffle = PromptBatches(train.dataset, 6, shuffle=False, seed=0)
    assert no_shuffle.order(3) == list(range(20))


def _error(call, match, *names):
    with pytest.raises(ValueError, match=match) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, (name, message)
    return message


def test_bad_inputs_give_one_line_errors(sp_tok, tmp_path):
    load = lambda *files, **kw: lambda: load_prompts([str(f) for f in files], sp_tok, **kw)  # noqa: E731
    missing = tmp_path / "missing.parquet"
    _error(load(missing), "does not exist", str(missing))
    csv = tmp_path / "t.csv"
    csv.write_text("a,b\n")
    _error(load(csv), "unsupported extension '.csv'.*parquet or .jsonl", str(csv))

    no_prompt = _write_parquet(tmp_path / "cols.parquet", [{"question": "q", "answer": "a"}])
    msg = _error(load(no_prompt), "no column 'prompt'", no_prompt, "data.prompt_key")
    assert "answer, question" in msg  # lists the columns it has
    _error(load(no_prompt, prompt_key="question"), "no column 'reward_model.ground_truth'", "data.ground_truth_key")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _error(load(empty), "holds no rows", str(empty))
    empty_parquet = _write_parquet(tmp_path / "empty.parquet", [])
    _error(load(empty_parquet), "holds no rows")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", answer: 2}\n')
    _error(load(bad, ground_truth_key="answer"), "line 3 is not valid JSON", str(bad))
    not_object = tmp_path / "list.jsonl"
    not_object.write_text('["a"]\n')
    _error(load(not_object), "line 1 holds a JSON list")

    odd = _write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "ok", "answer": "1"}, {"prompt": 5, "answer": "2"}])
    _error(load(odd, ground_truth_key="answer"), "row 1: a prompt must be text", odd)
    huge_id = _write_jsonl(tmp_path / "ids.jsonl", [{"prompt": [1, 10_000], "answer": "1"}])
    _error(load(huge_id, ground_truth_key="answer"), "outside the tokenizer's vocabulary")
    no_truth = _write_jsonl(tmp_path / "nt.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    _error(load(no_truth, ground_truth_key="answer"), "row 1 has no 'answer'")
    assert load_prompts([no_truth], sp_tok, ground_truth_key=None).items[1].ground_truth is None

    rows = _verl_rows(3)
    small = _write_parquet(tmp_path / "small.parquet", rows)
    cfg = DataConfig(train_files=[small], prompts_per_step=4)
    _error(lambda: build_prompt_data(cfg, sp_tok, default_seed=0), "3 prompts .* make no batch of 4", "data.prompts_per_step")


def test_data_config_validation():
    cfg = build(DataConfig, {"train_files": ["a.parquet", "b.jsonl"], "max_prompt_length": "256", "seed": "null"})
    assert cfg.max_prompt_length == 256 and cfg.seed is None
    for bad, match in [
        ({"train_files": ["a.csv"]}, r"train_files\[0\].*unsupported extension"),
        ({"val_files": [""]}, r"val_files\[0\] must be a file path"),
        ({"max_prompt_length": 0}, "max_prompt_length must be a positive integer"),
        ({"prompts_per_step": -1}, "prompts_per_step"),
        ({"val_prompts_per_step": 0}, "val_prompts_per_step"),
        ({"prompt_key": ""}, "prompt_key must name a column"),
        ({"ground_truth_key": ""}, "ground_truth_key"),
        ({"prompt_column": "q"}, "did you mean 'prompt_key'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            build(DataConfig, bad)
