"""The synthetic quickstart tasks: deterministic, self-consistent with their reward functions, and
readable through the ordinary verl-schema data path."""
import pytest

from hybridflow_mg.data import (
    ARITHMETIC_SOURCE,
    DataConfig,
    Tokenizer,
    arithmetic_examples,
    build_prompt_data,
    countdown_examples,
    make_synthetic_task,
    read_rows,
    to_verl_rows,
    warm_start_pairs,
    warm_start_texts,
    write_jsonl,
)
from hybridflow_mg.rewards import RewardConfig, build_reward_fn, score_batch


def test_generators_are_deterministic_and_distinct():
    assert arithmetic_examples(50, seed=3) == arithmetic_examples(50, seed=3)
    assert arithmetic_examples(50, seed=3) != arithmetic_examples(50, seed=4)
    assert countdown_examples(20, seed=3) == countdown_examples(20, seed=3)
    many = arithmetic_examples(2000, seed=0, ops=("+", "-"))
    assert len({ex.prompt for ex in many}) == 2000
    assert all(0 <= int(ex.answer) <= 198 and len(ex.answer) <= 3 for ex in many)  # easy: small answers
    with pytest.raises(ValueError, match="distinct problems"):
        arithmetic_examples(200, seed=0, max_operand=9)
    with pytest.raises(ValueError, match="ops"):
        arithmetic_examples(1, seed=0, ops=("*",))


def test_reward_functions_score_the_tasks_own_answers_one():
    examples = arithmetic_examples(300, seed=1, ops=("+", "-")) + countdown_examples(300, seed=1)
    fn = build_reward_fn(RewardConfig())  # dispatch by data_source picks arithmetic / countdown
    sources = [ex.data_source for ex in examples]
    truths = [ex.ground_truth for ex in examples]
    assert score_batch(fn, [ex.answer for ex in examples], truths, sources) == [1.0] * len(examples)
    wrong = [str(int(ex.answer) + 1) if ex.data_source == ARITHMETIC_SOURCE else "1+1" for ex in examples]
    assert set(score_batch(fn, wrong, truths, sources)) == {0.0}


def test_make_task_files_load_through_the_data_path(tmp_path):
    task = make_synthetic_task(tmp_path / "a", num_train=300, num_val=40, seed=5)
    again = make_synthetic_task(tmp_path / "b", num_train=300, num_val=40, seed=5)
    assert task.train_file.read_bytes() == again.train_file.read_bytes()
    assert task.tokenizer_file.read_bytes() == again.tokenizer_file.read_bytes()
    assert not {e.prompt for e in task.train_examples} & {e.prompt for e in task.val_examples}

    tok = Tokenizer.from_path(task.tokenizer_file)
    for ex in task.train_examples[:50]:
        assert tok.decode(tok.encode(ex.prompt + ex.answer)) == ex.prompt + ex.answer
        assert 0 not in tok.encode(ex.prompt + ex.answer)  # no <unk>

    files = dict(train_files=[str(task.train_file)], val_files=[str(task.val_file)])
    cfg = DataConfig(**files, prompts_per_step=16, max_prompt_length=16)
    train, val = build_prompt_data(cfg, tok, default_seed=0)
    assert len(train.dataset) == 300 and len(val.dataset) == 40 and train.dataset.num_dropped_too_long == 0
    pairs = warm_start_pairs(task.train_examples, tok)
    by_index = {it.index: it for it in train.dataset.items}
    for i, (prompt_ids, answer_ids) in enumerate(pairs[:50]):  # SFT sees the very ids RL will see
        assert prompt_ids == by_index[i].prompt_ids
        assert answer_ids[-1] == tok.eos_id and tok.decode(answer_ids) == task.train_examples[i].answer
        assert by_index[i].ground_truth == task.train_examples[i].answer


def test_countdown_task_and_jsonl_writer(tmp_path):
    task = make_synthetic_task(tmp_path, task="countdown", num_train=50, num_val=10, seed=2)
    rows = read_rows(task.val_file)
    assert rows[0]["data_source"] == "synthetic/countdown" and rows[0]["prompt"][0]["role"] == "user"
    path = write_jsonl(to_verl_rows(task.val_examples, split="val"), tmp_path / "val.jsonl")
    assert read_rows(path) == rows
    assert warm_start_texts(task.val_examples[:1], eos_text="</s>")[0].endswith(task.val_examples[0].answer + "</s>")
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_synthetic_task(tmp_path, task="sudoku")
