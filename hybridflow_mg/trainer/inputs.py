"""The run's inputs, read and checked without any process group: prompts, tokenizer, the actor's spec.

`load_inputs` is what every rank builds the run from, and what `hybridflow-mg train --nproc N` runs
before it starts a worker: a bad data row, a missing tokenizer or one with ids past the model's
vocab_size, prompts that are all too long, sequences longer than the model's context, layouts that do not
split the models, stop tokens outside the vocabulary, or settings this machine cannot run are one line
and exit status 2 before anything is launched or written.
"""
from __future__ import annotations

from pathlib import Path

from hybridflow_mg.data.datasets import PromptBatches, build_prompt_data
from hybridflow_mg.data.tokenizer import Tokenizer, check_fits_model
from hybridflow_mg.models.hf_spec import ModelSpec, check_layout, read_hf_config, spec_from_hf
from hybridflow_mg.models.layouts import check_gen_pp, check_split
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
    if cfg.rollout.max_model_len is not None and "max_position_embeddings" in spec.hf_config \
            and cfg.rollout.max_model_len > spec.max_position_embeddings:
        raise ValueError(f"rollout.max_model_len={cfg.rollout.max_model_len} exceeds the model's max_position_embeddings "
                         f"= {spec.max_position_embeddings} ({cfg.model.path}); lower it, or leave it out (the run "
                         f"then sizes it)")
    for context, key in limits:
        if longest > context:
            raise ValueError(f"{what} = {prompt} + {cfg.rollout.max_new_tokens} = {longest} tokens exceed {key} = "
                             f"{context}; lower rollout.max_new_tokens or data.max_prompt_length")
    if spec.sliding_window is not None and longest > spec.sliding_window:
        raise ValueError(f"sequences of up to {longest} tokens ({what}) exceed the model's sliding window "
                         f"{spec.sliding_window}, which training does not apply; keep them ≤ {spec.sliding_window}")


def engine_max_model_len(cfg: TrainConfig, spec: ModelSpec) -> int:
    """The engine's max_model_len: `rollout.max_model_len`, or left out, what the run can be asked to
    hold: data.max_prompt_length (every prompt the run accepts, `Trainer.generate`'s too) +
    rollout.max_new_tokens, capped at the model's max_position_embeddings. Not the advertised context
    itself: vLLM sizes its KV cache for one such sequence, and 8192 or 131072 tokens do not fit a CPU
    run's cache."""
    if cfg.rollout.max_model_len is not None:
        return cfg.rollout.max_model_len
    needed = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    return min(needed, spec.max_position_embeddings) if "max_position_embeddings" in spec.hf_config else needed


def check_kv_cache(cfg: TrainConfig, spec: ModelSpec) -> None:
    """One line when the engine's KV cache cannot hold one sequence of `engine_max_model_len` tokens
    (known in advance on CPU, where the cache is `rollout.kv_cache_memory_bytes` or 256 MiB; on GPU also
    when that key is set)."""
    import torch

    from hybridflow_mg.rollout import kv_cache

    cache = kv_cache.cache_bytes(cfg.rollout.kv_cache_memory_bytes, on_cpu=not torch.cuda.is_available())
    gen_tp = cfg.parallel.gen.tp or cfg.parallel.train.tp
    names = kv_cache.TRAIN_OPTIONS if cfg.rollout.max_model_len is not None else kv_cache.TRAIN_DERIVED_OPTIONS
    kv_cache.check_fits(engine_max_model_len(cfg, spec), cache, dims=spec.dims, gen_tp=gen_tp,
                        element=kv_cache.element_bytes(cfg.rollout.dtype, spec.hf_config), names=names,
                        gen_pp=cfg.parallel.gen.pp)


def check_device(cfg: TrainConfig) -> None:
    """What this machine cannot run, known before anything is built (one line each): without CUDA,
    model.dtype other than float32 (megatron-core's mixed-precision optimizer keeps its loss scale on
    CUDA) and a rollout.block_size that vLLM's CPU attention refuses; model.layer_spec=te without
    transformer-engine."""
    import torch

    from hybridflow_mg.rollout.vllm_cpu import CPU_BLOCK_MULTIPLE

    if not torch.cuda.is_available():
        if cfg.model.dtype != "float32":
            raise ValueError(f"model.dtype={cfg.model.dtype} needs a GPU (megatron-core's mixed-precision optimizer "
                             "keeps its state on CUDA); use model.dtype=float32 on CPU")
        block = cfg.rollout.block_size
        if block is not None and block % CPU_BLOCK_MULTIPLE:
            nearest = CPU_BLOCK_MULTIPLE * max(1, round(block / CPU_BLOCK_MULTIPLE))
            raise ValueError(f"rollout.block_size={block}: vLLM's CPU attention needs a multiple of "
                             f"{CPU_BLOCK_MULTIPLE}; use {nearest} or leave it out")
    if cfg.model.layer_spec == "te":
        from hybridflow_mg.models.specs import resolve

        try:
            resolve("te")
        except ValueError as e:
            raise ValueError(f"model.layer_spec=te: {e}") from None


