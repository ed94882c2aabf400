"""Typed rollout configs: the engine's knobs (`RolloutConfig`) and one generate call's sampling (`Sampling`).

Same style as `hybridflow_mg.config.schema`: keyword-only dataclasses, a docstring under every field,
`__post_init__` raising a ValueError that names the key. Nothing here imports torch or vLLM.

Seeds. vLLM samples every request with its own generator when the request carries a seed, so a sample
depends only on (prompt, weights, seed) — not on batch composition, rank or the global RNG. That is
what lets all ranks of a generation TP group sample the same tokens without talking. `Sampling.seed`
is the base of one call: sample ``i`` of prompt ``j`` uses ``seed + j·n + i`` (vLLM derives the
``+ i`` itself when it fans a request out into ``n`` samples). The trainer passes a fresh base per
step (e.g. run seed and step), so steps differ and a resumed run repeats them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Literal

_DTYPES = ("auto", "float32", "bfloat16", "float16")
MAX_TEMPERATURE = 2.0
"""vLLM's `SamplingParams` refuses temperatures above this."""
MIN_SAMPLING_TEMPERATURE = 0.01
"""vLLM raises a temperature in (0, 0.01) to 0.01 (with a warning), so training, which takes log-probs at the
configured temperature, needs at least this."""
VLLM_MAX_N_SEQUENCES = 16384
"""vLLM's default bound on `n` (its VLLM_MAX_N_SEQUENCES environment variable overrides it)."""
MAX_ENGINE_SEED = 2**32 - 1
"""vLLM seeds NumPy with the engine seed, and NumPy takes seeds up to 2**32 − 1."""
_LOGPROBS_MODES = ("raw", "processed")
GREEDY_BELOW = 1e-5
"""vLLM decodes greedily below this temperature."""


def _int_at_least(key: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key} must be an integer ≥ {low}, got {value!r}")


def _number_in(key: str, value: object, low: float, high: float, *, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (low < value if low_open else low <= value) and value <= high
    if not ok:
        raise ValueError(f"{key} must be a number in {'(' if low_open else '['}{low}, {high}], got {value!r}")


def _token_ids(key: str, value: object) -> tuple[int, ...]:
    """Lists (YAML) and tuples are accepted; stored as a tuple so configs stay hashable."""
    if not isinstance(value, (list, tuple)) or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in value):
        raise ValueError(f"{key} must be a list of non-negative token ids, got {value!r}")
    return tuple(value)


def _check_sampling(cfg) -> None:
    """The sampling fields shared by `RolloutConfig` and `Sampling`, within vLLM's `SamplingParams` ranges."""
    _int_at_least("n", cfg.n, 1)
    max_n = int(os.environ.get("VLLM_MAX_N_SEQUENCES", VLLM_MAX_N_SEQUENCES))
    if cfg.n > max_n:
        raise ValueError(f"n={cfg.n} is more samples per prompt than vLLM allows ({max_n}, its VLLM_MAX_N_SEQUENCES); "
                         "lower n or raise that environment variable")
    t = cfg.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] (vLLM's range; 0 is greedy), "
                         f"got {t!r}")
    _number_in("top_p", cfg.top_p, 0.0, 1.0, low_open=True)
    _int_at_least("top_k", cfg.top_k, 0)
    _int_at_least("max_new_tokens", cfg.max_new_tokens, 1)
    object.__setattr__(cfg, "stop_token_ids", _token_ids("stop_token_ids", cfg.stop_token_ids))
    _int_at_least("seed", cfg.seed, 0)
    if cfg.temperature < GREEDY_BELOW and cfg.n > 1:
        raise ValueError(f"n={cfg.n} with temperature={cfg.temperature}: greedy decoding gives n identical samples "
                         f"(vLLM refuses it); sample with a temperature > 0, or ask for n=1")


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """What one `VLLMEngine.generate` call samples. Every rank of a generation TP group must pass the
    same prompts and an equal `Sampling` (same seed), or the group's collectives see different batches."""

    n: int = 1
    """Samples per prompt (GRPO's group size)."""
    temperature: float = 1.0
    """Softmax temperature; 0 is greedy (vLLM treats anything below 1e-5 as greedy)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p; 1 is off."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 is off."""
    max_new_tokens: int = 256
    """Longest response; a sample that reaches it finishes with reason ``"length"``."""
    stop_token_ids: tuple[int, ...] = ()
    """A sample stops after emitting any of these (included in its tokens, finish reason ``"stop"``).
    Nothing is implied: the engine runs without a tokenizer, so list the EOS id(s) here."""
    seed: int = 0
    """Base seed of this call: sample i of prompt j uses seed + j·n + i (see the module docstring)."""

    def __post_init__(self):
        _check_sampling(self)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def request_seed(self, prompt_index: int) -> int:
        """vLLM's seed for prompt ``prompt_index``; vLLM adds the sample index for n > 1."""
        return self.seed + prompt_index * self.n


@dataclass(kw_only=True)
class ReshardConfig:
    """How the actor's weights are moved into the engine at every weight sync (reshard/execute.py)."""

    bucket_bytes: int = 256 << 20
    """Bytes per bucket: tensors are packed into buckets of about this size, one collective each; the
    extra memory of a reshard is one bucket's buffers (two when overlapped)."""
    overlap: bool | None = None
    """Pack bucket k + 1 and scatter bucket k − 1 while bucket k's collective is in flight (async
    collectives, two bucket slots: twice the extra memory). Left out: serial. On GPU NCCL runs the
    collective on its own stream, so it should pay there, but it is not yet measured on a GPU; on CPU
    gloo and the copies share the cores (no gain beyond the noise on the 2-core test VM). Resharding is
    a copy: the weights written are the same either way."""
    max_workspace_bytes: int | None = None
    """The most memory the overlapped reshard's two slots may take; above it the reshard runs serially
    with one slot. Left out: no bound."""

    def __post_init__(self):
        _int_at_least("bucket_bytes", self.bucket_bytes, 1)
        if self.overlap is not None and not isinstance(self.overlap, bool):
            raise ValueError(f"overlap must be true, false or left out, got {self.overlap!r}")
        if self.max_workspace_bytes is not None:
            _int_at_least("max_workspace_bytes", self.max_workspace_bytes, 0)


