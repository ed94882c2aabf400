"""GPU check 1: a ~1B Llama as a megatron-core GPTModel, forward + backward in bf16 with the SDPA layer spec,
and its model FLOPs utilisation (MFU).

    python benchmarks/model_gpu.py [--out PATH] [--batch 4] [--seq 2048] [--steps 10] [--warmup 3]
    python benchmarks/model_gpu.py --device cpu     # dry run of the same code: tiny fp32 model, no MFU

Model: Llama-3.2-1B's shape with random weights (gpu_common.LLAMA_1B), built by our `build_model` on a
world-1 grid. One step = forward with labels (megatron-core's vocab-parallel cross-entropy) + backward;
no optimizer. Timing: CUDA events around each step, median over --steps after --warmup untimed steps.

Reported (JSON and a table): parameters; seconds per step; tokens/s; model TFLOP/s from
`gpu_common.model_flops_per_seq` (6*N_mm*s + 12*L*H*d*s^2 per sequence, see there for the terms and
sources); MFU against (a) the datasheet dense bf16 peak of the device and (b) the bf16 GEMM rate
measured in the same process on the model's own GEMM shapes (`gpu_common.gemm_peak`); peak memory
(torch.cuda.max_memory_allocated, GiB); loss finite; and the logits of the SDPA spec against
megatron-core's local attention spec on the same weights (first --compare-tokens tokens).

Exit status (gpu_common): 0 ok, 1 a check failed, 2 no GPU, 3 megatron-core import/API error while building.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this script sits in
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import (LLAMA_1B, LLAMA_TINY, cuda_times_ms, datasheet_bf16_tflops, gemm_peak,  # noqa: E402
                        matmul_params, model_flops_per_seq, on_exit, run_check, teardown)

REL_LOGIT_TOLERANCE = 0.1
"""SDPA vs local attention, bf16 through 16 layers: ||a - b|| / ||b|| of the logits must stay below this
(rounding differences are ~1e-2; a wrong causal mask or head mapping gives O(1))."""


def sdpa_backends(heads: int, kv_heads: int, head_dim: int, seq: int) -> dict:
    """Which fused SDPA kernels accept this model's attention (bf16, causal, GQA) on this GPU: a hint for
    reading the MFU (the math fallback is slow). Backend name -> True or the error's first line."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, kv_heads, seq, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    usable = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            torch.cuda.synchronize()
            usable[backend.name] = True
        except Exception as exc:  # noqa: BLE001 - "no kernel for these inputs" is the answer we record
            usable[backend.name] = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    return usable


