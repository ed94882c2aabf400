"""Shared pieces of the GPU checks (`benchmarks/*_gpu.py`, run together by `benchmarks/gpu_check.sh`).

- `LLAMA_1B`: the model the checks use: Llama-3.2-1B's shape (1.24e9 parameters, tied embeddings),
  random weights, default rope (the rope variant changes no FLOP).
- `model_flops_per_seq`: model FLOPs of one sequence's forward + backward (the MFU numerator).
- `gemm_peak`: the bf16 matrix rate measured on the model's own GEMM shapes (MFU denominator (b)).
- `datasheet_bf16_tflops`: the vendor's dense bf16 rate of the device (MFU denominator (a)).
- `run_check`: phases, exit codes and the JSON every check writes, failures included.

Units: FLOP counts are floating-point operations (a multiply-add is 2); rates in TFLOP/s (1e12 FLOP/s);
times in seconds unless a name ends in `_ms`; memory in GiB (2**30 bytes).
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import traceback
from pathlib import Path
from typing import Callable

EXIT_OK, EXIT_FAIL, EXIT_NO_GPU, EXIT_API = 0, 1, 2, 3
"""Exit codes of every check: 3 means megatron-core failed to import or refused our calls while the
model was being set up (gpu_check.sh then reruns the check on the fallback megatron-core)."""

# Llama-3.2-1B (public config.json), except rope: default instead of llama3 scaling.
LLAMA_1B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=8192,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, num_hidden_layers=16,
                vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
# A tiny fp32 Llama for CPU runs of the same code path.
LLAMA_TINY = dict(LLAMA_1B, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, num_hidden_layers=2, vocab_size=512, max_position_embeddings=256)

# Dense (no sparsity) bf16 tensor-core rates from NVIDIA's datasheets, TFLOP/s; first match wins.
_DATASHEET_BF16 = (("H200 NVL", 835.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H200", 989.4),
                   ("H100", 989.4), ("A100", 312.0))


def datasheet_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of `device_name` (torch.cuda.get_device_name) in TFLOP/s; None if unknown.
    H100 SXM and H200 SXM: 989.4 (NVIDIA H100 / H200 datasheets, 1979 is the sparse figure)."""
    return next((rate for key, rate in _DATASHEET_BF16 if key in device_name), None)


# --- model FLOPs ---------------------------------------------------------------------------------------
def _dims(cfg: dict) -> tuple[int, int, int, int, int, int, int]:
    h, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    H, K = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    d = cfg.get("head_dim") or h // H
    return h, L, H, K, d, cfg["intermediate_size"], cfg["vocab_size"]


def matmul_params(cfg: dict) -> int:
    """N_mm: weights that enter a matrix multiply per token: per layer W_qkv (h x (H+2K)d), W_o (Hd x h),
    W_fc1 (h x 2f, gate and up), W_fc2 (f x h); plus the output layer (h x V, counted even when tied).
    Not counted: the embedding lookup (a gather), norms, biases."""
    h, L, H, K, d, f, V = _dims(cfg)
    per_layer = h * (H + 2 * K) * d + H * d * h + h * 2 * f + f * h
    return L * per_layer + h * V


def model_flops_per_seq(cfg: dict, seq_len: int) -> float:
    """Forward + backward model FLOPs of one sequence of `seq_len` tokens:

        6 * N_mm * s  +  12 * L * (H*d) * s**2

    6 = 2 FLOPs per multiply-add x (1 forward + 2 backward matmuls). The second term is Q.K^T and
    attention.V (2 * 2 * s * H*d per token per layer, x3 for the backward) at the full length s, no causal
    halving. This is PaLM's "6N + 12 L H Q T" per token (Chowdhery et al. 2022, "PaLM: Scaling Language
    Modeling with Pathways", Appendix B) and, for GPT shapes, Narayanan et al. 2021 ("Efficient
    Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", SC'21, Sec. 5.1 and the
    appendix's 96*B*s*l*h^2*(1 + s/6h + V/16lh), whose 96 holds an extra forward for recomputation; we
    count 72, i.e. no recomputation, and Llama's GQA/SwiGLU weights exactly through N_mm). Not counted:
    softmax, norms, rotary, SwiGLU's elementwise product, the loss, the optimizer.
    """
    _, L, H, _, d, _, _ = _dims(cfg)
    return 6.0 * matmul_params(cfg) * seq_len + 12.0 * L * H * d * float(seq_len) ** 2


def model_gemms(cfg: dict, tokens: int) -> list[tuple[str, int, int, int, int]]:
    """(name, count per step, m, k, n) of every GEMM of one forward + backward over `tokens` tokens:
    for each linear y = x W^T (x [m, k], W [n, k]): fwd x.W^T, dgrad dy.W, wgrad dy^T.x."""
    h, L, H, K, d, f, V = _dims(cfg)
    out = []
    for name, count, k, n in (("qkv", L, h, (H + 2 * K) * d), ("proj", L, H * d, h), ("fc1", L, h, 2 * f),
                              ("fc2", L, f, h), ("output", 1, h, V)):
        out += [(f"{name}.fwd", count, tokens, k, n), (f"{name}.dgrad", count, tokens, n, k),
                (f"{name}.wgrad", count, n, tokens, k)]
    return out


