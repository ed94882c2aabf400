"""GPU checks 3 and 4: the actor update on one device through our code path, and training-state offload.

    python benchmarks/train_gpu.py [--mode train|offload] [--device auto|cuda|cpu] [--out PATH] [...]

Both modes build a world-1 grid (`init_distributed`, `Grid.create`), the actor with `build_model` and
wrap it in `ModelWorker(grid, chunks, optim=..., name="actor")`: on a GPU that is megatron-core DDP
(fp32 grad buffers) + the distributed optimizer (Adam), as in a real run. Every step is
`worker.train(Sequences.build(prompts, responses, group), loss, token_budget=...)` with `loss` the
per-token cross-entropy of the response tokens (`actor_head(grid)` log-probs, masked by
`mb.response_mask`, divided by the step's response-token count), as trainer/warm_start.py does.
Prompts and responses are random token ids of random lengths (seeded); the same batch every step.

--mode train (check 3): GPU default Llama-3.2-1B shape (gpu_common.LLAMA_1B) in bf16 with the SDPA spec;
CPU default a tiny fp32 Llama with the local spec (the same code path, small enough for a laptop).
Reports: seconds per optimizer step (median of --steps after --warmup, wall clock around
`worker.train`, which ends in a host sync), optimizer steps/s, tokens/s (prompt + response tokens,
padding excluded), padding share of the tokens the model actually processed (counted by a forward
pre-hook), model TFLOP/s and MFU (gpu_common.model_flops_per_seq summed over the real sequences, so
padding is NOT counted as useful work) against the datasheet bf16 peak and the bf16 GEMM rate measured
here at m = --token-budget; peak torch.cuda.max_memory_allocated; grad norms finite, no skipped update.

--mode offload (check 4; vLLM is not needed): two identical actors A and B (B loads A's initial
weights; --offload-layers layers of the 1B shape, bf16, local attention spec, deterministic algorithms
on). One step each; A's params, grads and optimizer states go to pinned host memory through
`hybridflow_mg.rollout.offload.TrainingStateOffloader` (the "generation" gap) and come back. Checks:
torch.cuda.memory_allocated drops by the bytes moved; A's whole training state (params, main grads,
optimizer params and states) is bit-identical before offload and after reload; one more step on A and
on B gives bit-identical loss, grad norm and state (decided only when step 1 was already bit-identical
on A and B: the control). Also reports offload/reload seconds and what stays on the GPU.

--mode resume (check 5): the optimizer state saved after step 1 through `checkpoint/optimizer_state.py`
(megatron-core dist_checkpointing; the distributed optimizer on GPU), then steps 2 and 3; step 1's
weights and the saved state loaded back, steps 2 and 3 again: their metrics and the optimizer state
(fp32 main params, Adam moments) must be bit-identical; the model params' largest difference is reported.

Exit status (gpu_common): 0 ok, 1 a check failed, 2 no GPU (offload mode on CPU is a dry run: 0),
3 megatron-core import/API error while building.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this script sits in
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import (LLAMA_1B, LLAMA_TINY, datasheet_bf16_tflops, gemm_peak, model_flops_per_seq,  # noqa: E402
                        on_exit, run_check, teardown)


def optim_config(lr: float, clip_grad: float):
    """OptimConfig from trainer/config.py when it imports; the same attributes otherwise."""
    try:
        from hybridflow_mg.trainer.config import OptimConfig

        return OptimConfig(lr=lr, weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-8, clip_grad=clip_grad)
    except ImportError:
        return SimpleNamespace(lr=lr, weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-8, clip_grad=clip_grad)


def random_batch(vocab: int, n: int, prompt_range: tuple[int, int], response_range: tuple[int, int], seed: int):
    """n (prompt, response) token-id lists with lengths uniform in the inclusive ranges."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = [(int(torch.randint(prompt_range[0], prompt_range[1] + 1, (1,), generator=g)),
                int(torch.randint(response_range[0], response_range[1] + 1, (1,), generator=g))) for _ in range(n)]
    prompts = [torch.randint(1, vocab, (p,), generator=g).tolist() for p, _ in lengths]
    responses = [torch.randint(1, vocab, (r,), generator=g).tolist() for _, r in lengths]
    return prompts, responses


