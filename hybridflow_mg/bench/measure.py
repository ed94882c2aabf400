"""What the step benchmarks measure besides wall time: model FLOPs, a GEMM ceiling, peak memory, the machine.

- `train_flops_per_seq`: forward + backward model FLOPs of one sequence (the MFU numerator).
- `gemm_peak`: this rank's matmul rate on the GEMMs its actor update runs (the measured MFU denominator).
- `datasheet_tflops`: the vendor's dense bf16 rate of a GPU (the second denominator, GPU only).
- `StageProbe`: peak memory of each stage of a step (RSS on CPU, `max_memory_allocated` on GPU).
- `machine`: CPU model, cores, load, versions and device, recorded in every JSON.

Units: FLOPs count a multiply-add as 2; rates are FLOP/s; memory in bytes.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from hybridflow_mg.models.layouts import ModelDims

# Dense (no sparsity) bf16 tensor-core rates, TFLOP/s, from NVIDIA's H100, H200 and A100 datasheets (the
# 1979 of H100/H200 SXM is the sparse figure); first match of the device name wins.
DATASHEET_BF16_TFLOPS = (("H200 NVL", 835.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H200", 989.4),
                         ("H100", 989.4), ("A100", 312.0))


def datasheet_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of `device_name` (torch.cuda.get_device_name) in TFLOP/s; None if unknown."""
    return next((rate for key, rate in DATASHEET_BF16_TFLOPS if key in device_name), None)


# --- model FLOPs ---------------------------------------------------------------------------------------------
def matmul_params(dims: ModelDims) -> int:
    """N: weights that enter a matrix multiply for each token: per layer W_qkv, W_o, W_fc1 (gate and up),
    W_fc2, plus the output layer (hidden × vocab, also when tied to the embedding, since it still
    multiplies). Left out: the input embedding (a lookup), norms, biases. A value head is hidden × 1."""
    h, q, kv, f = dims.hidden_size, dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim, dims.ffn_hidden_size
    per_layer = h * (q + 2 * kv) + q * h + h * 2 * f + f * h
    return dims.num_layers * per_layer + h * (dims.vocab_size if dims.head == "lm" else 1)


def train_flops_per_seq(dims: ModelDims, seq_len: int | float) -> float:
    """Forward + backward model FLOPs of one sequence of `seq_len` tokens:

        6·N·s + 12·L·(H·d)·s²

    6 = 2 FLOPs per multiply-add × (1 forward + 2 backward matmuls) per weight and token; the second term
    is QKᵀ and attention·V (2·2·s·H·d per token per layer forward, ×3 with the backward) at the full
    length, without causal halving. Narayanan et al. 2021, "Efficient Large-Scale Language Model Training
    on GPU Clusters Using Megatron-LM" (SC'21), §5.1 and appendix: 96·B·s·l·h²·(1 + s/6h + V/16lh) for GPT,
    whose 96 includes a recomputed forward; we count 72 (no recomputation) and Llama's GQA and SwiGLU
    weights exactly through N. Model FLOPs, not hardware FLOPs: softmax, norms, rotary, the loss and the
    optimizer are not counted, nor padding.
    """
    return 6.0 * matmul_params(dims) * seq_len + 12.0 * dims.num_layers * dims.num_heads * dims.head_dim * float(seq_len) ** 2


FLOPS_FORMULA = ("per sequence of s tokens: 6·N·s + 12·L·(H·d)·s² (forward + backward, no recomputation), N = "
                 "matmul weights (attention, MLP, output layer; not the input embedding): Narayanan et al. 2021, "
                 "'Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM', §5.1 and "
                 "appendix (model FLOPs); padding not counted")