def model_specs(cfg: TrainConfig, spec: ModelSpec) -> list[tuple[str, str, ModelSpec]]:
    """(config key, HF directory, spec) of every model the run builds: the actor (and reference) given as
    `spec`, then the critic and reward model when their own directories are set."""
    specs = [("model.path", cfg.model.path, spec)]
    for key in ("critic_path", "reward_model_path"):
        path = getattr(cfg.model, key)
        if path is not None:
            specs.append((f"model.{key}", path, spec_from_hf(read_hf_config(path), head="value",
                                                              vocab_divisor=cfg.model.vocab_divisor)))
    return specs


def check_layouts(cfg: TrainConfig, spec: ModelSpec) -> None:
    """The training layout splits every model the run builds (heads, KV heads, ffn over tp; layers over
    pp·vpp) and the generation layout splits the actor for vLLM (heads and KV heads over the generation
    tp, layers over the generation pp): one line naming the keys, before megatron-core or vLLM would refuse
    inside the workers."""
    t = cfg.parallel.train
    gen_tp = cfg.parallel.gen.tp or t.tp
    for key, path, model in model_specs(cfg, spec):
        try:
            check_layout(model, t.tp, t.pp, t.vpp)
        except ValueError as e:
            raise ValueError(f"parallel.train (tp={t.tp}, pp={t.pp}, vpp={t.vpp}) cannot split {key} "
                             f"({path}): {e}") from None
    try:
        check_split(spec.dims, "vllm", gen_tp)
    except ValueError as e:
        raise ValueError(f"the generation tp={gen_tp} (parallel.gen.tp, else parallel.train.tp) cannot split "
                         f"model.path ({cfg.model.path}) for vLLM: {e}") from None
    check_gen_pp(spec.dims.num_layers, cfg.parallel.gen.pp, "parallel.gen.pp", f" of model.path ({cfg.model.path})")


def check_stop_tokens(cfg: TrainConfig, tokenizer: Tokenizer) -> None:
    """Every rollout.stop_token_ids entry is an id the engine can sample (below the tokenizer's vocab_size,
    which is at most the model's): a sample could never stop on another."""
    bad = [t for t in cfg.rollout.stop_token_ids if t >= tokenizer.vocab_size]
    if bad:
        raise ValueError(f"rollout.stop_token_ids: {bad[0]} is not a token id of the tokenizer ({tokenizer.path}, "
                         f"ids 0 … {tokenizer.vocab_size - 1}), so no sample could stop on it; list ids below "
                         f"{tokenizer.vocab_size}")


def load_inputs(cfg: TrainConfig) -> tuple[Tokenizer, tuple[PromptBatches, PromptBatches | None], ModelSpec]:
    """(tokenizer, (train batches, validation batches or None), the actor's spec): every prompt of every
    data file read and tokenized, and the lengths checked against the model. No process group is
    needed, so the launcher runs it too, before it starts any worker. Raises one-line ValueErrors."""
    check_device(cfg)
    tokenizer = Tokenizer.from_path(cfg.data.tokenizer or cfg.model.path)
    spec = spec_from_hf(read_hf_config(cfg.model.path), head="lm", vocab_divisor=cfg.model.vocab_divisor)
    for _, path, model in model_specs(cfg, spec):  # the critic and reward model read the actor's tokens too
        check_fits_model(tokenizer, model.dims.vocab_size, Path(path) / "config.json")
    check_layouts(cfg, spec)
    check_stop_tokens(cfg, tokenizer)
    batches = build_prompt_data(cfg.data, tokenizer, default_seed=cfg.run.seed)
    kept = [b.dataset for b in batches if b is not None]
    check_lengths(cfg, spec, max(len(item.prompt_ids) for d in kept for item in d.items))
    check_kv_cache(cfg, spec)
    return tokenizer, batches, spec
