"""The run's inputs, read and checked without any process group: prompts, tokenizer, the actor's spec.

`load_inputs` is what every rank builds the run from, and what `hybridflow-mg train --nproc N` runs
before it starts a worker: a bad data row, a missing tokenizer, prompts that are all too long, or
sequences longer than the model's context are one line and exit status 2 before anything is launched
or written.
"""
from __future__ import annotations

from hybridflow_mg.data.datasets import PromptBatches, build_prompt_data
from hybridflow_mg.data.tokenizer import Tokenizer
from hybridflow_mg.models.hf_spec import ModelSpec, read_hf_config, spec_from_hf
from hybridflow_mg.trainer.config import TrainConfig


def check_lengths(cfg: TrainConfig, spec: ModelSpec) -> None:
    """The longest sequence, data.max_prompt_length + rollout.max_new_tokens, must fit the model's
    context (`max_position_embeddings`, or `rollout.max_model_len` when set) and its sliding window,
    which training does not apply: a one-line ValueError otherwise (nothing is capped silently)."""
    longest = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    context, key = ((cfg.rollout.max_model_len, "rollout.max_model_len") if cfg.rollout.max_model_len is not None
                    else (spec.max_position_embeddings, f"the model's max_position_embeddings ({cfg.model.path})"))
    if longest > context:
        raise ValueError(f"data.max_prompt_length + rollout.max_new_tokens = {cfg.data.max_prompt_length} + "
                         f"{cfg.rollout.max_new_tokens} = {longest} tokens exceed {key} = {context}; lower one of them")
    if spec.sliding_window is not None and longest > spec.sliding_window:
        raise ValueError(f"sequences of up to {longest} tokens exceed the model's sliding window "
                         f"{spec.sliding_window}, which training does not apply; keep data.max_prompt_length + "
                         f"rollout.max_new_tokens ≤ {spec.sliding_window}")


def load_inputs(cfg: TrainConfig) -> tuple[Tokenizer, tuple[PromptBatches, PromptBatches | None], ModelSpec]:
    """(tokenizer, (train batches, validation batches or None), the actor's spec): every prompt of every
    data file read and tokenized, and the lengths checked against the model. No process group is
    needed, so the launcher runs it too, before it starts any worker. Raises one-line ValueErrors."""
    tokenizer = Tokenizer.from_path(cfg.data.tokenizer or cfg.model.path)
    batches = build_prompt_data(cfg.data, tokenizer, default_seed=cfg.run.seed)
    spec = spec_from_hf(read_hf_config(cfg.model.path), head="lm", vocab_divisor=cfg.model.vocab_divisor)
    check_lengths(cfg, spec)
    return tokenizer, batches, spec
