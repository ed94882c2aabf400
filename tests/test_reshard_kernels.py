"""Reshard scatter: the torch path against a naive element loop, map validation, the kernel's tile
table (every element exactly once, vector tiles aligned), and compile checks of the CUDA sources."""
import ctypes
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from hybridflow_mg.reshard import kernels as K
from hybridflow_mg.reshard.kernels import (
    COLS, DST_INDEX, DST_OFF, DST_STRIDE, FLAGS, ROWS, SRC_OFF, SRC_STRIDE, TILE_VEC, CopyProgram,
    affine_groups, build_tiles, copy_table, kernel_available, load_extension, normalize_copies,
)

ROOT = Path(__file__).resolve().parents[1]
BITS = {4: torch.int32, 2: torch.int16}


def load_benchmark():
    spec = importlib.util.spec_from_file_location("kernels_gpu", ROOT / "benchmarks" / "kernels_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels_gpu"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def bits(x):
    return x.view(BITS[x.element_size()])


def random_map(gen, num_dsts=3, max_dim=20, src_numel=3000):
    """A random copy map: each dst [R, C] is cut into a grid of rectangles, most of which become a
    block read from a random place in src (row strides >= cols, 0, or overlapping reads); full-width
    rectangles sometimes become one contiguous run, runs are sometimes split in consecutive pieces (to
    be merged again), a few empty blocks are mixed in, and the order is shuffled."""
    def ri(lo, hi):  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    shapes = [(ri(1, max_dim), ri(1, max_dim)) for _ in range(num_dsts)]
    rows_out = []
    for di, (R, C) in enumerate(shapes):
        rcuts = sorted({0, R, *[ri(1, R) for _ in range(ri(0, 3))]})
        ccuts = sorted({0, C, *[ri(1, C) for _ in range(ri(0, 3))]})
        for r0, r1 in zip(rcuts, rcuts[1:]):
            for c0, c1 in zip(ccuts, ccuts[1:]):
                if ri(0, 9) == 0:
                    continue  # left untouched
                rows, cols = r1 - r0, c1 - c0
                if cols == C and ri(0, 1):  # whole rows: one contiguous run, maybe split in pieces
                    n, off = rows * cols, ri(0, src_numel - rows * cols)
                    cut = ri(0, n)
                    for a, b in ((0, cut), (cut, n)):
                        rows_out.append((off + a, ri(0, 9), di, r0 * C + a, ri(0, 9), 1, b - a))
                    continue
                stride = [cols + ri(0, 5), 0, max(1, cols - 1)][ri(0, 2) if ri(0, 3) == 0 else 0]
                off = ri(0, src_numel - ((rows - 1) * stride + cols))
                rows_out.append((off, stride, di, r0 * C + c0, C, rows, cols))
        rows_out.append((ri(0, src_numel), ri(0, 5), di, ri(0, R * C), C, ri(0, 3), 0))  # empty
    order = torch.randperm(len(rows_out), generator=gen).tolist()
    return torch.tensor([rows_out[i] for i in order], dtype=torch.long).reshape(-1, 7), shapes


def naive(copies, src, dsts):
    """Element by element on integer bit patterns; the cast is elementwise so it is applied up front."""
    src_bits = bits(src.to(dsts[0].dtype)).tolist()
    out = [bits(d.clone()).view(-1).tolist() for d in dsts]
    for so, ss, di, do, ds, rows, cols in copies.tolist():
        for r in range(rows):
            for c in range(cols):
                out[di][do + r * ds + c] = src_bits[so + r * ss + c]
    return [torch.tensor(o, dtype=BITS[d.element_size()]).view(d.shape) for o, d in zip(out, dsts)]


def same_bits(got, want_bits):
    """Bitwise, except that a NaN only has to stay NaN: torch's own CPU float -> bf16 cast writes NaN
    as 0x7FC0 or 0xFFFF depending on the loop it takes (0-dim vs vectorised AVX-512), so NaN payloads of
    Tensor.to are not one thing on CPU. On GPU torch and the kernel both use cvt.rn, and the GPU
    benchmark compares every bit, NaNs included."""
    want = want_bits.view(got.dtype)
    nan = torch.isnan(want)
    return torch.equal(torch.isnan(got), nan) and torch.equal(bits(got)[~nan], want_bits[~nan])


def specials(numel, dtype, gen):
    x = torch.randn(numel, generator=gen)
    vals = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 1 + 2 ** -8, 1 + 3 * 2 ** -8,
                         1 + 2 ** -11, 65520.0, 3.0e38])
    idx = torch.randint(0, numel, (numel // 8,), generator=gen)
    x[idx] = vals[torch.randint(0, len(vals), idx.shape, generator=gen)]
    return x.to(dtype)


def expand(table):
    """Sorted (dst_index, dst position, src position) of every element a block table moves."""
    out = []
    for so, ss, di, do, ds, rows, cols in table[:, :7].tolist():
        r = torch.arange(rows)[:, None]
        c = torch.arange(cols)[None, :]
        dpos, spos = (do + r * ds + c).reshape(-1), (so + r * ss + c).reshape(-1)
        out.append(torch.stack([torch.full_like(dpos, di), dpos, spos], 1))
    if not out:
        return torch.empty(0, 3, dtype=torch.long)
    cat = torch.cat(out)
    return cat[torch.argsort(cat[:, 0] * (1 << 40) + cat[:, 1] * (1 << 20) + cat[:, 2])]


# --- the torch path ---------------------------------------------------------------------------------
@pytest.mark.parametrize("src_dtype,dst_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16), (torch.float32, torch.float16),
])
def test_torch_path_matches_naive(src_dtype, dst_dtype):
    gen = torch.Generator().manual_seed(hash((str(src_dtype), str(dst_dtype))) % 1000)
    for trial in range(6):
        copies, shapes = random_map(gen, num_dsts=1 + trial % 4)
        src = specials(3000, src_dtype, gen)
        dsts = [specials(math.prod(s), dst_dtype, gen).view(s) for s in shapes]
        expected = naive(copies, src, dsts)
        prog = CopyProgram(copies, dsts, src_dtype, "cpu", src_numel=src.numel())
        assert not prog.uses_kernel and prog.num_copies == len(copies)
        prog.run(src)
        for got, want in zip(dsts, expected):
            assert same_bits(got, want)


def test_cast_rounds_like_tensor_to():
    """Ties to even, NaN, inf, subnormals: the torch path's cast is Tensor.to's."""
    src = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), float("nan"), float("inf"), 1e-40, 3.4e38])
    dst = torch.zeros(7, dtype=torch.bfloat16)
    CopyProgram([[0, 7, 0, 0, 7, 1, 7]], [dst], torch.float32, "cpu", src_numel=7).run(src)
    assert same_bits(dst, bits(src.to(torch.bfloat16)))
    assert dst[:3].tolist() == [1.0, 1 + 2 ** -6, -1.0]  # round half to even


