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


def check_lengths(cfg: TrainConfig, spec: ModelSpec, longest_prompt: int | None = None) -> None:
    """The longest sequence, the longest prompt kept (`longest_prompt`, at most data.max_prompt_length;
    that bound when not given) + rollout.max_new_tokens, must fit the context vLLM gets (the smaller of
    `rollout.max_model_len` and the model's `max_position_embeddings`, where set) and the model's
    sliding window, which training does not apply: a one-line ValueError otherwise (nothing is capped
    silently)."""
    prompt = cfg.data.max_prompt_length if longest_prompt is None else min(longest_prompt, cfg.data.max_prompt_length)
    longest = prompt + cfg.rollout.max_new_tokens
    what = f"{'the longest prompt' if longest_prompt is not None else 'data.max_prompt_length'} + rollout.max_new_tokens"
    limits = [(cfg.rollout.max_model_len, "rollout.max_model_len")] if cfg.rollout.max_model_len is not None else []
    if "max_position_embeddings" in spec.hf_config:
        limits.append((spec.max_position_embeddings, f"the model's max_position_embeddings ({cfg.model.path})"))
    for context, key in limits:
        if longest > context:
            raise ValueError(f"{what} = {prompt} + {cfg.rollout.max_new_tokens} = {longest} tokens exceed {key} = "
                             f"{context}; lower rollout.max_new_tokens or data.max_prompt_length")
    if spec.sliding_window is not None and longest > spec.sliding_window:
        raise ValueError(f"sequences of up to {longest} tokens ({what}) exceed the model's sliding window "
                         f"{spec.sliding_window}, which training does not apply; keep them ≤ {spec.sliding_window}")


def load_inputs(cfg: TrainConfig) -> tuple[Tokenizer, tuple[PromptBatches, PromptBatches | None], ModelSpec]:
    """(tokenizer, (train batches, validation batches or None), the actor's spec): every prompt of every
    data file read and tokenized, and the lengths checked against the model. No process group is
    needed, so the launcher runs it too, before it starts any worker. Raises one-line ValueErrors."""
    tokenizer = Tokenizer.from_path(cfg.data.tokenizer or cfg.model.path)
    batches = build_prompt_data(cfg.data, tokenizer, default_seed=cfg.run.seed)
    spec = spec_from_hf(read_hf_config(cfg.model.path), head="lm", vocab_divisor=cfg.model.vocab_divisor)
    kept = [b.dataset for b in batches if b is not None]
    check_lengths(cfg, spec, max(len(item.prompt_ids) for d in kept for item in d.items))
    return tokenizer, batches, spec
