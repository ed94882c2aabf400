"""Prompt datasets: read parquet/jsonl, tokenize, handle over-long prompts, and batch in a seeded order.

    train, val = build_prompt_data(cfg.data, tokenizer, default_seed=cfg.run.seed)
    batch = next(train)            # PromptBatch of cfg.data.prompts_per_step prompts
    batch.prompt_ids, batch.ground_truths, batch.data_sources, batch.extra_infos, batch.indices

Every rank runs this with the same files and seed and gets the same batches in the same order; the
trainer decides which rank generates for which prompt. All prompts are tokenized once at load time,
so the length check is exact (templated ids are what is measured) and the number of prompts dropped or
truncated (`data.truncation`) is known before the first step.

A user mistake in the data (missing file, unknown extension, absent column, malformed jsonl line,
nothing left to train on) is one ValueError line naming the file and the fix.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from hybridflow_mg.data.config import SUPPORTED_EXTENSIONS, DataConfig
from hybridflow_mg.data.tokenizer import Tokenizer

_MISSING = object()


@dataclass(frozen=True)
class PromptItem:
    """One prompt, ready for the rollout."""

    index: int
    """Row position in the concatenated files (stable under filtering and shuffling)."""
    prompt_ids: list[int]
    """Token ids of the prompt, chat template applied."""
    ground_truth: Any
    """The reference answer as stored (usually a string); None when the config names no column."""
    data_source: str
    """The dataset the prompt comes from, e.g. `openai/gsm8k`; selects the reward function."""
    extra_info: dict = field(default_factory=dict)
    """Per-prompt metadata for the reward function."""


@dataclass(frozen=True)
class PromptBatch:
    """The prompts of one step, in order, with their fields as columns."""

    items: list[PromptItem]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def prompt_ids(self) -> list[list[int]]:
        return [it.prompt_ids for it in self.items]

    @property
    def ground_truths(self) -> list[Any]:
        return [it.ground_truth for it in self.items]

    @property
    def data_sources(self) -> list[str]:
        return [it.data_source for it in self.items]

    @property
    def extra_infos(self) -> list[dict]:
        return [it.extra_info for it in self.items]

    @property
    def indices(self) -> list[int]:
        return [it.index for it in self.items]


@dataclass(frozen=True)
class PromptDataset:
    """The prompts of some files, each within `max_prompt_length` tokens, and how many were not."""

    items: list[PromptItem]
    files: list[str]
    num_rows: int
    """Rows read, before the length check."""
    num_dropped_too_long: int
    """Rows dropped because their prompt has more than `max_prompt_length` tokens (truncation=drop)."""
    max_prompt_length: int
    num_truncated: int = 0
    """Prompts cut to `max_prompt_length` tokens (truncation=left or right)."""

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> str:
        """One line: prompts kept, and how many were dropped or truncated for length."""
        cut = f"{self.num_dropped_too_long} dropped and {self.num_truncated} truncated"
        return (f"{len(self.items)} prompts from {len(self.files)} file(s) ({self.num_rows} rows); {cut} as longer "
                f"than max_prompt_length={self.max_prompt_length} tokens")


def read_rows(path: str | Path) -> list[dict]:
    """All rows of a .parquet or .jsonl file as dicts (parquet structs become dicts, lists lists)."""
    path = Path(path)
    _check_not_dir(path)
    if not path.suffix or not str(path).endswith(SUPPORTED_EXTENSIONS):
        raise ValueError(
            f"data file {str(path)!r} has an unsupported extension {path.suffix!r}; use {' or '.join(SUPPORTED_EXTENSIONS)}"
        )
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist; check data.train_files / data.val_files")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's ArrowInvalid & co.: not a parquet file, truncated, ...
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"data file {str(path)!r} cannot be read as parquet: {first}") from None
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"data file {str(path)!r} line {line_no} is not valid JSON ({e.msg}, column {e.colno}); "
                    "each line must hold one JSON object"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"data file {str(path)!r} line {line_no} holds a JSON {type(row).__name__}, not an object; "
                    "each line must hold one JSON object"
                )
            rows.append(row)
    return rows


def lookup(row: Mapping[str, Any], key: str) -> Any:
    """`row[key]`, or the nested field for a dotted key (`reward_model.ground_truth`); _MISSING if absent."""
    if key in row:
        return row[key]
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def encode_prompt(tokenizer: Tokenizer, prompt: Any, *, text_as_chat: bool = False) -> list[int]:
    """Token ids of one prompt: chat messages through the chat template, text encoded (BOS prepended
    when the tokenizer has one; or as one user message with `text_as_chat`), ids passed through.

    The one place prompts are tokenized, shared with the SFT warm start so both see the same ids.
    A prompt of another shape raises ValueError (the caller adds the row).
    """
    if isinstance(prompt, str):
        if text_as_chat:
            return tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        return tokenizer.encode(prompt, add_bos=True)
    if isinstance(prompt, (list, tuple)) and prompt:
        if all(isinstance(m, Mapping) for m in prompt):
            if not all(isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt):
                raise ValueError("chat messages need a string 'role' and 'content' each")
            return tokenizer.apply_chat_template(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the tokenizer's vocabulary [0, {tokenizer.vocab_size})")
            return list(prompt)
    raise ValueError(
        f"a prompt must be text, a non-empty list of chat messages, or a non-empty list of token ids; got {str(prompt)[:80]!r}"
    )


def _columns_hint(rows: list[dict]) -> str:
    return ", ".join(sorted({k for row in rows[:100] for k in row})) or "none"


def load_prompts(
    files: Sequence[str],
    tokenizer: Tokenizer,
    *,
    prompt_key: str = "prompt",
    ground_truth_key: str | None = "reward_model.ground_truth",
    data_source_key: str = "data_source",
    default_data_source: str = "",
    extra_info_key: str = "extra_info",
    text_prompts_as_chat: bool = False,
    max_prompt_length: int = 1024,
    truncation: str = "error",
) -> PromptDataset:
    """Read and tokenize the prompts of `files`, applying `truncation` (error, drop, left, right; see
    `DataConfig.truncation`) to those over `max_prompt_length` tokens. Raises one-line ValueErrors."""
    if not files:
        raise ValueError("no data files given; set data.train_files (parquet or jsonl)")
    items: list[PromptItem] = []
    num_rows = num_dropped = num_truncated = 0
    for path in files:
        rows = read_rows(path)
        if not rows:
            raise ValueError(f"data file {str(path)!r} holds no rows; remove it from the file list or fill it")
        for key, fix in ((prompt_key, "data.prompt_key"), (ground_truth_key, "data.ground_truth_key")):
            if key is not None and lookup(rows[0], key) is _MISSING:
                raise ValueError(
                    f"data file {str(path)!r} has no column {key!r} (columns: {_columns_hint(rows)}); set {fix} to the right column"
                )
        for row_no, row in enumerate(rows):
            where = f"data file {str(path)!r} row {row_no}"
            try:
                ids = encode_prompt(tokenizer, lookup(row, prompt_key), text_as_chat=text_prompts_as_chat)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            truth = None
            if ground_truth_key is not None:
                truth = lookup(row, ground_truth_key)
                if truth is _MISSING or truth is None:
                    raise ValueError(
                        f"{where} has no {ground_truth_key!r}; every prompt needs a ground truth (or set data.ground_truth_key to null)"
                    )
            source = lookup(row, data_source_key)
            source = default_data_source if source is _MISSING or source is None else str(source)
            info = row.get(extra_info_key) or {}
            if not isinstance(info, Mapping):
                raise ValueError(f"{where}: {extra_info_key!r} must be an object/struct, got {type(info).__name__}")
            index = num_rows
            num_rows += 1
            if len(ids) > max_prompt_length:
                if truncation == "error":
                    raise ValueError(f"{where}: the prompt has {len(ids)} tokens after the chat template, more than "
                                     f"data.max_prompt_length={max_prompt_length}; raise it, shorten the prompt, or "
                                     f"set data.truncation to drop, left or right")
                if truncation == "drop":
                    num_dropped += 1
                    continue
                ids = ids[-max_prompt_length:] if truncation == "left" else ids[:max_prompt_length]
                num_truncated += 1
            items.append(PromptItem(index=index, prompt_ids=ids, ground_truth=truth, data_source=source, extra_info=dict(info)))
    if not items:
        raise ValueError(
            f"all {num_rows} prompts in {', '.join(map(repr, map(str, files)))} are longer than max_prompt_length="
            f"{max_prompt_length} tokens ({num_dropped} dropped); raise data.max_prompt_length or shorten the prompts"
        )
    return PromptDataset(
        items=items, files=[str(f) for f in files], num_rows=num_rows, num_dropped_too_long=num_dropped,
        max_prompt_length=max_prompt_length, num_truncated=num_truncated,
    )


class PromptBatches:
    """Fixed-size batches of a dataset in a seeded per-epoch order; an endless iterator over epochs.

    The order of epoch e depends only on (seed, e), so every rank given the same seed sees the same
    batches, and a resumed run continues exactly where `state_dict()` was taken.
    """

    def __init__(self, dataset: PromptDataset, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool = True):
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if drop_last and len(dataset) < batch_size:
            raise ValueError(
                f"{len(dataset)} prompts ({dataset.num_dropped_too_long} dropped as too long) make no batch of "
                f"{batch_size}; lower data.prompts_per_step or add prompts"
            )
        self.dataset, self.batch_size, self.shuffle, self.seed, self.drop_last = dataset, batch_size, shuffle, seed, drop_last
        self.epoch, self.step_in_epoch = 0, 0
        self._cached_order: tuple[int, list[int]] = (-1, [])

    @property
    def num_batches(self) -> int:
        """Batches per epoch."""
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch: int) -> list[int]:
        """Item positions in the order of `epoch` (a seeded permutation when shuffling)."""
        return list(self._order(epoch))

    def _order(self, epoch: int) -> list[int]:
        if self._cached_order[0] != epoch:  # one permutation per epoch, not one per step
            order = list(range(len(self.dataset)))
            if self.shuffle:
                random.Random(f"hybridflow_mg.data:{self.seed}:{epoch}").shuffle(order)  # str seeds hash stably
            self._cached_order = (epoch, order)
        return self._cached_order[1]

    def _batch(self, epoch: int, step: int) -> PromptBatch:
        order = self._order(epoch)
        return PromptBatch([self.dataset.items[i] for i in order[step * self.batch_size:(step + 1) * self.batch_size]])

    def epoch_batches(self, epoch: int) -> Iterator[PromptBatch]:
        """The batches of one epoch, in order (does not move the iterator)."""
        for step in range(self.num_batches):
            yield self._batch(epoch, step)

    def __iter__(self) -> "PromptBatches":
        return self

    def __next__(self) -> PromptBatch:
        if self.step_in_epoch >= self.num_batches:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.step_in_epoch += 1
        return self._batch(self.epoch, self.step_in_epoch - 1)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed, "num_prompts": len(self.dataset)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from `state`; a different seed or prompt count would silently change the order, so it is refused."""
        if state["seed"] != self.seed or state["num_prompts"] != len(self.dataset):
            raise ValueError(
                f"data state was saved with seed={state['seed']} and {state['num_prompts']} prompts; this run has "
                f"seed={self.seed} and {len(self.dataset)}: resume with the same data.seed, files and max_prompt_length"
            )
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])


