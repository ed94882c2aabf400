"""Progress bars (tqdm) for the long phases of a run: warm start, validation, evaluation.

A bar is drawn only where someone watches it: on the logging rank, when stderr is a terminal. Other
ranks never draw one, and tqdm turns the bar off by itself when stderr is a file, a pipe or SLURM's
output (`disable=None`), so logs gain no carriage-return lines and the printed lines stay as they were.
"""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress_bar(iterable: Iterable[T], *, desc: str, total: int | None = None, enabled: bool = True,
                 leave: bool = True) -> "tqdm[T]":
    """`iterable` with a bar on stderr; `enabled=False` (every rank but the logging one) draws nothing."""
    return tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True, disable=None if enabled else True)


def write(line: str) -> None:
    """`line` on stdout, flushed, without tearing a bar that is being drawn (the same text as `print`)."""
    tqdm.write(line)
    sys.stdout.flush()
