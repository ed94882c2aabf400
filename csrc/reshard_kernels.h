/* C ABI of the reshard scatter kernel (csrc/reshard_kernels.cu). Plain C: no torch, no CUDA headers,
 * so the torch binding and a bare nvcc build both compile against it.
 *
 * A tile is one CTA's work: a 2-D block copy in elements, laid out as HFMG_TILE_FIELDS int64s
 *   (src_offset, src_row_stride, dst_index, dst_offset, dst_row_stride, rows, cols, flags)
 * meaning  dst[dst_index][dst_offset + r*dst_row_stride + c] = cast(src[src_offset + r*src_row_stride + c])
 * for r < rows, c < cols, with rows*cols <= HFMG_MAX_TILE_ELEMS. Tiles are built once per reshard plan on
 * the host (hybridflow_mg/reshard/kernels.py: build_tiles) and never overlap in the destination.
 */
#ifndef HFMG_RESHARD_KERNELS_H_
#define HFMG_RESHARD_KERNELS_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element types (the codes are shared with kernels.py: DTYPE_CODES). */
enum { HFMG_F32 = 0, HFMG_BF16 = 1, HFMG_F16 = 2 };

enum {
  HFMG_TILE_FIELDS = 8,
  /* flags bit: the tile may use 16-byte vectors; set by the host only when src/dst addresses (assuming a
     16-byte-aligned src base), both row strides and cols are multiples of hfmg_reshard_vec_elems. */
  HFMG_TILE_VEC = 1,
  HFMG_MAX_TILE_ELEMS = 1 << 24
};

/* Error codes below zero are argument errors; zero and above are cudaError_t values. */
enum { HFMG_ERR_DTYPE = -1, HFMG_ERR_NUM_TILES = -2, HFMG_ERR_NULL = -3 };

/* Elements per vector for a (src, dst) dtype pair: 16 bytes of the wider type; 0 for an unsupported pair. */
int hfmg_reshard_vec_elems(int src_dtype, int dst_dtype);

/* Enqueue one launch applying num_tiles tiles (device array, num_tiles x HFMG_TILE_FIELDS int64) from src
 * into the destinations whose base addresses are the device array dst_ptrs, on `stream` (a cudaStream_t)
 * of `device`. allow_vec = 0 forces the scalar path (the caller passes 0 when src is not 16-byte aligned).
 * Returns 0 or an error code; the launch is asynchronous, so faults inside the kernel surface at the next
 * synchronisation. */
int hfmg_reshard_launch(const void* src, int src_dtype, int dst_dtype, const uint64_t* dst_ptrs,
                        const int64_t* tiles, int64_t num_tiles, int allow_vec, int device, void* stream);

/* A static string for an error code of hfmg_reshard_launch. */
const char* hfmg_reshard_error_string(int code);

#ifdef __cplusplus
}
#endif

#endif /* HFMG_RESHARD_KERNELS_H_ */