def cross_entropy_loss(grid, seqs):
    """Per-token CE on response tokens with the step's global token count (as trainer/warm_start.py)."""
    from hybridflow_mg.trainer.roles import actor_head

    head = actor_head(grid)
    num_tokens = float(seqs.response_mask.sum())

    def loss(logits, mb):
        mask = mb.response_mask.to(logits.device)
        nll = -(head(logits, mb)["logprobs"] * mask).sum()
        return nll / num_tokens, {"tokens": mask.sum()}

    return loss


def setup(args, cfg: dict, port: str):
    """(grid, device, spec) on a world-1 grid."""
    os.environ.setdefault("MASTER_PORT", port)
    from hybridflow_mg.models.hf_spec import spec_from_hf
    from hybridflow_mg.parallel.grid import Grid
    from hybridflow_mg.parallel.launch import init_distributed
    from hybridflow_mg.parallel.layout import ParallelLayout

    backend = "gloo" if args.device == "cpu" else "auto"
    _, device = init_distributed(backend=backend)
    grid = Grid.create(ParallelLayout(world=1, tp=1, pp=1, gen_tp=1), device)
    on_exit(lambda: teardown(grid))  # after the JSON is written: a hang here cannot lose the result
    return grid, device, spec_from_hf(cfg)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# --- check 3: throughput of the actor update ---------------------------------------------------------------
