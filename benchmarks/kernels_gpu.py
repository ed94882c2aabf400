"""GPU check 2 and benchmark of the reshard scatter (hybridflow_mg/reshard/kernels.py, csrc/).

For realistic copy maps (a Llama-3.2-1B-sized model regrouped from Megatron TP=t shards, gathered in
one bucket, into vLLM TP=t_g parameters: QKV head regroup, gate/up interleave, row-parallel column
merges, vocab row concatenation), checks the kernel against the torch path BITWISE (vector and scalar
tiles, casts included, NaN/inf/subnormal/rounding-tie inputs, destinations pre-filled with such values),
checks that the map writes every destination element, then times the kernel, the torch path and a
plain device-to-device copy of the same number of bytes (CUDA events, warm-up, median). Prints a table
and writes JSON.

    python benchmarks/kernels_gpu.py [--out PATH] [--iters 30] [--tile-elems 16384 ...]

Build: `load_extension` (torch.utils.cpp_extension + ninja) for the device's own arch
(TORCH_CUDA_ARCH_LIST defaults to it, e.g. "9.0" -> sm_90 on H100/H200). If that build fails (e.g. no
Python headers on the machine), the same csrc/reshard_kernels.cu is built with nvcc alone into a shared
library and called through its C ABI (reshard_kernels.h) with ctypes: same kernel, no torch binding.

Exit status 0 all bitwise equal, 1 a mismatch or an error, 2 no GPU.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this script sits in
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import cuda_times_ms  # noqa: E402
from hybridflow_mg.reshard import kernels  # noqa: E402
from hybridflow_mg.reshard.kernels import DEFAULT_TILE_ELEMS, DTYPE_CODES, CopyProgram, load_extension  # noqa: E402

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
    """Median ms per call from CUDA events, after `warmup` untimed calls (gpu_common.cuda_times_ms)."""
    return statistics.median(cuda_times_ms(fn, iters, warmup))


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
    covers_all = kernel.num_elements == sum(math.prod(s) for s in shapes)  # blocks never overlap (map's contract)

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
        "bitwise_equal": equal, "bitwise_equal_scalar": equal_scalar, "covers_all_dst_elements": covers_all,
    }


class CtypesExtension:
    """The two entry points `CopyProgram` uses (`launch`, `vec_elems`), over the C ABI of a plain nvcc build."""

    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(str(path))
        lib.hfmg_reshard_launch.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                            ctypes.c_void_p]
        lib.hfmg_reshard_launch.restype = ctypes.c_int
        lib.hfmg_reshard_vec_elems.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.hfmg_reshard_vec_elems.restype = ctypes.c_int
        lib.hfmg_reshard_error_string.argtypes = [ctypes.c_int]
        lib.hfmg_reshard_error_string.restype = ctypes.c_char_p
        self.lib = lib

    def vec_elems(self, src_dtype: int, dst_dtype: int) -> int:
        return self.lib.hfmg_reshard_vec_elems(src_dtype, dst_dtype)

    def launch(self, src, tiles, dst_ptrs, dst_dtype, allow_vec, stream) -> None:
        rc = self.lib.hfmg_reshard_launch(src.data_ptr(), DTYPE_CODES[src.dtype], int(dst_dtype), dst_ptrs.data_ptr(),
                                          tiles.data_ptr(), tiles.size(0), int(bool(allow_vec)), src.get_device(),
                                          stream)
        if rc:
            raise RuntimeError(f"reshard kernel launch failed: {self.lib.hfmg_reshard_error_string(rc).decode()} "
                               f"(code {rc})")


def build_kernel() -> dict:
    """Build and load the kernel; returns how (the record goes into the JSON). Raises when both ways fail."""
    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    record = {"arch_list": os.environ["TORCH_CUDA_ARCH_LIST"]}
    start = time.perf_counter()
    try:
        ext = load_extension()
        record.update(how="torch.utils.cpp_extension", seconds=time.perf_counter() - start, library=ext.__file__)
        return record
    except RuntimeError as exc:
        record["cpp_extension_error"] = str(exc)
        print(f"cpp_extension build failed, falling back to nvcc + ctypes: {exc}")
    nvcc = shutil.which("nvcc") or str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    csrc = Path(kernels.__file__).resolve().parents[2] / "csrc"
    out_dir = Path(os.environ.get("XDG_CACHE_HOME") or "/tmp") / "hfmg_reshard_ctypes"
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / "libhfmg_reshard.so"
    arch = f"{major}{minor}"
    cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "-I", str(csrc), "-o", str(lib), str(csrc / "reshard_kernels.cu")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"nvcc build failed too ({' '.join(cmd)}): {proc.stderr.strip()[-1500:]}")
    kernels._EXT = CtypesExtension(lib)  # load_extension() now returns it; CopyProgram uses only these two calls
    record.update(how="nvcc + ctypes (C ABI of csrc/reshard_kernels.h)", seconds=time.perf_counter() - start,
                  library=str(lib), command=" ".join(cmd))
    return record


def sass_archs(library: str) -> list[str]:
    """The machine-code targets embedded in the built library (cuobjdump --list-elf), when cuobjdump exists."""
    tool = shutil.which("cuobjdump")
    if not tool or not library:
        return []
    proc = subprocess.run([tool, "--list-elf", library], capture_output=True, text=True)
    return sorted(set(re.findall(r"sm_\d+a?", proc.stdout)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/kernels_<device>_<date>.json)")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tile-elems", type=int, nargs="+", default=[DEFAULT_TILE_ELEMS])
    parser.add_argument("--scenarios", nargs="+", default=None, help="names to run (default all)")
    args = parser.parse_args(argv)
    today = dt.date.today().isoformat()
    report = {"check": "kernels_gpu: reshard scatter kernel vs torch path vs device-to-device copy",
              "date": dt.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
              "cuda": torch.version.cuda, "status": "running"}
    if torch.version.cuda is None or not torch.cuda.is_available():
        print(f"kernels_gpu.py needs a CUDA GPU, and none is here (torch {torch.__version__}, cuda available: "
              f"{torch.cuda.is_available()}); run it on the H100/H200 machine")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({**report, "status": "skipped", "reason": "no GPU"}, indent=2) + "\n")
        return 2
    device = torch.cuda.get_device_name()
    report["device"] = device
    out = args.out or RESULTS / f"kernels_{re.sub(r'[^a-z0-9]+', '_', device.lower()).strip('_')}_{today}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        report["build"] = build_kernel()
        report["build"]["sass"] = sass_archs(report["build"].get("library", ""))
        build = report["build"]
        print(f"built in {build['seconds']:.1f} s via {build['how']}; SASS {build['sass']}")
        gen = torch.Generator(device="cuda").manual_seed(0)
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
                print(f"{sc.name:30} {tile_elems:6} {r['num_copies']:6} {r['num_tiles']:7} "
                      f"{r['bytes_per_run'] / 1e9:6.2f} {g['kernel']:11.0f} {g['kernel_scalar']:7.0f} "
                      f"{g['torch']:7.0f} "
                      f"{g['d2d']:7.0f} {r['kernel_vs_d2d']:6.2f} {r['bitwise_equal'] and r['bitwise_equal_scalar']}",
                      flush=True)
                torch.cuda.empty_cache()
        ok = bool(rows) and all(r["bitwise_equal"] and r["bitwise_equal_scalar"] and r["covers_all_dst_elements"]
                                for r in rows)
        report["status"] = "ok" if ok else "failed"
        if not ok:
            print("MISMATCH: the kernel and the torch path differ, or a map misses destination elements (see JSON)")
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON, exit 1
        ok = False
        report.update(status="error", error=f"{type(exc).__name__}: {exc}"[:3000])
        print(f"kernels_gpu.py: error: {type(exc).__name__}: {exc}", file=sys.stderr)
    report.update(gb_per_s_means="(bytes read + bytes written) / median time; d2d copies the same total",
                  timing="CUDA events per call, median", results=rows)
    if rows:
        report["kernel_vs_d2d_min"] = min(r["kernel_vs_d2d"] for r in rows)
        report["kernel_vs_d2d_whole_model_bf16"] = next((r["kernel_vs_d2d"] for r in rows
                                                         if r["scenario"] == "tp2->tp1 bf16"), None)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
