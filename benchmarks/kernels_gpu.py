"""GPU check and benchmark of the reshard scatter (hybridflow_mg/reshard/kernels.py).

For realistic copy maps (a Llama-3.2-1B-sized model regrouped from Megatron TP=t shards, gathered in
one bucket, into vLLM TP=t_g parameters: QKV head regroup, gate/up interleave, row-parallel column
merges, vocab row concatenation), checks the kernel against the torch path BITWISE (vector and scalar
tiles, casts included), then times the kernel, the torch path and a plain device-to-device copy of
the same number of bytes (CUDA events, warm-up, median). Prints a table and writes JSON.

    python benchmarks/kernels_gpu.py [--out PATH] [--iters 30] [--tile-elems 16384 ...]

Exit status 1 when there is no GPU, the extension does not build, or any check is not bitwise equal.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this script sits in
from hybridflow_mg.reshard.kernels import DEFAULT_TILE_ELEMS, CopyProgram, load_extension  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Dims:
    """Llama-3.2-1B: 1.24B parameters with tied embeddings."""
    hidden: int = 2048
    layers: int = 16
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 64
    ffn: int = 8192
    vocab: int = 128256


@dataclass(frozen=True)
class Scenario:
    name: str
    tp: int                  # training (Megatron) TP
    tp_gen: int              # generation (vLLM) TP; the bucket holds tp / tp_gen training shards
    src_dtype: torch.dtype
    dst_dtype: torch.dtype
    layers: int | None = None  # None: the whole model, embedding included
    embed: bool = True


SCENARIOS = [
    Scenario("tp2->tp1 bf16", 2, 1, torch.bfloat16, torch.bfloat16),
    Scenario("tp4->tp2 bf16", 4, 2, torch.bfloat16, torch.bfloat16),
    Scenario("tp8->tp1 bf16", 8, 1, torch.bfloat16, torch.bfloat16),
    Scenario("tp2->tp1 fp32->bf16", 2, 1, torch.float32, torch.bfloat16),
    Scenario("tp2->tp1 bf16, 1 layer", 2, 1, torch.bfloat16, torch.bfloat16, layers=1, embed=False),
    Scenario("tp2->tp1 bf16->fp32, 1 layer", 2, 1, torch.bfloat16, torch.float32, layers=1, embed=False),
    Scenario("tp2->tp1 fp32->fp16, 1 layer", 2, 1, torch.float32, torch.float16, layers=1, embed=False),
]


def regroup_map(dims: Dims, sc: Scenario) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], int]:
    """Copy rows, destination shapes and bucket numel for generation rank 0.

    The bucket is the micro-DP all-gather of training ranks 0 .. tp/tp_gen - 1, each rank's parameters
    flattened in order: embedding [V/t, h]; per layer norm [h], linear_qkv [(per KV group: q heads, k,
    v) rows, h], linear_proj [h, H*d/t], norm [h], linear_fc1 [gate_r; up_r], linear_fc2 [h, ffn/t];
    final norm [h]. Destinations are vLLM's: embed, then per layer norm, qkv_proj [q; k; v], o_proj,
    norm, gate_up_proj [gate; up], down_proj; final norm.
    """
    h, d, t, tg = dims.hidden, dims.head_dim, sc.tp, sc.tp_gen
    H, K, L = dims.heads, dims.kv_heads, sc.layers if sc.layers is not None else dims.layers
    if K % t or H % K or dims.ffn % t or dims.vocab % t or t % tg:
        raise ValueError(f"{sc.name}: tp={t} must divide kv_heads, ffn and vocab, and tp_gen={tg} must divide tp")
    q_per_kv, groups, groups_gen = H // K, K // t, K // tg
    dst_shapes: list[tuple[int, ...]] = []
    copies: list[tuple[int, ...]] = []
    src_at = 0

    def run(src_off: int, dst: int, dst_off: int, numel: int) -> None:
        copies.append((src_off, numel, dst, dst_off, numel, 1, numel))

    def dst(shape: tuple[int, ...]) -> int:
        dst_shapes.append(shape)
        return len(dst_shapes) - 1

    embed = dst((dims.vocab // tg, h)) if sc.embed else None
    layer_dsts = [(dst((h,)), dst(((H // tg + 2 * K // tg) * d, h)), dst((h, H * d // tg)), dst((h,)),
                   dst((2 * dims.ffn // tg, h)), dst((h, dims.ffn // tg))) for _ in range(L)]
    final = dst((h,)) if sc.embed else None
    for s in range(t // tg):  # training shard s of the micro-DP group
        if sc.embed:
            rows = dims.vocab // t
            run(src_at, embed, s * rows * h, rows * h)
            src_at += rows * h
        for norm1, qkv, proj, norm2, fc1, fc2 in layer_dsts:
            if s == 0:  # replicated: take shard 0's copy
                run(src_at, norm1, 0, h)
            src_at += h
            for g in range(groups):  # mcore: [q heads of g; k_g; v_g] -> vllm: [q ...; k ...; v ...]
                gen_g = s * groups + g
                q_rows = q_per_kv * d
                run(src_at, qkv, gen_g * q_rows * h, q_rows * h)
                run(src_at + q_rows * h, qkv, (H // tg * d + gen_g * d) * h, d * h)
                run(src_at + (q_rows + d) * h, qkv, ((H // tg + groups_gen) * d + gen_g * d) * h, d * h)
                src_at += (q_rows + 2 * d) * h
            cols, cols_gen = H * d // t, H * d // tg  # row-parallel: column merge
            copies.append((src_at, cols, proj, s * cols, cols_gen, h, cols))
            src_at += h * cols
            if s == 0:
                run(src_at, norm2, 0, h)
            src_at += h
            f, f_gen = dims.ffn // t, dims.ffn // tg  # [gate_s; up_s] -> [gate; up]
            run(src_at, fc1, s * f * h, f * h)
            run(src_at + f * h, fc1, (f_gen + s * f) * h, f * h)
            src_at += 2 * f * h
            copies.append((src_at, f, fc2, s * f, f_gen, h, f))
            src_at += h * f
        if sc.embed:
            if s == 0:
                run(src_at, final, 0, h)
            src_at += h
    return copies, dst_shapes, src_at


def special_values(numel: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random normals on the generator's device with NaN, +-inf, +-0, subnormals and bf16/f16 rounding
    ties mixed in."""
    dev = gen.device
    x = torch.randn(numel, generator=gen, dtype=torch.float32, device=dev)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -3e-39,
                             1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 1.0 + 2.0 ** -11, 65520.0, 1e30], device=dev)
    where = torch.randint(0, numel, (min(numel, 1 << 16),), generator=gen, device=dev)
    x[where] = specials[torch.randint(0, len(specials), where.shape, generator=gen, device=dev)]
    return x.to(dtype)