def train_body(result: dict, args) -> bool:
    import torch

    from hybridflow_mg.models.build import build_model
    from hybridflow_mg.trainer.batch import Sequences
    from hybridflow_mg.trainer.workers import ModelWorker

    gpu = args.device == "cuda"
    cfg = LLAMA_1B if gpu else LLAMA_TINY
    grid, device, spec = setup(args, cfg, "29533")
    chunks, built = build_model(spec, grid, role="actor", layer_spec_name=args.spec,
                                dtype="bfloat16" if gpu else "float32", init=True)
    worker = ModelWorker(grid, chunks, optim=optim_config(args.lr, 1.0), name="actor")
    processed = [0]
    worker.modules[0].register_forward_pre_hook(lambda _m, inputs: processed.__setitem__(
        0, processed[0] + inputs[0].numel()))
    prompts, responses = random_batch(cfg["vocab_size"], args.seqs, args.prompt_len, args.response_len, seed=0)
    seqs = Sequences.build(prompts, responses, group=list(range(len(prompts))))
    real_lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    real_tokens = sum(real_lengths)
    loss = cross_entropy_loss(grid, seqs)
    built_gib = torch.cuda.memory_allocated() / 2**30 if gpu else None  # Adam states come at step 1

    steps = []
    for i in range(args.warmup + args.steps):
        if gpu and i == args.warmup:
            torch.cuda.reset_peak_memory_stats()
        processed[0] = 0
        sync(device)
        start = time.perf_counter()
        metrics = worker.train(seqs, loss, token_budget=args.token_budget)
        sync(device)
        steps.append({"seconds": time.perf_counter() - start, "processed_tokens": processed[0], **metrics})
        result["phase"] = "run"  # built and stepped once: later errors are not API errors
    timed = steps[args.warmup:]
    seconds = statistics.median(s["seconds"] for s in timed)
    flops = sum(model_flops_per_seq(cfg, n) for n in real_lengths)
    achieved = flops / seconds / 1e12
    grad_norms = [s["grad_norm"] for s in steps]
    result.update({
        "check": f"train_gpu: actor update through ModelWorker.train on one {device.type} device",
        "model": "Llama-3.2-1B shape" if gpu else "tiny Llama (gpu_common.LLAMA_TINY)",
        "layer_spec": built.layer_spec, "dtype": str(built.dtype).removeprefix("torch."),
        "params": sum(p.numel() for p in worker.modules[0].parameters()),
        "optimizer": type(worker.optimizer).__name__,
        "distributed_optimizer": any(type(o).__name__ == "DistributedOptimizer"
                                     for o in getattr(worker.optimizer, "chained_optimizers", [worker.optimizer])),
        "sequences": len(seqs), "prompt_len_range": args.prompt_len, "response_len_range": args.response_len,
        "token_budget": args.token_budget, "real_tokens_per_step": real_tokens,
        "response_tokens_per_step": int(seqs.response_mask.sum()),
        "processed_tokens_per_step": timed[-1]["processed_tokens"],
        "padding_share": 1 - real_tokens / max(timed[-1]["processed_tokens"], 1),
        "warmup": args.warmup, "steps": args.steps, "step_seconds_all": [s["seconds"] for s in steps],
        "seconds_per_step": seconds, "optimizer_steps_per_second": 1 / seconds,
        "tokens_per_second": real_tokens / seconds,
        "model_flops_per_step": flops, "model_tflops": achieved,
        "losses": [s["loss"] for s in steps], "grad_norms": grad_norms,
        "grad_norm_finite": all(map(lambda g: g == g and abs(g) != float("inf"), grad_norms)),
        "updates_skipped": sum(s["update_skipped"] for s in steps),
        "loss_decreased": steps[-1]["loss"] < steps[0]["loss"],
        "memory_after_build_gib": built_gib,
        "memory_after_steps_gib": torch.cuda.memory_allocated() / 2**30 if gpu else None,
        "flop_formula": "sum over real sequences of 6*N_mm*s + 12*L*H*d*s^2 (gpu_common.model_flops_per_seq); "
                        "padding excluded",
        "timing": "wall clock around worker.train (ends in a host sync), median",
    })
    if gpu:
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        datasheet = datasheet_bf16_tflops(torch.cuda.get_device_name())
        peak = gemm_peak(cfg, args.token_budget, iters=5, warmup=2)
        result.update(datasheet_bf16_tflops=datasheet, mfu_vs_datasheet=achieved / datasheet if datasheet else None,
                      gemm_peak_tflops=peak["model_gemm_tflops"],
                      mfu_vs_measured_gemm=achieved / peak["model_gemm_tflops"], gemm_peak=peak)
    ok = result["grad_norm_finite"] and result["updates_skipped"] == 0 and all(
        s["loss"] == s["loss"] for s in steps)
    for key in ("model", "layer_spec", "dtype", "params", "optimizer", "distributed_optimizer", "real_tokens_per_step",
                "padding_share", "seconds_per_step", "optimizer_steps_per_second", "tokens_per_second",
                "model_tflops", "mfu_vs_datasheet", "gemm_peak_tflops", "mfu_vs_measured_gemm", "peak_memory_gib",
                "grad_norm_finite", "updates_skipped", "loss_decreased"):
        value = result.get(key)
        print(f"{key:>28}: {value:.4g}" if isinstance(value, float) else f"{key:>28}: {value}")
    print(f"{'losses':>28}: {[round(x, 4) for x in result['losses']]}")
    return ok


# --- check 4: training-state offload around a generation gap ------------------------------------------------
def state_tensors(worker) -> dict:
    """Every tensor of a worker's training state: params, DDP main grads, optimizer params and states."""
    import torch

    out = {}
    for i, module in enumerate(worker.modules):
        for name, p in module.named_parameters():
            out[f"param/{i}/{name}"] = p
            if getattr(p, "main_grad", None) is not None:
                out[f"main_grad/{i}/{name}"] = p.main_grad
    inner = getattr(worker.optimizer, "optimizer", worker.optimizer)  # megatron wraps a torch optimizer
    for gi, group in enumerate(inner.param_groups):
        for pi, p in enumerate(group["params"]):
            out[f"opt_param/{gi}/{pi}"] = p
            for key, value in inner.state.get(p, {}).items():
                if torch.is_tensor(value):
                    out[f"opt_state/{gi}/{pi}/{key}"] = value
    return out