# --- the measured ceiling --------------------------------------------------------------------------------------
def rank_gemms(dims: ModelDims, tokens: int, tp: int, padded_vocab: int) -> list[tuple[str, int, int, int, int]]:
    """(name, count, m, k, n) of each GEMM one rank runs in a forward + backward over `tokens` tokens with
    tensor parallelism `tp` (column-parallel outputs and row-parallel inputs divided by tp): for y = x·Wᵀ,
    x [m, k], W [n, k]: forward x·Wᵀ, input gradient dy·W, weight gradient dyᵀ·x."""
    h, q, kv, f = dims.hidden_size, dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim, dims.ffn_hidden_size
    out = []
    for name, count, k, n in (("qkv", dims.num_layers, h, (q + 2 * kv) // tp), ("proj", dims.num_layers, q // tp, h),
                              ("fc1", dims.num_layers, h, 2 * f // tp), ("fc2", dims.num_layers, f // tp, h),
                              ("output", 1, h, padded_vocab // tp)):
        out += [(f"{name}.fwd", count, tokens, k, n), (f"{name}.dgrad", count, tokens, n, k),
                (f"{name}.wgrad", count, n, tokens, k)]
    return out


def gemm_peak(gemms: list[tuple[str, int, int, int, int]], dtype: torch.dtype, device: torch.device,
              repeats: int = 3) -> dict:
    """torch.matmul rate on `gemms` in `dtype` on this rank's threads: each shape's best of `repeats` timed
    calls after one warm-up (randn inputs from a private generator: the run's RNG streams are untouched);
    `flops_per_s` = Σ count·FLOPs / Σ count·best time, the rate of the update's GEMMs back to back."""
    gen = torch.Generator(device=device).manual_seed(0)
    rows, total_flop, total_s = [], 0.0, 0.0
    for name, count, m, k, n in gemms:
        a = torch.randn(m, k, generator=gen, device=device, dtype=dtype)
        b = torch.randn(k, n, generator=gen, device=device, dtype=dtype)
        torch.matmul(a, b)
        best = float("inf")
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            torch.matmul(a, b)
            _sync(device)
            best = min(best, time.perf_counter() - start)
        flop = 2.0 * m * k * n
        rows.append({"gemm": name, "count": count, "m": m, "k": k, "n": n, "best_s": best, "flops_per_s": flop / best})
        total_flop += count * flop
        total_s += count * best
    return {"flops_per_s": total_flop / total_s, "gemm_only_s": total_s, "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "gemms": rows,
            "method": f"torch.matmul, best of {repeats} after 1 warm-up, all ranks at once (as in training)"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- peak memory per stage -------------------------------------------------------------------------------------
def _rss_peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


class StageProbe:
    """Peak memory of each stage of a step and of the untimed gaps between stages, for `loop.rl_step`'s
    timer (`enter(stage)`, `exit(stage)`). Each call reads the peak since the previous call and resets
    it: on CPU the process's peak RSS (Linux: writing 5 to /proc/self/clear_refs resets VmHWM), on GPU
    `torch.cuda.max_memory_allocated` (reset by `reset_peak_memory_stats`). Measurement only: nothing
    the step computes depends on it.

    `peaks` maps a stage to its peak bytes, and `gap:<stage>` to the peak of the glue before it (on the
    way into generation: the training state's offload and vLLM's KV cache waking). `switch_peak` is the
    training → generation switch: from the reshard's start to the first stage after it.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "max_memory_allocated" if device.type == "cuda" else "rss"
        self.peaks: dict[str, int] = {}
        self._last: str | None = None
        self._reset()

    def _read(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return _rss_peak_bytes()

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:  # not Linux, or not allowed: the peaks then grow over the run (stated in the JSON)
                self.kind = "rss_since_start"

    def start_step(self) -> None:
        self.peaks, self._last = {}, None
        self._reset()

    def enter(self, stage: str) -> None:
        key = f"gap:{stage}"
        self.peaks[key] = max(self.peaks.get(key, 0), self._read())
        self._reset()

    def exit(self, stage: str) -> None:
        self.peaks[stage] = max(self.peaks.get(stage, 0), self._read())
        self._last = stage
        self._reset()

    def finish_step(self) -> dict:
        """This step's peaks: per stage, `gap:*`, the switch and the whole step."""
        self.peaks["gap:end"] = self._read()
        stages = [k for k in self.peaks if not k.startswith("gap:")]
        after = stages[stages.index("reshard") + 1] if "reshard" in stages and stages[-1] != "reshard" else None
        switch = max(self.peaks.get("reshard", 0), self.peaks.get(f"gap:{after}", 0))
        return {"kind": self.kind, "stages": {k: self.peaks[k] for k in stages},
                "gaps": {k[4:]: v for k, v in self.peaks.items() if k.startswith("gap:")},
                "switch": switch, "step": max(self.peaks.values())}


# --- the machine -----------------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    """CPU, cores, load average, thread count, versions and the device, for the JSON."""
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for module, key in (("vllm", "vllm"), ("megatron.core", "megatron_core")):
        try:
            versions[key] = __import__(module, fromlist=["__version__"]).__version__
        except Exception:  # noqa: BLE001 - a missing or broken optional package is recorded as absent
            versions[key] = None
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "cpu": cpu_name(),
            "num_cpus": os.cpu_count(), "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
            **versions}
