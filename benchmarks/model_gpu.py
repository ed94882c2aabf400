"""GPU check: a ~1B Llama-shaped megatron-core model, forward and backward in bf16 with the SDPA spec.

Run on a machine with one GPU (megatron-core installed; no TE needed):

    python benchmarks/model_gpu.py [--out benchmarks/results/model_gpu_<device>_<date>.json]

Prints a table and writes JSON: parameter count, tokens/s for forward+backward, peak memory, loss,
and the max difference of SDPA logits against megatron-core's local attention on the same weights.
Exits with one line when no GPU is present.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA_1B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=5632,
                num_attention_heads=16, num_key_value_heads=8, num_hidden_layers=16, vocab_size=32000,
                max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0})


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("model_gpu.py: no GPU here; run it on a GPU machine (see benchmarks/results/README.md)")
        return 2
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    os.environ.setdefault("MASTER_PORT", "29531")
    from hybridflow_mg.parallel.grid import Grid
    from hybridflow_mg.parallel.launch import init_distributed
    from hybridflow_mg.parallel.layout import ParallelLayout
    from hybridflow_mg.models.build import build_model
    from hybridflow_mg.models.hf_spec import spec_from_hf

    _, device = init_distributed()
    grid = Grid.create(ParallelLayout(world=1, tp=1, pp=1, gen_tp=1), device)
    spec = spec_from_hf(LLAMA_1B)
    (model,), built = build_model(spec, grid, role="actor", layer_spec_name="sdpa", dtype="bfloat16", init=True)
    params = sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, 32000, (args.batch, args.seq), device=device)
    positions = torch.arange(args.seq, device=device).expand(args.batch, -1)

    def step():
        loss = model(tokens, positions, None, labels=tokens).float().mean()
        loss.backward()
        return loss

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps

    # SDPA against megatron-core's local attention on the same weights (first 256 tokens)
    (local,), _ = build_model(spec, grid, role="actor", layer_spec_name="local", dtype="bfloat16")
    local.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        a = model(tokens[:1, :256], positions[:1, :256], None).float()
        b = local(tokens[:1, :256], positions[:1, :256], None).float()
    result = {
        "check": "llama-1b forward+backward, bf16, SDPA spec",
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "params": params,
        "batch": args.batch, "seq": args.seq,
        "seconds_per_step": seconds,
        "tokens_per_second": args.batch * args.seq / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss": loss.item(),
        "loss_finite": bool(torch.isfinite(loss)),
        "sdpa_vs_local_max_abs_logit_diff": (a - b).abs().max().item(),
    }
    for key, value in result.items():
        print(f"{key:>36}: {value}")
    out = Path(args.out or f"benchmarks/results/model_gpu_{result['device'].replace(' ', '_')}_{result['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    grid.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