# --- timing --------------------------------------------------------------------------------------------
def cuda_times_ms(fn: Callable[[], object], iters: int, warmup: int) -> list[float]:
    """Per-call times of `fn` in ms from CUDA events (after `warmup` untimed calls); wall clock on a
    machine without CUDA (the CPU dry runs)."""
    import time

    import torch

    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _median_matmul_ms(sets: list, iters: int, warmup: int) -> float:
    """Median ms of torch.matmul(a, b), taking the (a, b) pairs of `sets` in turn."""
    import torch

    turn = [0]

    def mm():
        a, b = sets[turn[0] % len(sets)]
        turn[0] += 1
        return torch.matmul(a, b)

    return statistics.median(cuda_times_ms(mm, iters, warmup))


def gemm_peak(cfg: dict, tokens: int, *, iters: int = 10, warmup: int = 3, square: int = 8192,
              device: str = "cuda") -> dict:
    """bf16 torch.matmul rates on the model's own GEMM shapes (random normal data, two input sets used in
    turn, CUDA events, median of `iters` after `warmup`), and on one square `square`^3 product.

    `model_gemm_tflops` = sum(count * FLOPs) / sum(count * median time) over `model_gemms`: the rate of
    one step's GEMMs run back to back, the ceiling MFU (b) divides by. `gemm_only_step_s` is that time.
    """
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    rows, total_flop, total_s = [], 0.0, 0.0
    shapes = model_gemms(cfg, tokens) + [("square", 0, square, square, square)]
    for name, count, m, k, n in shapes:
        ms = _median_matmul_ms([(torch.randn(m, k, generator=gen, device=device, dtype=torch.bfloat16),
                                 torch.randn(k, n, generator=gen, device=device, dtype=torch.bfloat16))
                                for _ in range(2)], iters, warmup)
        flop = 2.0 * m * k * n
        rows.append({"gemm": name, "count": count, "m": m, "k": k, "n": n, "median_ms": ms,
                     "tflops": flop / (ms * 1e-3) / 1e12})
        total_flop += count * flop
        total_s += count * ms * 1e-3
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"tokens": tokens, "model_gemm_tflops": total_flop / total_s / 1e12, "gemm_only_step_s": total_s,
            "square_tflops": rows[-1]["tflops"], "gemms": rows,
            "method": "torch.matmul bf16, randn inputs (2 sets in turn), CUDA events, median"}


# --- environment and the check's JSON -----------------------------------------------------------------
def environment(with_megatron: bool = True) -> dict:
    """Versions and device facts recorded in every check's JSON."""
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if with_megatron:
        try:
            from megatron.core import package_info

            env["megatron_core"] = package_info.__version__
            env["megatron_core_path"] = str(Path(package_info.__file__).resolve().parents[2])
        except Exception as exc:  # noqa: BLE001 - recorded, the check itself reports the failure
            env["megatron_core"] = f"unavailable ({type(exc).__name__}: {exc})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                   sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    else:
        env["device"] = "cpu"
    return env


def _is_api_error(exc: BaseException) -> bool:
    """An import failure, or a TypeError/AttributeError/any error raised inside megatron-core (not OOM)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return False
    if isinstance(exc, (ImportError, TypeError, AttributeError)):
        return True
    return any("/megatron/" in frame.filename for frame in traceback.extract_tb(exc.__traceback__))


_CLEANUPS: list[Callable[[], object]] = []


def on_exit(fn: Callable[[], object]) -> None:
    """Run `fn` after the check's JSON is written (teardown that could hang must not lose the result)."""
    _CLEANUPS.append(fn)


def teardown(grid) -> None:
    """Destroy a grid's groups and the default process group."""
    import torch.distributed as dist

    if grid is not None:
        grid.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()


def write_json(path: str | Path | None, obj: dict) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def run_check(name: str, out: str | Path | None, body: Callable[[dict], bool], *,
              needs_gpu: bool = True, with_megatron: bool = True) -> int:
    """Run `body(result)`, which fills `result` and returns whether every check passed; write the JSON,
    then run what the body registered with `on_exit`.

    `body` sets ``result["phase"] = "run"`` once the model is built and took its first step: errors
    before that in megatron-core (or imports) exit with EXIT_API, so the caller can retry on another
    megatron-core; later errors exit with EXIT_FAIL. No GPU: one line, EXIT_NO_GPU.
    """
    import torch

    result: dict = {"check": name, "status": "running", "phase": "setup"}
    if needs_gpu and not torch.cuda.is_available():
        print(f"{name}: no GPU here (torch {torch.__version__}, CUDA {torch.version.cuda}); skipped")
        result.update(status="skipped", reason="no GPU", environment=environment(False))
        write_json(out, result)
        return EXIT_NO_GPU
    code = EXIT_OK
    try:
        ok = body(result)
        result["status"] = "ok" if ok else "failed"
        code = EXIT_OK if ok else EXIT_FAIL
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a JSON record and an exit code
        api = result.get("phase") == "setup" and _is_api_error(exc)
        result.update(status="api_error" if api else "error", error=f"{type(exc).__name__}: {exc}"[:2000],
                      traceback=traceback.format_exc().splitlines()[-25:])
        print(f"{name}: {'megatron-core API/import error' if api else 'error'} in phase {result.get('phase')}: "
              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        traceback.print_exc()
        code = EXIT_API if api else EXIT_FAIL
        if isinstance(exc, KeyboardInterrupt):
            code = 130
    result.setdefault("environment", environment(with_megatron))
    write_json(out, result)
    while _CLEANUPS:
        try:
            _CLEANUPS.pop()()
        except Exception as exc:  # noqa: BLE001 - the result is written; say so and go on
            print(f"{name}: cleanup failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return code
