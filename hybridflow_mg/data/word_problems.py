"""One-step arithmetic word problems for a real chat model (the `launch/real_model.sh` example).

    Mia has 7 marbles. She finds 5 more. How many marbles does Mia have now?   → 12

Each problem is posed as one user message (the chat template is applied when the data is read) with
an instruction to end on the number, and written in verl's schema under the data source
`synthetic/word_problems`; the answer is scored like GSM8K with the flexible extraction (the last
number of the response), `reward: {fn: gsm8k, options: {flexible: true}}`.

    python -m hybridflow_mg.data.word_problems OUT_DIR [--num-train N] [--num-val N] [--seed S]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from hybridflow_mg.data.synthetic import Example, to_verl_rows, write_parquet

SOURCE = "synthetic/word_problems"
INSTRUCTION = "Answer with the number."
_NAMES = [("Mia", "She"), ("Leo", "He"), ("Ava", "She"), ("Sam", "He"), ("Zoe", "She"), ("Max", "He"),
          ("Ivy", "She"), ("Ben", "He"), ("Lily", "She"), ("Tom", "He")]
_ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells", "cards", "coins"]
_ADD = ["{name} has {a} {items}. {he} finds {b} more. How many {items} does {name} have now?",
        "{name} has {a} {items} and buys {b} more. How many {items} does {name} have?",
        "There are {a} {items} in a box. {name} puts in {b} more. How many {items} are in the box?"]
_SUB = ["{name} has {a} {items}. {he} gives {b} to a friend. How many {items} does {name} have left?",
        "{name} had {a} {items} and lost {b}. How many {items} are left?"]


def word_problem_examples(num: int, *, seed: int, max_operand: int = 20) -> list[Example]:
    """`num` distinct problems (addition, and subtraction without negatives) with operands in
    1 … max_operand; deterministic in `seed`. Raises ValueError when fewer distinct ones exist."""
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(num * 100):
        if len(out) == num:
            break
        (name, he), items = rng.choice(_NAMES), rng.choice(_ITEMS)
        a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
        if rng.random() < 0.5:
            template, answer = rng.choice(_ADD), a + b
        else:
            a, b = max(a, b), min(a, b)
            template, answer = rng.choice(_SUB), a - b
        prompt = template.format(name=name, he=he, a=a, b=b, items=items) + " " + INSTRUCTION
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append(Example(prompt=prompt, answer=str(answer), ground_truth=str(answer), data_source=SOURCE))
    if len(out) < num:
        raise ValueError(f"found only {len(out)} distinct word problems with max_operand={max_operand}; asked for {num}")
    return out


def write_word_problems(directory: str | Path, *, num_train: int, num_val: int, seed: int = 0,
                        max_operand: int = 20) -> tuple[Path, Path]:
    """`train.parquet` and `val.parquet` (verl schema, disjoint problems) in `directory`."""
    examples = word_problem_examples(num_train + num_val, seed=seed, max_operand=max_operand)
    out = Path(directory)
    return (write_parquet(to_verl_rows(examples[:num_train], split="train"), out / "train.parquet"),
            write_parquet(to_verl_rows(examples[num_train:], split="val"), out / "val.parquet"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridflow_mg.data.word_problems",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--num-train", type=int, default=512)
    parser.add_argument("--num-val", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-operand", type=int, default=20)
    args = parser.parse_args(argv)
    for path in write_word_problems(args.out_dir, num_train=args.num_train, num_val=args.num_val, seed=args.seed,
                                    max_operand=args.max_operand):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