def test_src_view_with_storage_offset_and_affine_groups():
    """A QKV-style regroup (per-head blocks at constant steps) folds into one strided copy per
    section, and a src that is a view into a larger buffer is read from its own offset."""
    heads, d, h = 6, 2, 3
    copies = [[(g * 3 + j) * d * h, d * h, 0, (j * heads + g) * d * h, d * h, 1, d * h]
              for j in range(3) for g in range(heads)]  # interleaved [q_g, k_g, v_g] -> [q...; k...; v...]
    big = torch.arange(5 + 3 * heads * d * h, dtype=torch.float32)
    src = big[5:]
    dst = torch.zeros(3 * heads * d, h)
    prog = CopyProgram(copies, [dst], torch.float32, "cpu", src_numel=src.numel())
    assert prog.num_launches == 3
    prog.run(src)
    assert torch.equal(bits(dst), naive(torch.tensor(copies), src.clone(), [torch.zeros(3 * heads * d, h)])[0])


def test_empty_program():
    dst = torch.ones(4)
    for copies in ([], torch.empty(0, 7, dtype=torch.long)):
        prog = CopyProgram(copies, [dst], torch.float32, "cpu", src_numel=0)
        prog.run(torch.empty(0))
        assert (prog.num_copies, prog.bytes_per_run, prog.num_launches) == (0, 0, 0)
    assert torch.equal(dst, torch.ones(4))
    assert len(build_tiles(normalize_copies(copy_table([])), torch.zeros(0), 8)) == 0


