"""Synthetic tasks for the CPU quickstart: learning that shows within minutes on a tiny model.

`arithmetic` (the default): `23+41=` → `64`. With operands below 100 the answer has at most three
digits; with one token per digit (`train_sentencepiece(split_digits=True)`) a 1–5M-parameter model
gets a fair share right after a short supervised warm start and RL visibly raises the rest.
`countdown`: reach a target with a few small numbers and + − × ÷, a harder task for larger models.

    task = make_synthetic_task("runs/quick/data", num_train=4000, num_val=200, seed=0)
    task.train_file, task.val_file, task.tokenizer_file       # verl-schema parquet + tokenizer
    warm_start_pairs(task.train_examples, tokenizer)          # (prompt ids, answer ids + EOS) for SFT

Rows are written in verl's schema (`prompt` messages, `data_source`, `reward_model.ground_truth`,
`extra_info`), so the quickstart reads them through the same path as real datasets; the reward
functions `arithmetic` and `countdown` are registered in `hybridflow_mg.rewards` and picked by the
data-source names below.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hybridflow_mg.data.datasets import encode_prompt
from hybridflow_mg.data.tokenizer import Tokenizer, train_sentencepiece

ARITHMETIC_SOURCE = "synthetic/arithmetic"
COUNTDOWN_SOURCE = "synthetic/countdown"
_ALPHABET = "0123456789 +-*/()=:"  # every character the tasks write, so none becomes <unk>


@dataclass(frozen=True)
class Example:
    """One problem: what the model sees, the completion that scores 1.0, and the stored ground truth."""

    prompt: str
    answer: str
    ground_truth: str
    data_source: str


def arithmetic_examples(num: int, *, seed: int, max_operand: int = 99, ops: Sequence[str] = ("+",)) -> list[Example]:
    """`num` distinct problems `a{op}b=` with 0 <= a, b <= max_operand (for `-`, a >= b: no negatives).

    Deterministic in `seed`. Asking for more problems than exist is a ValueError.
    """
    if not set(ops) <= {"+", "-"} or not ops:
        raise ValueError(f"arithmetic ops must be a non-empty subset of '+', '-'; got {list(ops)}")
    space = (max_operand + 1) ** 2 * len(ops)
    if num > space:
        raise ValueError(f"only about {space} distinct problems exist with max_operand={max_operand}; asked for {num}")
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < num:
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(list(ops))
        if op == "-" and a < b:
            a, b = b, a
        prompt = f"{a}{op}{b}="
        if prompt in seen:
            continue
        seen.add(prompt)
        answer = str(a + b if op == "+" else a - b)
        out.append(Example(prompt=prompt, answer=answer, ground_truth=answer, data_source=ARITHMETIC_SOURCE))
    return out


def _countdown_problem(
    rng: random.Random, num_numbers: int, max_number: int, max_target: int
) -> tuple[list[int], str, int] | None:
    numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
    expr, value = str(numbers[0]), numbers[0]
    for n in numbers[1:]:
        op = rng.choice("+-*/")
        if op == "/" and (value % n != 0):
            op = "+"
        if op == "-" and value - n <= 0:
            op = "+"
        value = {"+": value + n, "-": value - n, "*": value * n, "/": value // n}[op]
        expr = f"({expr}){op}{n}" if op in "*/" and not expr.isdigit() else f"{expr}{op}{n}"
    if not 0 < value <= max_target:
        return None
    shown = numbers[:]
    rng.shuffle(shown)
    return shown, expr, value


def countdown_examples(num: int, *, seed: int, num_numbers: int = 3, max_number: int = 9, max_target: int = 100) -> list[Example]:
    """`num` distinct countdown puzzles with a known solution (built by combining the numbers left to
    right with + − × ÷, division only when exact). Deterministic in `seed`."""
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(num * 1000):
        if len(out) == num:
            break
        problem = _countdown_problem(rng, num_numbers, max_number, max_target)
        if problem is None:
            continue
        numbers, expr, target = problem
        # no trailing space: a space merged into the answer's first piece would tokenize differently
        # when prompt and answer are encoded apart (SFT pairs, RL rollouts) than together
        prompt = f"Use {' '.join(map(str, numbers))} to make {target}:"
        if prompt in seen:
            continue
        seen.add(prompt)
        truth = json.dumps({"target": target, "numbers": numbers})
        out.append(Example(prompt=prompt, answer=expr, ground_truth=truth, data_source=COUNTDOWN_SOURCE))
    if len(out) < num:
        raise ValueError(f"found only {len(out)} distinct countdown puzzles for these settings; asked for {num}")
    return out


def chat_prompt(example: Example) -> list[dict[str, str]]:
    """The prompt as verl's one-message chat list (what the data files hold)."""
    return [{"role": "user", "content": example.prompt}]


