// Reshard scatter: apply a whole bucket's copy map in ONE launch, straight into destination storage.
//
// After the micro-DP all-gather, a bucket (one flat buffer) holds the shards that make up this rank's
// generation shard; the copy map says where each block of it goes among vLLM's per-rank parameters. The
// host splits the map once into tiles (csrc/reshard_kernels.h; kernels.py: build_tiles) of at most
// ~16K elements, one CTA per tile, so a launch has thousands of equal-sized CTAs whatever the mix of
// huge contiguous runs (embeddings, QKV head blocks) and many-row strided blocks (row-parallel column
// merges).
//
// Bytes per launch: sum over tiles of rows*cols*(sizeof(S) + sizeof(D)) of payload, plus 64 B of tile
// record per CTA and 8 B per destination pointer (both L2-resident). With 16K-element tiles the
// metadata is 64 B per >= 64 KB of bf16 payload (< 0.1 %), so the launch should run at the device-to-
// device copy rate: e.g. a 1.2B-parameter bf16 model moves 1.2e9 * 4 B = 4.9 GB, ~1.8 ms at 2.7 TB/s.
//
// Vectorisation: a tile flagged HFMG_TILE_VEC moves V = 16 / max(sizeof(S), sizeof(D)) elements per
// access, i.e. 16-byte loads/stores of the wider type (8-byte of the narrower one under a cast); the host
// sets the flag only when both addresses, both row strides and cols are multiples of V, and peels
// misaligned heads/tails of contiguous runs into scalar tiles. Each thread keeps kUnroll vectors in
// flight (all loads, then all stores) so the memory system sees enough outstanding requests.
//
// Casts (S -> D among f32, bf16, f16) round exactly as torch's CUDA Tensor.to does: the same intrinsics
// c10::BFloat16 / c10::Half use on device (cvt.rn.bf16.f32 from sm_80, torch's software round-to-
// nearest-even with NaN -> 0x7FC0 below it; cvt.rn.f16.f32; __bfloat162float and __half2float to
// widen), and half <-> bf16 through float. S == D copies move raw bits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>
#include <string.h>

#include "reshard_kernels.h"