def build_prompt_data(cfg: DataConfig, tokenizer: Tokenizer, *, default_seed: int) -> tuple[PromptBatches, PromptBatches | None]:
    """Training batches (shuffled, fixed size) and validation batches (file order, all kept) from `cfg`."""
    keys = dict(
        prompt_key=cfg.prompt_key,
        ground_truth_key=cfg.ground_truth_key,
        data_source_key=cfg.data_source_key,
        default_data_source=cfg.default_data_source,
        extra_info_key=cfg.extra_info_key,
        text_prompts_as_chat=cfg.text_prompts_as_chat,
        max_prompt_length=cfg.max_prompt_length,
        truncation=cfg.truncation,
    )
    seed = cfg.seed if cfg.seed is not None else default_seed
    train = PromptBatches(load_prompts(cfg.train_files, tokenizer, **keys), cfg.prompts_per_step, shuffle=cfg.shuffle, seed=seed)
    if not cfg.val_files:
        return train, None
    val_set = load_prompts(cfg.val_files, tokenizer, **keys)
    return train, PromptBatches(val_set, cfg.val_prompts_per_step or len(val_set), shuffle=False, seed=seed, drop_last=False)


def check_files(cfg: DataConfig) -> None:
    """Cheap checks of the configured files before any process starts: they exist, can be read, are not
    empty, and have the prompt and ground-truth columns. Reads parquet schemas and the first jsonl row
    only; `load_prompts` later checks every row."""
    for files, where in ((cfg.train_files, "data.train_files"), (cfg.val_files, "data.val_files")):
        for path in files:
            columns, num_rows = _peek(Path(path))
            if num_rows == 0:
                raise ValueError(f"data file {path!r} ({where}) holds no rows; remove it from the file list or fill it")
            for key, fix in ((cfg.prompt_key, "data.prompt_key"), (cfg.ground_truth_key, "data.ground_truth_key")):
                if key is not None and lookup(columns, key) is _MISSING:
                    raise ValueError(f"data file {path!r} has no column {key!r} (columns: {', '.join(sorted(columns))}); "
                                     f"set {fix} to the right column")