def test_bytes_per_run_and_normalisation():
    copies = [[0, 4, 0, 0, 4, 3, 4],     # dense on both sides: one run of 12
              [12, 4, 0, 12, 4, 1, 4],   # continues it: merged
              [16, 8, 1, 0, 2, 2, 2]]    # strided
    dsts = [torch.zeros(16, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16)]
    prog = CopyProgram(copies, dsts, torch.float32, "cpu", src_numel=26)
    assert prog.copies.tolist() == [[0, 16, 0, 0, 16, 1, 16], [16, 8, 1, 0, 2, 2, 2]]
    assert prog.bytes_per_run == 20 * (4 + 2)


# --- validation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,match", [
    ((10, 1, 0, 0, 1, 1, 7), "past the end of src"),       # 10 + 7 > 16
    ((0, 5, 0, 0, 5, 4, 5), "past the end of src"),                 # (rows-1)*stride + cols = 20 > 16
    ((0, 1, 0, 8, 4, 2, 4), "past the end of dst 0"),               # 8 + 4 + 4 = 16 > 12
    ((0, 1, 1, 0, 1, 1, 7), "past the end of dst 1"),
    ((0, 1, 2, 0, 1, 1, 1), "dst_index out of range for 2 dsts"),
    ((0, 1, 0, -1, 1, 1, 1), "negative dst_offset"),
    ((0, -3, 0, 0, 1, 1, 1), "negative src_row_stride"),
    ((0, 1, 0, 0, 2, 2, 3), "rows overlap in the destination"),
    ((0, 1, 0, 0, 1, 1, 1 << 55), "implausibly large"),
])
def test_validation_names_the_row(bad, match):
    good = [(0, 4, 0, 0, 4, 1, 4), (4, 4, 1, 0, 4, 1, 4)]
    dsts = [torch.zeros(3, 4), torch.zeros(6)]
    with pytest.raises(ValueError, match=match) as info:
        CopyProgram(good + [bad], dsts, torch.float32, "cpu", src_numel=16)
    assert str(info.value).startswith("copy row 2 (src_offset=") and "\n" not in str(info.value)


def test_validation_of_tensors_and_shapes():
    dst = torch.zeros(4)
    with pytest.raises(ValueError, match=r"copies must be \[N, 7\]"):
        CopyProgram([[0, 1, 0, 0, 1, 1]], [dst], torch.float32, "cpu", src_numel=4)
    with pytest.raises(ValueError, match="integers"):
        CopyProgram([[0.0] * 7], [dst], torch.float32, "cpu", src_numel=4)
    with pytest.raises(ValueError, match="src_dtype torch.int32 unsupported"):
        CopyProgram([], [dst], torch.int32, "cpu", src_numel=4)
    with pytest.raises(ValueError, match="dst 1 must be contiguous torch.float32"):
        CopyProgram([], [dst, torch.zeros(4, dtype=torch.float16)], torch.float32, "cpu", src_numel=4)
    with pytest.raises(ValueError, match="dst 0 must be contiguous"):
        CopyProgram([], [torch.zeros(4, 4).t()], torch.float32, "cpu", src_numel=4)
    prog = CopyProgram([[0, 4, 0, 0, 4, 1, 4]], [dst], torch.float32, "cpu", src_numel=4)
    for src in (torch.zeros(5), torch.zeros(4, dtype=torch.float16), torch.zeros(8)[::2], torch.zeros(2, 2)):
        with pytest.raises(ValueError, match="src must be a contiguous 1-D"):
            prog.run(src)


# --- the tile table ------------------------------------------------------------------------------------
@pytest.mark.parametrize("vec,tile_elems", [(8, 16), (4, 32), (8, 48), (4, 16384)])
def test_tiles_cover_every_element_once(vec, tile_elems):
    gen = torch.Generator().manual_seed(vec * 1000 + tile_elems)
    for trial in range(8):
        copies, shapes = random_map(gen, num_dsts=4, max_dim=40, src_numel=5000)
        table = copy_table(copies)
        K.validate_copies(table, 5000, [math.prod(s) for s in shapes])
        align = torch.randint(-1, vec, (len(shapes),), generator=gen)
        tiles = build_tiles(normalize_copies(table), align, vec, tile_elems)
        cover = expand(tiles)
        assert torch.equal(cover, expand(table))
        assert len(torch.unique(cover[:, :2], dim=0)) == len(cover)  # no destination element twice
        assert (tiles[:, ROWS] >= 1).all() and (tiles[:, COLS] >= 1).all()
        assert (tiles[:, ROWS] * tiles[:, COLS] <= tile_elems).all()
        v = tiles[tiles[:, FLAGS] == TILE_VEC]
        a = align[v[:, DST_INDEX]]
        assert (a >= 0).all() and (v[:, SRC_OFF] % vec == 0).all() and ((a + v[:, DST_OFF]) % vec == 0).all()
        assert (v[:, COLS] % vec == 0).all()
        multi = v[:, ROWS] > 1
        assert (v[multi][:, SRC_STRIDE] % vec == 0).all() and (v[multi][:, DST_STRIDE] % vec == 0).all()


