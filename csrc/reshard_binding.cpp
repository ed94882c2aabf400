// Torch binding of the reshard scatter kernel. Tensors in, checks, one call into the C launcher
// (reshard_kernels.h). No CUDA headers: the caller passes the stream handle and device index, so this
// file also compiles against a CPU-only torch (the CPU test suite syntax-checks it).
#include <torch/extension.h>

#include <cstdint>

#include "reshard_kernels.h"

namespace {

int dtype_code(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return HFMG_F32;
    case at::kBFloat16: return HFMG_BF16;
    case at::kHalf: return HFMG_F16;
    default: return -1;
  }
}

// dst_ptrs holds each destination's data_ptr() as int64 (torch has no general uint64 tensors); the
// launcher reads the same 8 bytes as uint64.
void launch(const at::Tensor& src, const at::Tensor& tiles, const at::Tensor& dst_ptrs, int64_t dst_dtype,
            bool allow_vec, int64_t stream) {
  TORCH_CHECK(src.is_cuda() && src.dim() == 1 && src.is_contiguous(),
              "reshard kernel: src must be a contiguous 1-D CUDA tensor, got ", src.sizes(), " on ", src.device());
  TORCH_CHECK(tiles.device() == src.device() && tiles.scalar_type() == at::kLong && tiles.dim() == 2 &&
                  tiles.size(1) == HFMG_TILE_FIELDS && tiles.is_contiguous(),
              "reshard kernel: tiles must be a contiguous int64 [num_tiles, ", int(HFMG_TILE_FIELDS),
              "] tensor on ", src.device());
  TORCH_CHECK(dst_ptrs.device() == src.device() && dst_ptrs.scalar_type() == at::kLong && dst_ptrs.dim() == 1 &&
                  dst_ptrs.is_contiguous(),
              "reshard kernel: dst_ptrs must be a contiguous int64 1-D tensor on ", src.device());
  const int src_code = dtype_code(src.scalar_type());
  TORCH_CHECK(src_code >= 0, "reshard kernel: unsupported src dtype ", src.scalar_type());
  const int rc = hfmg_reshard_launch(src.data_ptr(), src_code, static_cast<int>(dst_dtype),
                                     reinterpret_cast<const uint64_t*>(dst_ptrs.data_ptr<int64_t>()),
                                     tiles.data_ptr<int64_t>(), tiles.size(0), allow_vec ? 1 : 0,
                                     src.get_device(), reinterpret_cast<void*>(stream));
  TORCH_CHECK(rc == 0, "reshard kernel launch failed: ", hfmg_reshard_error_string(rc), " (code ", rc, ")");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hybridflow_mg reshard scatter: one launch per bucket copy map";
  m.def("launch", &launch, "Enqueue the tile program on `stream` (a cudaStream_t as int).", py::arg("src"),
        py::arg("tiles"), py::arg("dst_ptrs"), py::arg("dst_dtype"), py::arg("allow_vec"), py::arg("stream"));
  m.def("vec_elems", &hfmg_reshard_vec_elems, "Elements per 16-byte vector for a (src, dst) dtype-code pair.",
        py::arg("src_dtype"), py::arg("dst_dtype"));
  m.attr("TILE_FIELDS") = int(HFMG_TILE_FIELDS);
  m.attr("MAX_TILE_ELEMS") = int(HFMG_MAX_TILE_ELEMS);
}