def _check_not_dir(path: Path) -> None:
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.name.endswith(SUPPORTED_EXTENSIONS))[:3]
        hint = f" (it holds {', '.join(inside)}{', ...' if inside else ''})" if inside else ""
        raise ValueError(f"data file {str(path)!r} is a directory{hint}; list the files themselves in "
                         "data.train_files / data.val_files")


def _peek(path: Path) -> tuple[dict, int]:
    """(a mapping with the file's column names — nested for structs — , rows or -1 when unknown)."""
    _check_not_dir(path)
    if not str(path).endswith(SUPPORTED_EXTENSIONS):
        raise ValueError(f"data file {str(path)!r} has an unsupported extension; use {' or '.join(SUPPORTED_EXTENSIONS)}")
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist; check data.train_files / data.val_files")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - not parquet, truncated
            raise ValueError(f"data file {str(path)!r} cannot be read as parquet: {str(e).splitlines()[0]}") from None

        def names(fields) -> dict:
            return {f.name: names(list(f.type)) if pa.types.is_struct(f.type) else None for f in fields}

        return names(meta.schema_arrow), meta.metadata.num_rows
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"data file {str(path)!r} line 1 is not valid JSON ({e.msg})") from None
                return (row if isinstance(row, dict) else {}), -1
    return {}, 0