def test_tiles_peel_runs_and_chunk_wide_rows():
    # one run of 1000, both sides 3 elements past alignment: scalar head 5, vector body 992, scalar tail 3
    run = normalize_copies(copy_table([[3, 0, 0, 3, 0, 1, 1000]]))
    tiles = build_tiles(run, torch.tensor([0]), 8, 256)
    assert tiles[:, COLS].tolist() == [5, 256, 256, 256, 224, 3]
    assert tiles[:, FLAGS].tolist() == [0, 1, 1, 1, 1, 0]
    # sides misaligned differently: all scalar; a strided 8-aligned block: vector, whole rows per tile
    assert build_tiles(run, torch.tensor([1]), 8, 256)[:, FLAGS].sum() == 0
    block = normalize_copies(copy_table([[0, 64, 0, 8, 128, 10, 24]]))
    tiles = build_tiles(block, torch.tensor([0]), 8, 96)
    assert tiles[:, ROWS].tolist() == [4, 4, 2] and tiles[:, FLAGS].tolist() == [1, 1, 1]


def test_affine_groups_fold_constant_steps_only():
    table = torch.tensor([[0, 4, 0, 0, 4, 1, 4], [10, 4, 0, 8, 4, 1, 4], [20, 4, 0, 16, 4, 1, 4],
                          [31, 4, 0, 24, 4, 1, 4], [0, 2, 1, 0, 2, 2, 2]])
    assert affine_groups(table) == [(3, 0, 10, 4, 0, 0, 8, 4, 1, 4), (1, 31, 0, 4, 0, 24, 0, 4, 1, 4),
                                    (1, 0, 0, 2, 1, 0, 0, 2, 2, 2)]


# --- the extension guard and the benchmark on a machine without a GPU -----------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_no_gpu_uses_torch_path_and_fails_cleanly(capsys):
    assert not kernel_available()
    with pytest.raises(RuntimeError, match="use_kernel=False") as info:
        load_extension()
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="use_kernel=True needs a CUDA device"):
        CopyProgram([], [torch.zeros(1)], torch.float32, "cpu", src_numel=0, use_kernel=True)
    bench = load_benchmark()
    capsys.readouterr()
    assert bench.main([]) == 2  # gpu_check.sh reads 2 as "skipped: no GPU"
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "needs a CUDA GPU" in out[0]


def test_benchmark_maps_are_valid_and_cover_every_destination():
    bench = load_benchmark()
    dims = bench.Dims(hidden=16, layers=2, heads=16, kv_heads=8, head_dim=2, ffn=24, vocab=32)
    for sc in bench.SCENARIOS:
        copies, shapes, numel = bench.regroup_map(dims, sc)
        dsts = [torch.full(s, -1.0) for s in shapes]
        CopyProgram(copies, dsts, torch.float32, "cpu", src_numel=numel).run(torch.arange(numel, dtype=torch.float32))
        written = torch.cat([d.view(-1) for d in dsts])
        assert (written >= 0).all(), sc.name
        assert sum(r[5] * r[6] for r in copies) == written.numel(), sc.name  # each element exactly once


