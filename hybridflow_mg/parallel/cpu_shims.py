"""The few adjustments megatron-core needs to run on CPU with gloo — applied only on CPU, nowhere else.

megatron-core is written for CUDA; a handful of call sites hard-code it. Each shim below names the
call sites it covers (megatron-core 0.16.1) and is covered by a test in tests/test_cpu_shims.py and
tests/ranks/model2.py that fails if it stops working. On newer megatron-core versions a call site
that no longer hard-codes CUDA simply never reaches the shim: every shim is harmless there.

1. RNG tracker. `tensor_parallel.random.CudaRNGStatesTracker` keeps *CUDA* generator states;
   attention dropout forks it (`get_cuda_rng_tracker().fork()` in transformer/dot_product_attention.py
   and tensor_parallel/layers.py), and `model_parallel_cuda_manual_seed` calls torch.cuda.
   → `CpuRNGStatesTracker` keeps CPU generator states; `seed_model_parallel` seeds it.
2. `torch.cuda.current_device()` and `torch.cuda.synchronize()`: about thirty call sites allocate on
   `torch.cuda.current_device()` (tensor_parallel/mappings.py and layers.py gathers, rotary_pos_embedding
   `get_emb`, p2p_communication.py shape exchange, param_and_grad_buffer.py DDP buffers, ...).
   → in a process that has no CUDA, `torch.cuda.current_device()` returns the CPU device and
   `torch.cuda.synchronize()` does nothing. Both would raise there otherwise, so no working caller
   changes behaviour.
3. Literal `device="cuda"` factories: `total_num_tokens` in every forward_backward_* schedule
   (pipeline_parallel/schedules.py); `found_inf`, `_scale_one` and the loss scale
   (optimizer/optimizer.py); grad-norm buffers (optimizer/clip_grads.py); the no-Apex
   `local_multi_tensor_l2_norm` (utils.py); default causal masks (transformer/utils.py).
   → those modules (and only they, see `_MODULES`) get `CpuTorchView` as their `torch`: the same
   torch, except that factories asked for a "cuda" device make the tensor on the CPU.
4. `clip_grad_by_total_norm_fp32` (optimizer/clip_grads.py, imported by optimizer/optimizer.py)
   asserts `param.grad.type() == 'torch.cuda.FloatTensor'`.
   → `clip_grad_by_total_norm_cpu`: the same scaling (max_norm / (total_norm + 1e-6) when below 1)
   without the CUDA type assertion, installed in both modules.5. `Tensor.cuda()`: with tied embeddings and PP > 1, `LanguageModule.setup_embeddings_and_output_layer`
   (models/common/language_module/language_module.py) moves the last stage's copy of the word
   embeddings with `weight.data.cuda()` before all-reducing it with the first stage.
   → in a process that has no CUDA, `Tensor.cuda()` returns the tensor itself (it would raise).
6. `torch.cuda.current_stream()`: megatron-core 0.19 (distributed/param_and_grad_buffer.py,
   `_ParamAndGradBucketGroup.start_grad_sync`) asks for the current stream at every gradient sync to
   wait on CUDA-graph events; 0.16.1 has no such call on our paths.
   → in a process that has no CUDA, it returns a stream whose waits do nothing (CPU work is
   synchronous); vLLM's CPU worker installs the same kind of placeholder (vllm/v1/worker/cpu/shm.py).
"""
from __future__ import annotations

import contextlib
import importlib
import types

import torch

_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.utils",
    "megatron.core.transformer.utils",
)
_APPLIED = False


def _cpu_device(device):
    """'cuda', 'cuda:3', 3 or torch.device('cuda') → the CPU; anything else unchanged."""
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _factory(fn):
    def make(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinning needs CUDA
        return fn(*args, **kwargs)

    return make


def _cpu_current_device():
    return torch.device("cpu")


def _no_synchronize(*_args, **_kwargs):
    return None


def _tensor_stays_on_cpu(self, *_args, **_kwargs):
    return self


class _CpuStream:
    """Shim 6: the "current stream" of a process without CUDA; waiting on it or for it does nothing."""

    device = torch.device("cpu")

    def wait_event(self, *_args, **_kwargs):
        return None

    def wait_stream(self, *_args, **_kwargs):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True


def _cpu_current_stream(*_args, **_kwargs):
    return _CpuStream()


class CpuTorchView(types.ModuleType):
    """`torch`, except that tensors asked for on "cuda" are made on the CPU (see module docstring)."""

    def __init__(self):
        super().__init__("torch")
        for name in ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "ones_like",
                     "empty_like", "full_like", "randn", "rand"):
            setattr(self, name, _factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


class CpuRNGStatesTracker:
    """Named CPU generator states with megatron-core's tracker interface (add / fork / get / set / reset)."""

    def __init__(self, *_args, **_kwargs):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def reset(self) -> None:
        self.states_, self.seeds_ = {}, set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise ValueError(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Shim 4: scale every gradient by max_norm / (total_norm + 1e-6) when that is below 1."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        for param in parameters:
            grad = getattr(param, attr, None)
            if grad is not None:
                grad.detach().mul_(coeff)


def apply_cpu_shims() -> None:
    """Install every shim; idempotent. Call only when the process runs on the CPU."""
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core.tensor_parallel import random as mrandom

    if torch.cuda.is_available():
        raise RuntimeError("CPU shims requested in a process that sees a GPU; they are for CPU runs only")
    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    torch.cuda.current_device = _cpu_current_device
    torch.cuda.synchronize = _no_synchronize
    torch.cuda.current_stream = _cpu_current_stream
    torch.Tensor.cuda = _tensor_stays_on_cpu
    view = CpuTorchView()
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a newer megatron-core moved it: nothing of ours to shim there
            continue
        if getattr(module, "torch", None) is torch:
            module.torch = view
        if hasattr(module, "clip_grad_by_total_norm_fp32"):
            module.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_cpu
    _APPLIED = True


def seed_model_parallel(seed: int, tp_rank: int, ep_rank: int = 0, etp_rank: int = 0) -> None:
    """megatron-core's `model_parallel_cuda_manual_seed`, for CPU or GPU.

    Same seeds as megatron-core: the default generator gets `seed` (equal across TP ranks), the
    model-parallel tracker state gets seed + 2718 + tp_rank (different across TP ranks).
    """
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=ep_rank, etp_rank=etp_rank)
        return
    apply_cpu_shims()
    torch.manual_seed(seed)
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    offset = seed + 2718
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, offset + tp_rank)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)
