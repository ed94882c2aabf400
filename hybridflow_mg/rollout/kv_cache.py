"""Whether the in-process engine can hold one sequence of `max_model_len` tokens in its KV cache.

vLLM refuses to start when its KV cache cannot hold one sequence of `max_model_len`, and its message
names `gpu_memory_utilization`, which our CPU path overrides with `kv_cache_memory_bytes`. A model's
advertised context (`max_position_embeddings`: 8192 for SmolLM2, 131072 for Llama 3.1) is far more than
an RL run needs, so the run sizes `max_model_len` from its data instead, and this module checks the
size against the cache before anything starts, in the words of the command that was given
(`OptionNames`: config keys for `train`, flags for `generate`).

Per rank, vLLM keeps for every layer of its pipeline stage a K and a V vector per KV head it serves:

    bytes per token = 2 · (num_layers / gen_pp) · max(1, num_kv_heads / gen_tp) · head_dim · bytes per element

(KV heads are replicated when gen_tp exceeds them; gen_pp divides the layers, as the run checks.)
Nothing here imports vLLM.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from hybridflow_mg.models.layouts import ModelDims

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CPU_KV_CACHE_BYTES = 256 << 20
"""What the CPU engine reserves for its KV cache when `kv_cache_memory_bytes` is left out (vLLM would
otherwise take gpu_memory_utilization × the node's RAM)."""


@dataclass(frozen=True)
class OptionNames:
    """How the user sets the two sizes, for the error line."""

    max_model_len: str = "rollout.max_model_len"
    kv_cache: str = "rollout.kv_cache_memory_bytes"
    kv_cache_unit: int = 1
    """Bytes per unit of the `kv_cache` option (1 for the config key, 2**20 for `--kv-cache-mb`)."""

    def kv_value(self, num_bytes: int) -> str:
        """`num_bytes` in the unit of the `kv_cache` option (and in bytes when that unit is larger)."""
        return f"{num_bytes // self.kv_cache_unit}" + ("" if self.kv_cache_unit == 1 else f" ({num_bytes} bytes)")


TRAIN_OPTIONS = OptionNames()
TRAIN_DERIVED_OPTIONS = OptionNames(max_model_len="rollout.max_model_len (left out: data.max_prompt_length + "
                                                  "rollout.max_new_tokens)")
GENERATE_OPTIONS = OptionNames(max_model_len="--max-model-len", kv_cache="--kv-cache-mb", kv_cache_unit=1 << 20)


def cache_bytes(configured: int | None, *, on_cpu: bool) -> int | None:
    """The engine's KV-cache size in bytes: `configured`, else on CPU `CPU_KV_CACHE_BYTES`; None on GPU
    without a configured size (vLLM sizes it from gpu_memory_utilization)."""
    if configured is not None:
        return configured
    return CPU_KV_CACHE_BYTES if on_cpu else None


def element_bytes(dtype: str, hf_config: dict) -> int:
    """Bytes of one KV element: the engine's dtype, or the checkpoint's for ``auto`` (float32 unknown)."""
    if dtype == "auto":
        dtype = str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32").replace("torch.", "")
    return DTYPE_BYTES.get(dtype, 4)


def bytes_per_token(dims: ModelDims, gen_tp: int, element: int, gen_pp: int = 1) -> int:
    """KV-cache bytes one token takes on one rank of a generation TP group of `gen_tp`, in a stage of
    `gen_pp` (formula above)."""
    return 2 * (dims.num_layers // gen_pp) * max(1, dims.num_kv_heads // gen_tp) * dims.head_dim * element


def check_fits(max_model_len: int, cache_bytes: int | None, *, dims: ModelDims, gen_tp: int, element: int,
               names: OptionNames = TRAIN_OPTIONS, gen_pp: int = 1) -> None:
    """A one-line ValueError, in `names`' words, when one sequence of `max_model_len` tokens does not fit
    `cache_bytes` (None: unknown before the engine starts, e.g. on GPU, where vLLM sizes it from
    gpu_memory_utilization; nothing is checked then)."""
    if cache_bytes is None:
        return
    per_token = bytes_per_token(dims, gen_tp, element, gen_pp)
    need = max_model_len * per_token
    if need > cache_bytes:
        raise ValueError(too_small(max_model_len, need, cache_bytes, per_token, names))


def too_small(max_model_len: int, need: int, have: int, per_token: int, names: OptionNames) -> str:
    """The one line `check_fits` raises: the need, what the cache holds, and both options to change."""
    fits = have // per_token
    return (f"{names.max_model_len}={max_model_len} tokens need {need / 2**20:.0f} MiB of KV cache per rank "
            f"({per_token} bytes per token), more than {names.kv_cache}={names.kv_value(have)} holds (about {fits} "
            f"tokens); raise {names.kv_cache} to at least {math.ceil(need * 1.05 / names.kv_cache_unit)} or lower "
            f"{names.max_model_len}")


_VLLM_TOO_SMALL = re.compile(r"max seq len \((\d+)\).*?([\d.]+) GiB KV cache is needed.*?available KV cache memory "
                             r"\(([\d.]+) GiB\)", re.S)


def explain_engine_error(err: BaseException, names: OptionNames = TRAIN_OPTIONS) -> ValueError | None:
    """vLLM's "cannot serve one request of max seq len" refusal rewritten in `names`' words (it points at
    gpu_memory_utilization, which our CPU path does not use); None for any other error."""
    found = _VLLM_TOO_SMALL.search(str(err))
    if found is None:
        return None
    length, need, have = int(found[1]), float(found[2]), float(found[3])
    return ValueError(f"{names.max_model_len}={length} tokens need {need} GiB of KV cache per rank, more than the "
                      f"{have} GiB the engine has ({names.kv_cache}); raise {names.kv_cache} or lower "
                      f"{names.max_model_len}")