def fingerprint(t) -> tuple[int, int]:
    """Two int64 sums over the raw bits of `t` (plain and position-weighted): equal bits give equal sums."""
    import torch

    flat = t.detach().contiguous().view(-1)
    word = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    bits = flat.view(word)
    s1 = s2 = 0
    for at in range(0, bits.numel(), 1 << 25):
        chunk = bits[at:at + (1 << 25)].to(torch.int64)
        weight = (torch.arange(at, at + chunk.numel(), device=chunk.device) % 8191) + 1
        s1 += int(chunk.sum())
        s2 += int((chunk * weight).sum())
    return s1, s2


def offload_body(result: dict, args) -> bool:
    import torch
    import torch.utils.deterministic

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # keep the offloader's host buffers as in a run
    from hybridflow_mg.models.build import build_model
    from hybridflow_mg.rollout.offload import TrainingStateOffloader
    from hybridflow_mg.utils.optim import torch_optimizers
    from hybridflow_mg.trainer.batch import Sequences
    from hybridflow_mg.trainer.workers import ModelWorker

    gpu = args.device == "cuda"
    cfg = dict(LLAMA_1B, num_hidden_layers=args.offload_layers) if gpu else LLAMA_TINY
    dtype = "bfloat16" if gpu else "float32"
    grid, device, spec = setup(args, cfg, "29535")
    chunks_a, _ = build_model(spec, grid, role="actor", layer_spec_name="local", dtype=dtype, init=True)
    chunks_b, _ = build_model(spec, grid, role="actor", layer_spec_name="local", dtype=dtype)
    for a, b in zip(chunks_a, chunks_b):
        b.load_state_dict(a.state_dict())
    a_worker = ModelWorker(grid, chunks_a, optim=optim_config(1e-4, 1.0), name="actor_a")
    b_worker = ModelWorker(grid, chunks_b, optim=optim_config(1e-4, 1.0), name="actor_b")
    prompts, responses = random_batch(cfg["vocab_size"], 8 if gpu else 6, (32, 128) if gpu else (3, 8),
                                      (64, 384) if gpu else (3, 10), seed=1)
    seqs = Sequences.build(prompts, responses, group=list(range(len(prompts))))
    loss = cross_entropy_loss(grid, seqs)
    budget = 2048 if gpu else 48

    def same_state() -> tuple[bool, list[str]]:
        sa, sb = state_tensors(a_worker), state_tensors(b_worker)
        if sa.keys() != sb.keys():
            return False, sorted(set(sa) ^ set(sb))[:5]
        diff = [k for k in sa if not torch.equal(sa[k], sb[k])]
        return not diff, diff[:5]

    m1a = a_worker.train(seqs, loss, token_budget=budget)
    m1b = b_worker.train(seqs, loss, token_budget=budget)
    result["phase"] = "run"
    control, control_diff = same_state()
    control = control and m1a == m1b

    before_fp = {k: fingerprint(v) for k, v in state_tensors(a_worker).items()}
    offloader = TrainingStateOffloader(a_worker.chunks, a_worker.optimizer)
    sync(device)
    mem_before = torch.cuda.memory_allocated() if gpu else 0
    t0 = time.perf_counter()
    moved = offloader.offload()
    t_off = time.perf_counter() - t0
    mem_gap = torch.cuda.memory_allocated() if gpu else 0
    left = sum(p.numel() * p.element_size() for inner in torch_optimizers(a_worker.optimizer)
               for g in inner.param_groups for p in g["params"] if p.is_cuda and p.untyped_storage().size() > 0)
    t0 = time.perf_counter()
    reloaded = offloader.reload()
    t_re = time.perf_counter() - t0
    after_fp = {k: fingerprint(v) for k, v in state_tensors(a_worker).items()}
    restored = before_fp == after_fp
    changed = [k for k in before_fp if before_fp[k] != after_fp.get(k)][:5]

    m2a = a_worker.train(seqs, loss, token_budget=budget)
    m2b = b_worker.train(seqs, loss, token_budget=budget)
    step2_same, step2_diff = same_state()
    step2_same = step2_same and m2a == m2b
    drop = mem_before - mem_gap
    n_tensors = len(offloader._tensors()) if gpu else 0
    tolerance = 512 * max(n_tensors, 1) + (1 << 20)  # the caching allocator rounds blocks to 512 B
    result.update({
        "check": "train_gpu --mode offload: TrainingStateOffloader around a generation gap",
        "model": f"Llama-3.2-1B shape, {cfg['num_hidden_layers']} layers" if gpu else "tiny Llama",
        "layer_spec": "local", "dtype": dtype, "deterministic_algorithms": True,
        "params": sum(p.numel() for p in a_worker.modules[0].parameters()),
        "bytes_moved": moved, "bytes_reloaded": reloaded,
        "memory_allocated_before": mem_before, "memory_allocated_during_gap": mem_gap,
        "memory_drop_bytes": drop, "memory_drop_matches_moved": abs(drop - moved) <= tolerance if gpu else None,
        "optimizer_params_left_on_gpu_bytes": left,
        "offload_seconds": t_off, "reload_seconds": t_re,
        "offload_gb_per_s": moved / t_off / 1e9 if moved else None,
        "reload_gb_per_s": reloaded / t_re / 1e9 if reloaded else None,
        "state_restored_bitwise": restored, "state_changed_tensors": changed,
        "control_step1_bit_identical": control, "control_diff": control_diff,
        "step2_bit_identical": step2_same if control else None, "step2_diff": step2_diff,
        "step1": {"a": m1a, "b": m1b}, "step2": {"a": m2a, "b": m2b},
    })
    ok = restored and (step2_same if control else True)
    if gpu:
        ok = ok and moved > 0 and result["memory_drop_matches_moved"]
    for key in ("model", "bytes_moved", "memory_drop_bytes", "memory_drop_matches_moved",
                "optimizer_params_left_on_gpu_bytes", "offload_seconds", "reload_seconds",
                "state_restored_bitwise", "control_step1_bit_identical", "step2_bit_identical"):
        value = result[key]
        print(f"{key:>36}: {value:.4g}" if isinstance(value, float) else f"{key:>36}: {value}")
    return ok