def time_ms(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({4: torch.int32, 2: torch.int16}[x.element_size()])


def bench(sc: Scenario, tile_elems: int, args, gen: torch.Generator) -> dict:
    dev = torch.device("cuda", torch.cuda.current_device())
    copies, shapes, numel = regroup_map(Dims(), sc)
    src = special_values(numel, sc.src_dtype, gen)
    garbage = [special_values(math.prod(s), sc.dst_dtype, gen).view(s) for s in shapes]
    outs = {k: [g.clone() for g in garbage] for k in ("kernel", "scalar", "torch")}
    del garbage
    kernel = CopyProgram(copies, outs["kernel"], sc.src_dtype, dev, src_numel=numel, tile_elems=tile_elems,
                         use_kernel=True)
    scalar = CopyProgram(copies, outs["scalar"], sc.src_dtype, dev, src_numel=numel, tile_elems=tile_elems,
                         use_kernel=True)
    ref = CopyProgram(copies, outs["torch"], sc.src_dtype, dev, src_numel=numel, use_kernel=False)
    # a misaligned copy of src (1 element in): run() turns vectors off, exercising every scalar tile
    holder = torch.empty(numel + 1, dtype=sc.src_dtype, device=dev)
    src_misaligned = holder[1:]
    src_misaligned.copy_(src)
    kernel.run(src)
    scalar.run(src_misaligned)
    ref.run(src)
    torch.cuda.synchronize()
    equal = all(torch.equal(bits(a), bits(b)) for a, b in zip(outs["kernel"], outs["torch"]))
    equal_scalar = all(torch.equal(bits(a), bits(b)) for a, b in zip(outs["scalar"], outs["torch"]))

    nbytes = kernel.bytes_per_run
    d2d_src = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)  # read + write = nbytes
    d2d_dst = torch.empty_like(d2d_src)
    ms = {
        "kernel": time_ms(lambda: kernel.run(src), args.iters, args.warmup),
        "kernel_scalar": time_ms(lambda: scalar.run(src_misaligned), args.iters, args.warmup),
        "torch": time_ms(lambda: ref.run(src), max(3, args.iters // 5), 2),
        "d2d": time_ms(lambda: d2d_dst.copy_(d2d_src), args.iters, args.warmup),
    }
    gbs = {k: (2 * d2d_src.numel() if k == "d2d" else nbytes) / (v * 1e-3) / 1e9 for k, v in ms.items()}
    return {
        "scenario": sc.name, "tp": sc.tp, "tp_gen": sc.tp_gen, "src_dtype": str(sc.src_dtype).removeprefix("torch."),
        "dst_dtype": str(sc.dst_dtype).removeprefix("torch."), "tile_elems": tile_elems,
        "num_copies": kernel.num_copies, "num_blocks": len(kernel.copies), "num_tiles": kernel.num_tiles,
        "num_torch_launches": ref.num_launches, "num_dsts": len(shapes), "elements": kernel.num_elements,
        "bytes_per_run": nbytes, "ms": ms, "gb_per_s": gbs, "kernel_vs_d2d": gbs["kernel"] / gbs["d2d"],
        "bitwise_equal": equal, "bitwise_equal_scalar": equal_scalar,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/kernels_<device>_<date>.json)")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tile-elems", type=int, nargs="+", default=[DEFAULT_TILE_ELEMS])
    parser.add_argument("--scenarios", nargs="+", default=None, help="names to run (default all)")
    args = parser.parse_args(argv)
    if torch.version.cuda is None or not torch.cuda.is_available():
        sys.exit(f"kernels_gpu.py needs a CUDA GPU (torch {torch.__version__}, cuda available: "
                 f"{torch.cuda.is_available()}); run it on the H100/H200 machine")
    try:
        load_extension()
    except RuntimeError as exc:
        sys.exit(str(exc))

    device = torch.cuda.get_device_name()
    today = dt.date.today().isoformat()
    out = args.out or RESULTS / f"kernels_{re.sub(r'[^a-z0-9]+', '_', device.lower()).strip('_')}_{today}.json"
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    print(f"{device}  torch {torch.__version__}  CUDA {torch.version.cuda}")
    print(f"{'scenario':30} {'tile':>6} {'copies':>6} {'tiles':>7} {'GB':>6} {'kernel GB/s':>11} "
          f"{'scalar':>7} {'torch':>7} {'d2d':>7} {'k/d2d':>6} bitwise")
    for sc in SCENARIOS:
        if args.scenarios and sc.name not in args.scenarios:
            continue
        for tile_elems in args.tile_elems:
            r = bench(sc, tile_elems, args, gen)
            rows.append(r)
            g = r["gb_per_s"]
            print(f"{sc.name:30} {tile_elems:6} {r['num_copies']:6} {r['num_tiles']:7} {r['bytes_per_run'] / 1e9:6.2f} "
                  f"{g['kernel']:11.0f} {g['kernel_scalar']:7.0f} {g['torch']:7.0f} {g['d2d']:7.0f} "
                  f"{r['kernel_vs_d2d']:6.2f} {r['bitwise_equal'] and r['bitwise_equal_scalar']}")
            torch.cuda.empty_cache()
    report = {"date": dt.datetime.now().isoformat(timespec="seconds"), "device": device,
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "gb_per_s_means": "(bytes read + bytes written) / median time; d2d copies the same total",
              "results": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    ok = all(r["bitwise_equal"] and r["bitwise_equal_scalar"] for r in rows)
    if not ok:
        print("MISMATCH: the kernel and the torch path differ (see bitwise_equal in the JSON)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