def to_verl_rows(examples: Sequence[Example], *, split: str = "train") -> list[dict]:
    """Rows in verl's schema; `extra_info` carries the split, the position and the reference answer."""
    return [
        {
            "data_source": ex.data_source,
            "prompt": chat_prompt(ex),
            "ability": "arithmetic",
            "reward_model": {"style": "rule", "ground_truth": ex.ground_truth},
            "extra_info": {"split": split, "index": i, "answer": ex.answer},
        }
        for i, ex in enumerate(examples)
    ]


def write_parquet(rows: Sequence[dict], path: str | Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(list(rows)), path)
    return path


def write_jsonl(rows: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def tokenizer_corpus(examples: Sequence[Example]) -> list[str]:
    """Texts to train the tiny tokenizer on: every prompt and completion, and the tasks' alphabet
    one character per text (so it adds characters, not merges)."""
    return [ex.prompt + ex.answer for ex in examples] + [ex.answer for ex in examples] + list(_ALPHABET)


def warm_start_texts(examples: Sequence[Example], *, eos_text: str) -> list[str]:
    """`prompt + answer + eos_text` strings for a supervised warm start on raw text.

    Only right when the trainer's tokenizer turns `eos_text` into the EOS id (HF tokenizers do for
    their special tokens; sentencepiece never does) and splits prompt and answer at the same place as
    a separate encoding would; `warm_start_pairs` has neither caveat.
    """
    return [ex.prompt + ex.answer + eos_text for ex in examples]


def warm_start_pairs(examples: Sequence[Example], tokenizer: Tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids + EOS) per example: the prompt tokenized exactly as the RL dataset
    tokenizes the written rows, so SFT and RL condition on the same ids."""
    return [
        (encode_prompt(tokenizer, chat_prompt(ex)), tokenizer.encode(ex.answer) + [tokenizer.eos_id]) for ex in examples
    ]


@dataclass(frozen=True)
class SyntheticTask:
    """What `make_synthetic_task` wrote."""

    train_file: Path
    val_file: Path
    tokenizer_file: Path
    train_examples: list[Example]
    val_examples: list[Example]


def make_synthetic_task(
    directory: str | Path,
    *,
    task: str = "arithmetic",
    num_train: int = 4000,
    num_val: int = 200,
    seed: int = 0,
    vocab_size: int = 64,
    max_operand: int | None = None,
) -> SyntheticTask:
    """Write `train.parquet`, `val.parquet` (verl schema, disjoint problems) and `tokenizer.model` into
    `directory`; deterministic in `seed`. `max_operand` bounds arithmetic operands (smaller is easier)."""
    make = {"arithmetic": arithmetic_examples, "countdown": countdown_examples}.get(task)
    if make is None:
        raise ValueError(f"unknown synthetic task {task!r}; choose arithmetic or countdown")
    options = {"max_operand": max_operand} if task == "arithmetic" and max_operand is not None else {}
    examples = make(num_train + num_val, seed=seed, **options)
    train, val = examples[:num_train], examples[num_train:]
    out = Path(directory)
    return SyntheticTask(
        train_file=write_parquet(to_verl_rows(train, split="train"), out / "train.parquet"),
        val_file=write_parquet(to_verl_rows(val, split="val"), out / "val.parquet"),
        tokenizer_file=train_sentencepiece(tokenizer_corpus(examples), out / "tokenizer.model", vocab_size=vocab_size),
        train_examples=train,
        val_examples=val,
    )