# --- compile checks ----------------------------------------------------------------------------------
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH; the CI machine has it (CUDA 13.0)")
def test_kernel_compiles_with_bare_nvcc(tmp_path):
    """The .cu has no torch dependency: sm_90 object (C++17), and sm_75 PTX (C++20, as torch builds it;
    covers the pre-sm_80 bf16 rounding branch). Warnings are errors. The object, linked with the static
    cudart, answers through its C ABI: argument errors, the empty launch, and (without a GPU) a CUDA
    error surfacing as a code with a message."""
    src = ROOT / "csrc" / "reshard_kernels.cu"
    obj, lib = tmp_path / "k.o", tmp_path / "libk.so"
    for args in (["-c", "-arch=sm_90", "-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Werror", "all-warnings",
                  "-o", str(obj), str(src)],
                 ["-ptx", "-arch=compute_75", "-std=c++20", "-O3", "-Werror", "all-warnings",
                  "-o", str(tmp_path / "k.ptx"), str(src)],
                 ["-shared", "-arch=sm_90", "-o", str(lib), str(obj)]):
        proc = subprocess.run([NVCC, *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    ptx = (tmp_path / "k.ptx").read_text()
    assert "ld.global.nc.v4" in ptx and "st.global.v4" in ptx  # 16-byte vectors made it through

    c = ctypes.CDLL(str(lib))
    c.hfmg_reshard_error_string.restype = ctypes.c_char_p
    c.hfmg_reshard_launch.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    assert [c.hfmg_reshard_vec_elems(s, d) for s in range(3) for d in range(3)] == [
        K.vec_elems(s, d) for s in K.DTYPE_CODES for d in K.DTYPE_CODES]
    assert c.hfmg_reshard_vec_elems(7, 0) == 0
    assert c.hfmg_reshard_launch(None, 0, 0, None, None, 0, 1, 0, None) == 0  # nothing to do
    for args, code in (((8, 0, 9, 8, 8, 1, 1, 0, None), -1), ((8, 0, 0, 8, 8, -1, 1, 0, None), -2),
                       ((8, 0, 0, 8, 8, 1 << 31, 1, 0, None), -2), ((None, 0, 0, 8, 8, 1, 1, 0, None), -3)):
        assert c.hfmg_reshard_launch(*args) == code
        assert c.hfmg_reshard_error_string(code)
    if not Path("/dev/nvidiactl").exists():  # no driver: the runtime's error comes back, not a crash
        code = c.hfmg_reshard_launch(8, 0, 0, 8, 8, 1, 1, 0, None)
        assert code > 0 and c.hfmg_reshard_error_string(code).decode() != "no error"


@pytest.mark.skipif(NVCC is None or os.environ.get("HFMG_TEST_BINDING") != "1",
                    reason="parsing torch/extension.h takes 20-50 s on 2 cores; set HFMG_TEST_BINDING=1 (needs nvcc)")
def test_binding_builds_and_imports_against_cpu_torch(tmp_path):
    """The extension built by hand against this (CPU) torch and the static cudart: it compiles with
    warnings as errors, links, imports, agrees with kernels.py on layout and vector widths, and turns a
    bad call into a RuntimeError."""
    from torch.utils.cpp_extension import include_paths, library_paths
    name = "hfmg_reshard_ext"
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    inc = [f"-isystem{p}" for p in include_paths()] + [f"-isystem{sysconfig.get_paths()['include']}"]
    lib_dir = library_paths()[0]
    ext = tmp_path / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    csrc = ROOT / "csrc"
    for cmd in (
        ["g++", "-c", "-fPIC", "-std=c++20", "-Wall", "-Wextra", "-Werror", f"-DTORCH_EXTENSION_NAME={name}",
         "-DTORCH_API_INCLUDE_EXTENSION_H", abi, *inc, f"-I{csrc}", str(csrc / "reshard_binding.cpp"),
         "-o", str(tmp_path / "b.o")],
        [NVCC, "-c", "-arch=sm_90", "-std=c++20", "-O3", "-Xcompiler", "-fPIC", str(csrc / "reshard_kernels.cu"),
         "-o", str(tmp_path / "k.o")],
        [NVCC, "-shared", str(tmp_path / "k.o"), str(tmp_path / "b.o"), f"-L{lib_dir}", "-lc10", "-ltorch",
         "-ltorch_cpu", "-ltorch_python", "-Xlinker", f"-rpath,{lib_dir}", "-o", str(ext)],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-4000:]
    spec = importlib.util.spec_from_file_location(name, ext)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (mod.TILE_FIELDS, mod.MAX_TILE_ELEMS) == (K.TILE_FIELDS, K.MAX_TILE_ELEMS)
    assert mod.vec_elems(K.DTYPE_CODES[torch.float32], K.DTYPE_CODES[torch.bfloat16]) == 4
    with pytest.raises(RuntimeError, match="src must be a contiguous 1-D CUDA tensor"):
        mod.launch(torch.zeros(4), torch.zeros(0, 8, dtype=torch.long), torch.zeros(0, dtype=torch.long), 1, True, 0)