def body(result: dict, args) -> bool:
    import torch

    os.environ.setdefault("MASTER_PORT", "29531")
    from hybridflow_mg.models.build import build_model
    from hybridflow_mg.models.hf_spec import spec_from_hf
    from hybridflow_mg.parallel.grid import Grid
    from hybridflow_mg.parallel.launch import init_distributed
    from hybridflow_mg.parallel.layout import ParallelLayout

    gpu = args.device == "cuda"
    _, device = init_distributed(backend="auto" if gpu else "gloo")
    grid = Grid.create(ParallelLayout(world=1, tp=1, pp=1, gen_tp=1), device)
    on_exit(lambda: teardown(grid))  # after the JSON is written: a hang here cannot lose the result
    cfg, b, s = (LLAMA_1B, args.batch, args.seq) if gpu else (LLAMA_TINY, 2, 32)
    dtype = "bfloat16" if gpu else "float32"
    spec = spec_from_hf(cfg)
    (model,), built = build_model(spec, grid, role="actor", layer_spec_name="sdpa", dtype=dtype, init=True)
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, cfg["vocab_size"], (b, s), device=device, generator=gen)
    positions = torch.arange(s, device=device).expand(b, -1)
    losses = []

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(tokens, positions, None, labels=tokens).float().mean()
        loss.backward()
        losses.append(loss.detach())

    step()
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result["phase"] = "run"  # built and stepped once: later errors are not API errors
    times_ms = cuda_times_ms(step, args.steps, args.warmup)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
    seconds = statistics.median(times_ms) / 1e3
    loss = torch.stack(losses).float()
    flops = b * model_flops_per_seq(cfg, s)
    achieved = flops / seconds / 1e12
    datasheet = datasheet_bf16_tflops(torch.cuda.get_device_name()) if gpu else None

    model.zero_grad(set_to_none=True)
    if gpu:
        torch.cuda.empty_cache()
    peak = gemm_peak(cfg, b * s) if gpu else {"model_gemm_tflops": None, "square_tflops": None,
                                               "gemm_only_step_s": None}

    if gpu:
        result["sdpa_backends_usable"] = sdpa_backends(cfg["num_attention_heads"], cfg["num_key_value_heads"],
                                                       cfg["head_dim"], s)
    # SDPA against megatron-core's local attention on the same weights
    (local,), _ = build_model(spec, grid, role="actor", layer_spec_name="local", dtype=dtype)
    missing, unexpected = local.load_state_dict(model.state_dict(), strict=False)
    n = min(args.compare_tokens, s)
    model.eval()
    local.eval()
    with torch.no_grad():
        a = model(tokens[:1, :n], positions[:1, :n], None).float()
        ref = local(tokens[:1, :n], positions[:1, :n], None).float()
    rel = ((a - ref).norm() / ref.norm()).item()
    weights_missing = [k for k in missing if not k.endswith("_extra_state")]
    result.update({
        "check": "model_gpu: Llama-3.2-1B shape, forward+backward, bf16, SDPA spec" if gpu else
                 "model_gpu --device cpu: dry run, tiny fp32 Llama, SDPA spec",
        "layer_spec": built.layer_spec, "params": sum(p.numel() for p in model.parameters()),
        "matmul_params": matmul_params(cfg), "batch": b, "seq": s, "tokens_per_step": b * s,
        "steps": args.steps, "warmup": args.warmup, "step_ms_all": times_ms,
        "seconds_per_step": seconds, "seconds_per_step_mean": statistics.mean(times_ms) / 1e3,
        "tokens_per_second": b * s / seconds,
        "model_flops_per_step": flops, "model_tflops": achieved,
        "datasheet_bf16_tflops": datasheet,
        "mfu_vs_datasheet": achieved / datasheet if datasheet else None,
        "gemm_peak_tflops": peak["model_gemm_tflops"],
        "mfu_vs_measured_gemm": achieved / peak["model_gemm_tflops"] if peak["model_gemm_tflops"] else None,
        "gemm_square_tflops": peak["square_tflops"], "gemm_only_step_s": peak["gemm_only_step_s"],
        "gemm_peak": peak, "peak_memory_gib": peak_gib,
        "loss_first": loss[0].item(), "loss_last": loss[-1].item(), "loss_finite": bool(torch.isfinite(loss).all()),
        "sdpa_vs_local_tokens": n, "sdpa_vs_local_rel_l2": rel,
        "sdpa_vs_local_max_abs_logit_diff": (a - ref).abs().max().item(),
        "state_dict_missing": weights_missing[:10], "state_dict_unexpected": list(unexpected)[:10],
        "flop_formula": "per sequence 6*N_mm*s + 12*L*H*d*s^2 (gpu_common.model_flops_per_seq)",
        "timing": "CUDA events per step, median",
    })
    ok = result["loss_finite"] and rel < REL_LOGIT_TOLERANCE and not weights_missing and not unexpected
    for key in ("layer_spec", "params", "batch", "seq", "seconds_per_step", "tokens_per_second", "model_tflops",
                "datasheet_bf16_tflops", "mfu_vs_datasheet", "gemm_peak_tflops", "mfu_vs_measured_gemm",
                "gemm_square_tflops", "peak_memory_gib", "loss_last", "loss_finite", "sdpa_vs_local_rel_l2",
                "sdpa_vs_local_max_abs_logit_diff", "sdpa_backends_usable"):
        value = result.get(key)
        print(f"{key:>36}: {value:.4g}" if isinstance(value, float) else f"{key:>36}: {value}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compare-tokens", type=int, default=256)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run at tiny size")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/model_gpu_<date>.json)")
    args = parser.parse_args(argv)
    import datetime

    out = args.out or Path(__file__).resolve().parent / "results" / f"model_gpu_{datetime.date.today()}.json"
    return run_check("model_gpu", out, lambda result: body(result, args), needs_gpu=args.device == "cuda")


if __name__ == "__main__":
    sys.exit(main())