def resume_body(result: dict, args) -> bool:
    """--mode resume: the optimizer state through `checkpoint/optimizer_state.py` (megatron-core
    dist_checkpointing; on GPU the distributed optimizer's sharded state), saved after step 1 and loaded
    back with step 1's weights: step 2 replayed must equal step 2 bit for bit (state and metrics)."""
    import tempfile

    import torch
    import torch.utils.deterministic

    torch.use_deterministic_algorithms(True, warn_only=True)
    from hybridflow_mg.checkpoint.optimizer_state import load_optimizer_state, save_optimizer_state
    from hybridflow_mg.models.build import build_model
    from hybridflow_mg.trainer.batch import Sequences
    from hybridflow_mg.trainer.workers import ModelWorker

    gpu = args.device == "cuda"
    cfg = dict(LLAMA_1B, num_hidden_layers=args.offload_layers) if gpu else LLAMA_TINY
    grid, device, spec = setup(args, cfg, "29537")
    chunks, _ = build_model(spec, grid, role="actor", layer_spec_name="local", dtype="bfloat16" if gpu else "float32",
                            init=True)
    worker = ModelWorker(grid, chunks, optim=optim_config(1e-4, 1.0), name="actor")
    prompts, responses = random_batch(cfg["vocab_size"], 8 if gpu else 6, (32, 128) if gpu else (3, 8),
                                      (64, 384) if gpu else (3, 10), seed=2)
    seqs = Sequences.build(prompts, responses, group=list(range(len(prompts))))
    loss, budget = cross_entropy_loss(grid, seqs), 2048 if gpu else 48
    worker.train(seqs, loss, token_budget=budget)
    result["phase"] = "run"

    def params_now():
        return [p.detach().clone() for c in worker.modules for p in c.parameters()]

    def optimizer_state():  # fp32 main params and Adam moments (the model's bf16 params are compared apart)
        return {k: fingerprint(v) for k, v in state_tensors(worker).items() if k.startswith("opt_")}

    saved_params = params_now()
    with tempfile.TemporaryDirectory() as ckpt:
        t0 = time.perf_counter()
        save_optimizer_state(worker, ckpt)
        t_save = time.perf_counter() - t0
        files = sum(f.stat().st_size for f in Path(ckpt).rglob("*") if f.is_file())
        first = [worker.train(seqs, loss, token_budget=budget) for _ in range(2)]  # steps 2 and 3
        want, want_params = optimizer_state(), params_now()
        with torch.no_grad():
            for p, saved in zip((p for c in worker.modules for p in c.parameters()), saved_params):
                p.copy_(saved)
        t0 = time.perf_counter()
        load_optimizer_state(worker, ckpt)
        t_load = time.perf_counter() - t0
    again = [worker.train(seqs, loss, token_budget=budget) for _ in range(2)]  # steps 2 and 3 replayed
    got, got_params = optimizer_state(), params_now()
    diff = [k for k in want if want[k] != got.get(k)][:5]
    param_diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(want_params, got_params))
    inner = getattr(worker.optimizer, "chained_optimizers", [worker.optimizer])
    result.update({
        "check": "train_gpu --mode resume: optimizer state saved and loaded through dist_checkpointing",
        "optimizer": type(inner[0]).__name__, "checkpoint_bytes": files, "save_seconds": t_save,
        "load_seconds": t_load, "steps_2_3": first, "steps_2_3_replayed": again, "metrics_identical": first == again,
        "state_identical": not diff and want.keys() == got.keys(), "state_diff": diff,
        "model_params_max_abs_diff": param_diff,
    })
    for key in ("optimizer", "checkpoint_bytes", "save_seconds", "load_seconds", "metrics_identical", "state_identical",
                "model_params_max_abs_diff"):
        value = result[key]
        print(f"{key:>26}: {value:.4g}" if isinstance(value, float) else f"{key:>26}: {value}")
    return result["metrics_identical"] and result["state_identical"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("train", "offload", "resume"), default="train")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--seqs", type=int, default=None, help="sequences per step (GPU 32, CPU 8)")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=None, help="min max (GPU 128 512, CPU 4 12)")
    parser.add_argument("--response-len", type=int, nargs=2, default=None, help="min max (GPU 256 1024, CPU 4 16)")
    parser.add_argument("--token-budget", type=int, default=None, help="micro-batch tokens (GPU 8192, CPU 64)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (GPU 5, CPU 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU 2, CPU 1)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--spec", choices=("local", "sdpa"), default=None, help="train mode (GPU sdpa, CPU local)")
    parser.add_argument("--offload-layers", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.mode in ("offload", "resume"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS handle
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    defaults = dict(seqs=(32, 8), prompt_len=((128, 512), (4, 12)), response_len=((256, 1024), (4, 16)),
                    token_budget=(8192, 64), steps=(5, 3), warmup=(2, 1), spec=("sdpa", "local"))
    for key, (on_gpu, on_cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, on_gpu if gpu else on_cpu)
    args.prompt_len, args.response_len = tuple(args.prompt_len), tuple(args.response_len)
    body = {"train": train_body, "offload": offload_body, "resume": resume_body}[args.mode]
    name = {"train": "train_gpu", "offload": "offload_gpu", "resume": "resume_gpu"}[args.mode]
    return run_check(name, args.out, lambda result: body(result, args), needs_gpu=gpu)


if __name__ == "__main__":
    sys.exit(main())