@dataclass(kw_only=True)
class RolloutConfig:
    """The in-process vLLM engine of every rank: default sampling plus engine construction knobs."""

    # --- default sampling (see `Sampling`; `sampling()` makes one per call) ------------------------
    n: int = 1
    """Samples per prompt (GRPO's group size)."""
    temperature: float = 1.0
    """Softmax temperature, in [0.01, 2] for training (vLLM's range; it raises lower ones to 0.01)."""
    top_p: float = 1.0
    """Nucleus sampling threshold; 1 is off."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 is off."""
    max_new_tokens: int = 256
    """Longest response in tokens."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a sample (list the EOS id here: the engine runs without a tokenizer)."""
    seed: int = 0
    """Default base seed of `Sampling` (the trainer passes one per step), and vLLM's engine seed (which
    only unseeded requests would use; the engine sends none)."""
    logprobs_mode: Literal["raw", "processed"] = "raw"
    """Which logprob of each sampled token is returned: ``raw`` = log_softmax of the model's logits,
    before temperature / top-k / top-p (equal to the trainer's log-probs at temperature 1);
    ``processed`` = after them (the distribution actually sampled, for importance-sampling corrections).
    The trainer's `rollout_logprob_diff` metric compares like with like only for raw at temperature 1
    or processed without top-k / top-p."""

    # --- engine ------------------------------------------------------------------------------------
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and activations in vLLM; ``auto`` takes the checkpoint's. Use float32 for exactness tests
    on CPU (bf16 there diverges from HF after a few tokens)."""
    max_model_len: int | None = None
    """Longest prompt + response the engine holds (its KV cache must fit one such sequence). Left out,
    what the run needs: `train` takes data.max_prompt_length + max_new_tokens, `generate` its longest
    prompt + --max-tokens; never more than the model's max_position_embeddings (see rollout/kv_cache.py)."""
    max_num_seqs: int = 256
    """Sequences vLLM runs at once (prompts × n beyond it wait in its queue)."""
    max_num_batched_tokens: int | None = None
    """Tokens per engine step (chunked prefill); left out, vLLM's default."""
    block_size: int | None = None
    """KV-cache block in tokens; left out, vLLM's default. On CPU it must be a multiple of 32."""
    enable_prefix_caching: bool = True
    """Reuse the KV of shared prompt prefixes (the n samples of a prompt share it). The engine resets the
    cache after every weight update, since cached KV of old weights is stale."""
    enforce_eager: bool | None = None
    """No torch.compile / CUDA graphs. Left out: eager on CPU (compiling costs minutes there), compiled
    with CUDA graphs on GPU."""
    kv_cache_memory_bytes: int | None = None
    """KV-cache size in bytes. On CPU it bounds the engine's memory (left out: 256 MiB; vLLM would
    otherwise reserve gpu_memory_utilization × the node's RAM). On GPU, when set, it replaces
    gpu_memory_utilization."""
    gpu_memory_utilization: float = 0.5
    """GPU only: fraction of GPU memory vLLM may take for weights + KV cache while awake. The trainer
    shares the GPU; sleep mode hands it back during training."""
    enable_sleep_mode: bool = True
    """GPU only: allocate through vLLM's sleep-mode allocator so `sleep()` can free weights / KV cache
    during training. Ignored on CPU (vLLM has no sleep mode there)."""
    reshard: ReshardConfig = field(default_factory=ReshardConfig)
    """The weight sync from the actor's training shards into the engine."""

    def __post_init__(self):
        _check_sampling(self)
        if self.logprobs_mode not in _LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {_LOGPROBS_MODES}, got {self.logprobs_mode!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        for key in ("max_model_len", "max_num_batched_tokens", "block_size", "kv_cache_memory_bytes"):
            if getattr(self, key) is not None:
                _int_at_least(key, getattr(self, key), 1)
        _int_at_least("max_num_seqs", self.max_num_seqs, 1)
        if self.seed > MAX_ENGINE_SEED:
            raise ValueError(f"seed={self.seed} is also vLLM's engine seed, which NumPy takes only up to 2**32 - 1 = "
                             f"{MAX_ENGINE_SEED}; choose a smaller seed")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be ≥ max_num_seqs="
                             f"{self.max_num_seqs} (vLLM's scheduler refuses fewer); raise it or lower max_num_seqs")
        _number_in("gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0, low_open=True)
        for key in ("enable_prefix_caching", "enable_sleep_mode"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.enforce_eager is not None and not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be true, false or left out, got {self.enforce_eager!r}")
        if self.max_model_len is not None and self.max_new_tokens >= self.max_model_len:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} leaves no room for a prompt within "
                             f"max_model_len={self.max_model_len}; raise max_model_len or lower max_new_tokens")

    def sampling(self, **overrides) -> Sampling:
        """This config's sampling fields as a `Sampling`, with ``overrides`` (e.g. ``seed=``) applied."""
        base = Sampling(**{f.name: getattr(self, f.name) for f in fields(Sampling)})
        return replace(base, **overrides)
