"""Config of the prompt data: files, columns, tokenizer, length limit, order and batch size."""
from __future__ import annotations

from dataclasses import dataclass, field

SUPPORTED_EXTENSIONS = (".parquet", ".jsonl")
TRUNCATIONS = ("error", "drop", "left", "right")


def _check_files(key: str, files: list[str]) -> None:
    for i, f in enumerate(files):
        if not isinstance(f, str) or not f.strip():
            raise ValueError(f"{key}[{i}] must be a file path; got {f!r}")
        if not f.endswith(SUPPORTED_EXTENSIONS):
            raise ValueError(f"{key}[{i}] = {f!r} has an unsupported extension; use {' or '.join(SUPPORTED_EXTENSIONS)}")


@dataclass(kw_only=True)
class DataConfig:
    """Prompt datasets for RL: verl's parquet schema as-is, or plain parquet/jsonl columns.

    verl schema: `prompt` (chat messages), `data_source`, `reward_model.ground_truth`, `extra_info` —
    the defaults below read it unchanged. Plain schema: point `prompt_key` at a column of text or of
    token-id lists and `ground_truth_key` at the answers.
    """

    train_files: list[str] = field(default_factory=list)
    """Training prompt files (.parquet or .jsonl), read in this order and concatenated."""
    val_files: list[str] = field(default_factory=list)
    """Validation prompt files; empty means no validation set."""
    tokenizer: str | None = None
    """HF tokenizer directory or sentencepiece `.model` file; left out, the actor's checkpoint directory."""
    prompt_key: str = "prompt"
    """Column holding the prompt: a list of `{role, content}` messages (chat template applied), a text
    (encoded as-is, BOS prepended when the tokenizer has one), or a list of token ids (used as-is)."""
    ground_truth_key: str | None = "reward_model.ground_truth"
    """Column with the reference answer the reward function gets; dotted for a field of a struct
    column (verl: `reward_model.ground_truth`). None for prompts without one (reward-model-only runs)."""
    data_source_key: str = "data_source"
    """Column naming each prompt's dataset (selects the reward function); may be absent from a file."""
    default_data_source: str = ""
    """Data source of prompts from files without `data_source_key`, e.g. `openai/gsm8k` for a plain
    jsonl of GSM8K questions."""
    extra_info_key: str = "extra_info"
    """Column of per-prompt metadata (a struct / JSON object) handed to the reward function; optional."""
    text_prompts_as_chat: bool = False
    """Wrap text prompts as one user message and apply the chat template (for chat models fed
    plain-text prompts); off, text is encoded as written."""
    max_prompt_length: int = 1024
    """Longest prompt in tokens, measured after the chat template; what happens to a longer one is
    `truncation`."""
    truncation: str = "error"
    """A prompt longer than max_prompt_length: ``error`` stops before the run starts, naming the row;
    ``drop`` leaves it out; ``left`` keeps its last max_prompt_length tokens (cuts the start: BOS and a
    system prompt go first); ``right`` keeps its first ones (cuts the end, and with it the chat
    template's assistant header, so the model no longer sees its turn begin). The number dropped
    or truncated is printed at the start and logged with step 1 (`data/*` metrics)."""
    prompts_per_step: int = 32
    """Prompts per training step (each is sampled n times by the rollout); the last partial batch of
    an epoch is dropped so every step has this many."""
    val_prompts_per_step: int | None = None
    """Prompts per validation batch; left out, the whole validation set is one batch."""
    shuffle: bool = True
    """Shuffle the training prompts each epoch (a new order per epoch, the same on every rank)."""
    seed: int | None = None
    """Seed of the epoch order; left out, the run seed (`run.seed`)."""

    def __post_init__(self):
        _check_files("train_files", self.train_files)
        _check_files("val_files", self.val_files)
        for key in ("prompt_key", "data_source_key", "extra_info_key"):
            if not getattr(self, key):
                raise ValueError(f"{key} must name a column")
        if self.ground_truth_key == "":
            raise ValueError("ground_truth_key must name a column, or be null for prompts without one")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {', '.join(TRUNCATIONS)}, got {self.truncation!r}")
        for key in ("max_prompt_length", "prompts_per_step"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if self.val_prompts_per_step is not None and (
            isinstance(self.val_prompts_per_step, bool) or self.val_prompts_per_step <= 0
        ):
            raise ValueError(f"val_prompts_per_step must be a positive integer or null, got {self.val_prompts_per_step!r}")