namespace {

constexpr int kThreads = 256;  // 8 warps; with 16K-element tiles each thread moves <= 64 elements
constexpr int kUnroll = 4;     // vectors in flight per thread

struct Tile {  // the int64 row layout of the tile table (reshard_kernels.h)
  int64_t src_offset, src_row_stride, dst_index, dst_offset, dst_row_stride, rows, cols, flags;
};
static_assert(sizeof(Tile) == HFMG_TILE_FIELDS * sizeof(int64_t), "tile record must match the table");

// --- element types: storage type plus the conversions torch uses on device -------------------------
struct F32 {
  using T = float;
  static __device__ __forceinline__ float to_float(T x) { return x; }
  static __device__ __forceinline__ T from_float(float x) { return x; }
};

struct BF16 {
  using T = uint16_t;
  // c10::BFloat16 -> float on device is __bfloat162float (cvt.f32.bf16 from sm_90, a shift before)
  static __device__ __forceinline__ float to_float(T x) { return __bfloat162float(__ushort_as_bfloat16(x)); }
  static __device__ __forceinline__ T from_float(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    return __bfloat16_as_ushort(__float2bfloat16(x));  // what c10::BFloat16(float) uses from sm_80
#else
    if (x != x) return 0x7FC0;  // c10::detail::round_to_nearest_even
    const uint32_t u = __float_as_uint(x);
    return static_cast<T>((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
#endif
  }
};

struct F16 {
  using T = uint16_t;
  static __device__ __forceinline__ float to_float(T x) { return __half2float(__ushort_as_half(x)); }
  static __device__ __forceinline__ T from_float(float x) { return __half_as_ushort(__float2half(x)); }
};

template <typename S, typename D>
struct Cast {
  static __device__ __forceinline__ typename D::T apply(typename S::T x) { return D::from_float(S::to_float(x)); }
};
template <typename S>
struct Cast<S, S> {  // same dtype: raw bits, like torch's memcpy-style copy_
  static __device__ __forceinline__ typename S::T apply(typename S::T x) { return x; }
};

template <typename S, typename D>
struct VecElems {
  static constexpr int value =
      16 / (sizeof(typename S::T) > sizeof(typename D::T) ? sizeof(typename S::T) : sizeof(typename D::T));
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// One tile's rows x cols block in units of V elements. kOneRow drops the per-element division (most
// bytes are in contiguous runs). Indices stay 32-bit inside a tile (rows*cols <= HFMG_MAX_TILE_ELEMS);
// offsets into the tensors are 64-bit.
template <typename S, typename D, int V, bool kOneRow>
__device__ __forceinline__ void copy_block(const typename S::T* __restrict__ s, int64_t src_stride,
                                           typename D::T* __restrict__ d, int64_t dst_stride, int rows,
                                           int cols) {
  using SV = Vec<typename S::T, V>;
  using DV = Vec<typename D::T, V>;
  const int vcols = cols / V;  // V divides cols for vector tiles; V == 1 for scalar tiles
  const int n = kOneRow ? vcols : rows * vcols;
  for (int base = threadIdx.x; base < n; base += kThreads * kUnroll) {
    SV in[kUnroll];
    int64_t dst_at[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kThreads;
      if (i < n) {
        const int r = kOneRow ? 0 : static_cast<int>(unsigned(i) / unsigned(vcols));  // unsigned: cheaper
        const int c = (i - r * vcols) * V;
        in[u] = *reinterpret_cast<const SV*>(s + r * src_stride + c);
        dst_at[u] = r * dst_stride + c;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * kThreads < n) {
        DV out;
#pragma unroll
        for (int k = 0; k < V; ++k) out.v[k] = Cast<S, D>::apply(in[u].v[k]);
        *reinterpret_cast<DV*>(d + dst_at[u]) = out;
      }
    }
  }
}

template <typename S, typename D>
__global__ void __launch_bounds__(kThreads)
    scatter_tiles(const typename S::T* __restrict__ src, const uint64_t* __restrict__ dst_ptrs,
                  const Tile* __restrict__ tiles, int allow_vec) {
  constexpr int V = VecElems<S, D>::value;
  const Tile t = tiles[blockIdx.x];  // same 64 B for every thread of the CTA: one broadcast load
  const typename S::T* s = src + t.src_offset;
  typename D::T* d = reinterpret_cast<typename D::T*>(dst_ptrs[t.dst_index]) + t.dst_offset;
  const int rows = static_cast<int>(t.rows);
  const int cols = static_cast<int>(t.cols);
  const bool vec = allow_vec && (t.flags & HFMG_TILE_VEC);
  if (rows == 1) {
    if (vec) copy_block<S, D, V, true>(s, 0, d, 0, 1, cols);
    else copy_block<S, D, 1, true>(s, 0, d, 0, 1, cols);
  } else {
    if (vec) copy_block<S, D, V, false>(s, t.src_row_stride, d, t.dst_row_stride, rows, cols);
    else copy_block<S, D, 1, false>(s, t.src_row_stride, d, t.dst_row_stride, rows, cols);
  }
}

template <typename S, typename D>
cudaError_t launch_typed(const void* src, const uint64_t* dst_ptrs, const int64_t* tiles, int64_t num_tiles,
                         int allow_vec, cudaStream_t stream) {
  scatter_tiles<S, D><<<static_cast<unsigned int>(num_tiles), kThreads, 0, stream>>>(
      static_cast<const typename S::T*>(src), dst_ptrs, reinterpret_cast<const Tile*>(tiles), allow_vec);
  return cudaGetLastError();
}

// Same-dtype copies dispatch on element size only (bf16 and f16 share the raw 2-byte kernel): 2 raw + 6
// cast instantiations in all.
cudaError_t dispatch(const void* src, int src_dtype, int dst_dtype, const uint64_t* dst_ptrs,
                     const int64_t* tiles, int64_t num_tiles, int allow_vec, cudaStream_t stream) {
  const int key = src_dtype * 3 + dst_dtype;
  switch (key) {
    case HFMG_F32 * 3 + HFMG_F32: return launch_typed<F32, F32>(src, dst_ptrs, tiles, num_tiles, allow_vec, stream);
    case HFMG_BF16 * 3 + HFMG_BF16:
    case HFMG_F16 * 3 + HFMG_F16: return launch_typed<BF16, BF16>(src, dst_ptrs, tiles, num_tiles, allow_vec, stream);
    case HFMG_F32 * 3 + HFMG_BF16: return launch_typed<F32, BF16>(src, dst_ptrs, tiles, num_tiles, allow_vec, stream);
    case HFMG_F32 * 3 + HFMG_F16: return launch_typed<F32, F16>(src, dst_ptrs, tiles, num_tiles, allow_vec, stream);
    case HFMG_BF16 * 3 + HFMG_F32: return launch_typed<BF16, F32>(src, dst_ptrs, tiles, num_tiles, allow_vec, stream);
    case HFMG_F16 * 3 + HFMG_F32: return launch_typed<F16, F32>(src, dst_ptrs, tiles, num_tiles, allow_vec, stream);
    case HFMG_BF16 * 3 + HFMG_F16: return launch_typed<BF16, F16>(src, dst_ptrs, tiles, num_tiles, allow_vec, stream);
    case HFMG_F16 * 3 + HFMG_BF16: return launch_typed<F16, BF16>(src, dst_ptrs, tiles, num_tiles, allow_vec, stream);
    default: return cudaErrorInvalidValue;  // unreachable: dtypes are checked by the caller
  }
}

bool valid_dtype(int code) { return code == HFMG_F32 || code == HFMG_BF16 || code == HFMG_F16; }

int elem_size(int code) { return code == HFMG_F32 ? 4 : 2; }

}  // namespace

extern "C" int hfmg_reshard_vec_elems(int src_dtype, int dst_dtype) {
  if (!valid_dtype(src_dtype) || !valid_dtype(dst_dtype)) return 0;
  const int wider = elem_size(src_dtype) > elem_size(dst_dtype) ? elem_size(src_dtype) : elem_size(dst_dtype);
  return 16 / wider;
}

extern "C" int hfmg_reshard_launch(const void* src, int src_dtype, int dst_dtype, const uint64_t* dst_ptrs,
                                   const int64_t* tiles, int64_t num_tiles, int allow_vec, int device,
                                   void* stream) {
  if (!valid_dtype(src_dtype) || !valid_dtype(dst_dtype)) return HFMG_ERR_DTYPE;
  if (num_tiles < 0 || num_tiles > INT32_MAX) return HFMG_ERR_NUM_TILES;  // gridDim.x <= 2^31 - 1
  if (num_tiles == 0) return 0;
  if (src == nullptr || dst_ptrs == nullptr || tiles == nullptr) return HFMG_ERR_NULL;
  // An error left pending by earlier work would otherwise be reported as ours after the launch.
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  int previous = -1;
  err = cudaGetDevice(&previous);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (previous != device && (err = cudaSetDevice(device)) != cudaSuccess) return static_cast<int>(err);
  err = dispatch(src, src_dtype, dst_dtype, dst_ptrs, tiles, num_tiles, allow_vec,
                 static_cast<cudaStream_t>(stream));
  if (previous != device) {
    const cudaError_t restore = cudaSetDevice(previous);
    if (err == cudaSuccess) err = restore;
  }
  return static_cast<int>(err);
}

extern "C" const char* hfmg_reshard_error_string(int code) {
  switch (code) {
    case HFMG_ERR_DTYPE: return "unsupported dtype code (expected float32, bfloat16 or float16)";
    case HFMG_ERR_NUM_TILES: return "tile count outside 0 .. 2^31-1 (one CTA per tile)";
    case HFMG_ERR_NULL: return "null src, dst pointer table or tile table";
    default: return code >= 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown error code";
  }
}
