"""Scatter a gathered bucket into many destination tensors by a static copy map, in one CUDA launch
(csrc/reshard_kernels.cu) or by an equivalent torch path (CPU, and the fallback on GPU).

Per reshard each rank all-gathers a few flat buckets inside its micro-DP group (the only traffic);
the gathered bytes then go into vLLM's per-rank parameters. That scatter is pure HBM traffic, so it
should run at device-to-device copy speed, which per-tensor ``copy_`` calls do not reach when a
bucket holds thousands of blocks (QKV head permutations, row-parallel column merges).

Copy map: an int64 ``[N, 7]`` table, one 2-D block copy per row, in elements::

    (src_offset, src_row_stride, dst_index, dst_offset, dst_row_stride, rows, cols)
    dsts[dst_index].view(-1)[dst_offset + r*dst_row_stride + c] = src[src_offset + r*src_row_stride + c]

Blocks never overlap in the destination (the producer's guarantee; checking it would cost a pass over
every destination element). A `CopyProgram` is built once per reshard plan: it validates the map,
normalises it (dense blocks flattened, consecutive runs merged), and builds either the kernel's tile
table or the torch path's strided views; on the kernel path `run(src)` then costs O(1) checks plus
one launch.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

COPY_FIELDS = ("src_offset", "src_row_stride", "dst_index", "dst_offset", "dst_row_stride", "rows", "cols")
SRC_OFF, SRC_STRIDE, DST_INDEX, DST_OFF, DST_STRIDE, ROWS, COLS = range(7)
FLAGS = 7                   # extra column of a tile row; csrc/reshard_kernels.h
TILE_FIELDS = 8
TILE_VEC = 1                # flag bit: the tile may use 16-byte vectors
MAX_TILE_ELEMS = 1 << 24
# 16K elements per CTA: 32 KiB of bf16 read + 32 KiB written, 64 elements per thread; a 1 GB bf16 bucket
# is ~32K CTAs, ~240 per SM of an H100 (~30 waves of 8 resident CTAs), so the tail wave is noise.
DEFAULT_TILE_ELEMS = 1 << 14
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # HFMG_F32, HFMG_BF16, HFMG_F16
_MAX_FIELD = 1 << 50        # far above any tensor's numel; keeps the bounds arithmetic in int64
_CSRC = Path(__file__).resolve().parents[2] / "csrc"


def vec_elems(src_dtype: torch.dtype, dst_dtype: torch.dtype) -> int:
    """Elements per vector access: 16 bytes of the wider of the two types (hfmg_reshard_vec_elems)."""
    return 16 // max(src_dtype.itemsize, dst_dtype.itemsize)


# --- the map: validate once, normalise once --------------------------------------------------------
def copy_table(copies) -> torch.Tensor:
    """The copy map as a contiguous int64 CPU ``[N, 7]`` tensor (an empty map may have any shape)."""
    table = torch.as_tensor(copies)
    if table.numel() == 0:
        return torch.empty(0, len(COPY_FIELDS), dtype=torch.long)
    if table.dtype.is_floating_point or table.dtype.is_complex or table.dtype == torch.bool:
        raise ValueError(f"copies must hold integers, got {table.dtype}")
    if table.dim() != 2 or table.shape[1] != len(COPY_FIELDS):
        raise ValueError(f"copies must be [N, 7] rows {COPY_FIELDS}, got shape {tuple(table.shape)}")
    return table.to(device="cpu", dtype=torch.long).contiguous()


def _fail(copies: torch.Tensor, bad: torch.Tensor, why) -> None:
    """Raise one line naming the first row where ``bad`` holds; ``why(row)`` says what is wrong."""
    hits = bad.nonzero()
    if len(hits):
        i = int(hits[0, 0])
        row = dict(zip(COPY_FIELDS, copies[i].tolist()))
        fields = ", ".join(f"{k}={v}" for k, v in row.items())
        raise ValueError(f"copy row {i} ({fields}): {why(row)}")


def _fits(off: torch.Tensor, stride: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
          numel: torch.Tensor) -> torch.Tensor:
    """Whether ``off + (rows-1)*stride + cols <= numel`` for non-empty blocks, without overflow."""
    room = numel - off - cols  # every term < 2^50
    spare_rows = room // stride.clamp(min=1)
    return (room >= 0) & ((rows <= 1) | (stride == 0) | (rows - 1 <= spare_rows))


def validate_copies(copies: torch.Tensor, src_numel: int, dst_numels: Sequence[int]) -> None:
    """Raise a one-line ValueError naming the first bad row of a `copy_table`.

    Checks: fields non-negative (and below 2^50), ``dst_index`` in range, every non-empty block inside
    ``src`` and inside its destination, and rows of a destination block not overlapping each other.
    """
    if len(copies) == 0:
        return
    names = COPY_FIELDS
    _fail(copies, (copies < 0).any(1), lambda r: "negative " + next(k for k in names if r[k] < 0))
    _fail(copies, (copies >= _MAX_FIELD).any(1),
          lambda r: next(k for k in names if r[k] >= _MAX_FIELD) + " is implausibly large (>= 2^50)")
    so, ss, di, do, ds, rows, cols = copies.unbind(1)
    _fail(copies, di >= len(dst_numels), lambda r: f"dst_index out of range for {len(dst_numels)} dsts")
    live = (rows > 0) & (cols > 0)
    _fail(copies, live & (rows > 1) & (ds < cols),
          lambda r: "dst_row_stride < cols: the block's rows overlap in the destination")
    _fail(copies, live & ~_fits(so, ss, rows, cols, torch.full_like(so, src_numel)),
          lambda r: f"block reads past the end of src (numel {src_numel})")
    dst_numel = torch.tensor(list(dst_numels), dtype=torch.long)[di]
    _fail(copies, live & ~_fits(do, ds, rows, cols, dst_numel),
          lambda r: f"block writes past the end of dst {r['dst_index']} (numel {dst_numels[r['dst_index']]})")


def normalize_copies(copies: torch.Tensor) -> torch.Tensor:
    """The same element mapping in fewer, simpler blocks (of a validated table).

    Empty blocks are dropped; blocks dense on both sides (both row strides == cols) become one run;
    a run that continues the previous one in src and in the same dst is merged into it. One-row blocks
    get both strides = cols (unused, but deterministic).
    """
    c = copies[(copies[:, ROWS] > 0) & (copies[:, COLS] > 0)].clone()
    dense = (c[:, SRC_STRIDE] == c[:, COLS]) & (c[:, DST_STRIDE] == c[:, COLS])
    c[dense, COLS] *= c[dense, ROWS]
    c[dense, ROWS] = 1
    if len(c) > 1:
        one = c[:, ROWS] == 1
        prev, cur = c[:-1], c[1:]
        cont = (one[1:] & one[:-1] & (cur[:, DST_INDEX] == prev[:, DST_INDEX])
                & (cur[:, SRC_OFF] == prev[:, SRC_OFF] + prev[:, COLS])
                & (cur[:, DST_OFF] == prev[:, DST_OFF] + prev[:, COLS]))
        starts = torch.cat([torch.ones(1, dtype=torch.bool), ~cont])
        group = starts.cumsum(0) - 1
        merged_cols = torch.zeros(int(starts.sum()), dtype=torch.long).index_add_(0, group, c[:, COLS])
        c = c[starts]
        c[:, COLS] = merged_cols
    one = c[:, ROWS] == 1
    c[one, SRC_STRIDE] = c[one, COLS]
    c[one, DST_STRIDE] = c[one, COLS]
    return c


# --- the kernel's tile table ------------------------------------------------------------------------
def _ceil_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a + b - 1) // b


def build_tiles(copies: torch.Tensor, dst_align: torch.Tensor, vec: int,
                tile_elems: int = DEFAULT_TILE_ELEMS) -> torch.Tensor:
    """Split a normalised copy table into one-CTA tiles: int64 ``[T, 8]`` rows, each the 7 copy fields of
    a sub-block with ``rows * cols <= tile_elems``, plus flags (`TILE_VEC`).

    ``dst_align[i]``: destination i's base address in elements, mod ``vec`` (-1: not element-aligned,
    never vectorised). The src base is taken as 16-byte aligned; `CopyProgram.run` turns vectors off
    when it is not. A one-row run whose two sides are misaligned by the same amount is peeled into a
    scalar head, a vector body and a scalar tail; a multi-row block is vector or scalar as a whole.
    Wide rows (cols >= tile_elems) are cut into column chunks of ``tile_elems`` (a multiple of 16, so
    chunks keep the alignment); narrower blocks are cut into groups of whole rows.
    """
    if tile_elems % 16 or not 16 <= tile_elems <= MAX_TILE_ELEMS:
        raise ValueError(f"tile_elems must be a multiple of 16 in 16..{MAX_TILE_ELEMS}, got {tile_elems}")
    c = copies
    if len(c) == 0:
        return torch.empty(0, TILE_FIELDS, dtype=torch.long)
    one, cols = c[:, ROWS] == 1, c[:, COLS]
    align = dst_align.to(torch.long)[c[:, DST_INDEX]]
    src_mis = c[:, SRC_OFF] % vec
    dst_mis = (align + c[:, DST_OFF]) % vec
    peel = one & (align >= 0) & (src_mis == dst_mis)
    head = torch.where(peel, (vec - src_mis) % vec, 0).minimum(cols)
    body = torch.where(peel, (cols - head) // vec * vec, 0)
    block_vec = (~one & (align >= 0) & (src_mis == 0) & (dst_mis == 0) & (cols % vec == 0)
                 & (c[:, SRC_STRIDE] % vec == 0) & (c[:, DST_STRIDE] % vec == 0))
    zero = torch.zeros_like(cols)
    start = torch.stack([zero, head, head + body], 1).reshape(-1)  # [N * 3] segments: head, body, rest
    length = torch.stack([head, body, cols - head - body], 1).reshape(-1)
    flag = torch.stack([zero, zero + TILE_VEC, block_vec.long() * TILE_VEC], 1).reshape(-1)
    seg = c.repeat_interleave(3, dim=0)
    seg[:, SRC_OFF] += start  # start > 0 only for one-row runs, where columns are contiguous
    seg[:, DST_OFF] += start
    seg[:, COLS] = length
    keep = length > 0
    seg, flag = seg[keep], flag[keep]

    rows, cols = seg[:, ROWS], seg[:, COLS]
    wide = cols >= tile_elems
    chunk_cols = torch.where(wide, tile_elems, cols)
    chunks_per_row = _ceil_div(cols, chunk_cols)
    rows_per_tile = torch.where(wide, 1, tile_elems // cols)
    num_tiles = _ceil_div(rows, rows_per_tile) * chunks_per_row
    owner = torch.repeat_interleave(torch.arange(len(seg)), num_tiles)
    k = torch.arange(len(owner)) - (num_tiles.cumsum(0) - num_tiles)[owner]
    row0 = k // chunks_per_row[owner] * rows_per_tile[owner]
    col0 = k % chunks_per_row[owner] * chunk_cols[owner]
    s = seg[owner]
    tiles = torch.empty(len(owner), TILE_FIELDS, dtype=torch.long)
    tiles[:, :7] = s
    tiles[:, SRC_OFF] += row0 * s[:, SRC_STRIDE] + col0
    tiles[:, DST_OFF] += row0 * s[:, DST_STRIDE] + col0
    tiles[:, ROWS] = torch.minimum(rows_per_tile[owner], s[:, ROWS] - row0)
    tiles[:, COLS] = torch.minimum(chunk_cols[owner], s[:, COLS] - col0)
    tiles[:, FLAGS] = flag[owner]
    return tiles


# --- the torch path ---------------------------------------------------------------------------------
def affine_groups(copies: torch.Tensor) -> list[tuple[int, ...]]:
    """Fold runs of same-shaped blocks at constant src/dst steps into one 3-D strided copy each.

    Returns ``(n, src_offset, src_step, src_row_stride, dst_index, dst_offset, dst_step,
    dst_row_stride, rows, cols)``: block i of a group starts at ``offset + i*step`` on each side. The
    per-head blocks of a QKV regroup fold this way, so the torch path is one ``copy_`` per group.
    """
    groups: list[list[int]] = []
    for so, ss, di, do, ds, rows, cols in copies.tolist():
        if groups:
            g = groups[-1]
            if (g[3], g[4], g[7], g[8], g[9]) == (ss, di, ds, rows, cols):
                src_step = so - (g[1] + (g[0] - 1) * g[2])
                dst_step = do - (g[5] + (g[0] - 1) * g[6])
                if (g[0] == 1 and src_step >= 0 and dst_step > 0) or (
                        g[0] > 1 and (src_step, dst_step) == (g[2], g[6])):
                    g[0], g[2], g[6] = g[0] + 1, src_step, dst_step
                    continue
        groups.append([1, so, 0, ss, di, do, 0, ds, rows, cols])
    return [tuple(g) for g in groups]


# --- the CUDA extension, behind one guard -----------------------------------------------------------
_EXT = None
_EXT_ERROR: str | None = None
_WARNED = False


def _build_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "hybridflow_mg" / "extensions" / f"torch{torch.__version__}_cu{torch.version.cuda}"


def load_extension():
    """Build (first call on a machine, about a minute) or load the reshard CUDA extension; cached.

    Raises RuntimeError with one actionable line when there is no GPU (nothing is compiled then) or
    when the build fails.
    """
    global _EXT, _EXT_ERROR
    if _EXT is not None:
        return _EXT
    if torch.version.cuda is None or not torch.cuda.is_available():
        raise RuntimeError(f"the reshard CUDA kernel needs a CUDA torch and a visible GPU (torch "
                           f"{torch.__version__}, cuda available: {torch.cuda.is_available()}); "
                           "use the torch path (CopyProgram(..., use_kernel=False))")
    if _EXT_ERROR is not None:
        raise RuntimeError(_EXT_ERROR)
    sources = [_CSRC / "reshard_kernels.cu", _CSRC / "reshard_binding.cpp"]
    build = _build_dir()
    try:
        from torch.utils import cpp_extension
        missing = [str(s) for s in sources if not s.is_file()]
        if missing:
            raise FileNotFoundError(f"sources missing: {', '.join(missing)} (install the repo with pip -e)")
        build.mkdir(parents=True, exist_ok=True)
        _EXT = cpp_extension.load(name="hfmg_reshard_ext", sources=[str(s) for s in sources],
                                  build_directory=str(build), extra_cflags=["-O3"],
                                  extra_cuda_cflags=["-O3"], extra_include_paths=[str(_CSRC)], verbose=False)
    except Exception as exc:  # compiler, ninja and import errors all end here
        first = (str(exc).strip().splitlines() or [""])[0][:240]
        _EXT_ERROR = (f"building the reshard CUDA extension in {build} failed ({type(exc).__name__}: {first}); "
                      f"check that nvcc under CUDA_HOME matches torch.version.cuda={torch.version.cuda} and "
                      "that ninja is installed, or pass use_kernel=False for the torch path")
        raise RuntimeError(_EXT_ERROR) from exc
    return _EXT


def kernel_available() -> bool:
    """Whether `CopyProgram` can use the kernel here: a GPU and a built extension. A failed build warns once."""
    global _WARNED
    if torch.version.cuda is None or not torch.cuda.is_available():
        return False
    try:
        load_extension()
    except RuntimeError as exc:
        if not _WARNED:
            warnings.warn(str(exc), RuntimeWarning, stacklevel=2)
            _WARNED = True
        return False
    return True


# --- the program ------------------------------------------------------------------------------------
def _resolve(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class CopyProgram:
    """A bucket's copy map, validated and compiled once; `run(src)` applies it.

    Args:
        copies: int64 ``[N, 7]`` copy map (module docstring).
        dsts: destination tensors, contiguous, one dtype, on ``device``. Their storage must stay where
            it is for the program's life (the kernel holds their addresses; vLLM updates weights in place),
            and no bucket may overlap them (the kernel reads src through the read-only cache).
        src_dtype: dtype of the buckets passed to `run` (f32, bf16, f16; any cast to the dsts' dtype).
        device: where ``src`` and the dsts live.
        src_numel: elements of every bucket passed to `run`; blocks are bounds-checked against it here.
        tile_elems: elements per CTA tile (kernel path).
        use_kernel: None picks the kernel on CUDA when it builds, else the torch path; True requires it.
    """

    def __init__(self, copies, dsts: Sequence[torch.Tensor], src_dtype: torch.dtype,
                 device: torch.device | str, *, src_numel: int, tile_elems: int = DEFAULT_TILE_ELEMS,
                 use_kernel: bool | None = None):
        self.device = _resolve(device)
        self.dsts = list(dsts)
        self.src_dtype = src_dtype
        self.dst_dtype = self.dsts[0].dtype if self.dsts else src_dtype
        self.src_numel = int(src_numel)
        if self.src_numel < 0:
            raise ValueError(f"src_numel must be >= 0, got {src_numel}")
        if tile_elems % 16 or not 16 <= tile_elems <= MAX_TILE_ELEMS:
            raise ValueError(f"tile_elems must be a multiple of 16 in 16..{MAX_TILE_ELEMS}, got {tile_elems}")
        for name, dtype in (("src_dtype", src_dtype), ("dst dtype", self.dst_dtype)):
            if dtype not in DTYPE_CODES:
                raise ValueError(f"{name} {dtype} unsupported; expected one of {list(DTYPE_CODES)}")
        for i, dst in enumerate(self.dsts):
            if dst.dtype != self.dst_dtype or dst.device != self.device or not dst.is_contiguous():
                raise ValueError(f"dst {i} must be contiguous {self.dst_dtype} on {self.device}, got "
                                 f"{dst.dtype} on {dst.device}, contiguous={dst.is_contiguous()}")
        table = copy_table(copies)
        validate_copies(table, self.src_numel, [d.numel() for d in self.dsts])
        self.num_copies = len(table)
        self.copies = normalize_copies(table)
        self.num_elements = int((self.copies[:, ROWS] * self.copies[:, COLS]).sum())

        if use_kernel and self.device.type != "cuda":
            raise ValueError(f"use_kernel=True needs a CUDA device, got {self.device}")
        if use_kernel is None:
            use_kernel = self.device.type == "cuda" and kernel_available()
        self.tiles: torch.Tensor | None = None  # [num_tiles, 8] on device, kernel path only
        if use_kernel:
            self._build_kernel_tables(tile_elems)
        else:
            self._build_views()

    def _build_kernel_tables(self, tile_elems: int) -> None:
        self._ext = load_extension()
        codes = DTYPE_CODES[self.src_dtype], DTYPE_CODES[self.dst_dtype]
        vec = vec_elems(self.src_dtype, self.dst_dtype)
        if self._ext.vec_elems(*codes) != vec:
            raise RuntimeError("reshard extension and kernels.py disagree on the vector width; rebuild it")
        size = self.dst_dtype.itemsize
        ptrs = [d.data_ptr() for d in self.dsts]
        dst_align = torch.tensor([p // size % vec if p % size == 0 else -1 for p in ptrs], dtype=torch.long)
        self.tiles = build_tiles(self.copies, dst_align, vec, tile_elems).to(self.device)
        self._dst_ptrs = torch.tensor(ptrs, dtype=torch.long).to(self.device)  # read as uint64 by the kernel
        self._dst_code = codes[1]
        self._src_align = vec * self.src_dtype.itemsize

    def _build_views(self) -> None:
        """Destination views per affine group, made once; run() only views src."""
        self._plan = []
        with torch.no_grad():
            for n, so, s_step, ss, di, do, d_step, ds, rows, cols in affine_groups(self.copies):
                dst = self.dsts[di]
                view = dst.as_strided((n, rows, cols), (d_step, ds, 1), dst.storage_offset() + do)
                self._plan.append((view, (n, rows, cols), (s_step, ss, 1), so))

    @property
    def uses_kernel(self) -> bool:
        return self.tiles is not None

    @property
    def num_tiles(self) -> int:
        return 0 if self.tiles is None else len(self.tiles)

    @property
    def num_launches(self) -> int:
        """Kernel launches (kernel path) or strided ``copy_`` calls (torch path) per run."""
        return int(self.num_tiles > 0) if self.uses_kernel else len(self._plan)

    @property
    def bytes_per_run(self) -> int:
        """HBM bytes one run moves: every element read once as src_dtype and written once as dst dtype."""
        return self.num_elements * (self.src_dtype.itemsize + self.dst_dtype.itemsize)

    def run(self, src: torch.Tensor) -> None:
        """Apply the map from bucket ``src`` (1-D, contiguous), on the current stream of its device."""
        if (src.dtype != self.src_dtype or src.device != self.device or src.dim() != 1
                or src.numel() != self.src_numel or not src.is_contiguous()):
            raise ValueError(f"src must be a contiguous 1-D {self.src_dtype} tensor of {self.src_numel} "
                             f"elements on {self.device}, got {src.dtype} {tuple(src.shape)} on {src.device}")
        if self.tiles is not None:
            stream = torch.cuda.current_stream(src.device).cuda_stream
            allow_vec = src.data_ptr() % self._src_align == 0
            self._ext.launch(src, self.tiles, self._dst_ptrs, self._dst_code, allow_vec, stream)
            return
        with torch.no_grad():
            base = src.storage_offset()
            for view, size, stride, offset in self._plan:
                view.copy_(src.as_strided(size, stride, base + offset))
