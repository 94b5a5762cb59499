// Torch binding of the plain-CUDA multi-tensor score + EMA kernel (score_ema.cu).
// Built by setup.py as elalora_kernels._C_cuda only when torch has CUDA.
//
// Python builds and caches the device tables (elalora_kernels/triton/score_ema_tables.py,
// shared with the Triton kernel) and calls score_ema_launch with them.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include "score_ema.h"

namespace {

void check_table(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.is_cuda(), "score_ema_launch: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "score_ema_launch: ", name, " has the wrong dtype");
  TORCH_CHECK(t.is_contiguous(), "score_ema_launch: ", name, " must be contiguous");
}

void score_ema_launch(const at::Tensor& ptrs, const at::Tensor& numels, const at::Tensor& blocks, at::Tensor count,
                      int64_t w_dtype, int64_t g_dtype, bool aligned, double beta1, double one_minus_beta1,
                      double beta2, double one_minus_beta2) {
  check_table(ptrs, at::kLong, "ptrs");
  check_table(numels, at::kLong, "numels");
  check_table(blocks, at::kLong, "blocks");
  check_table(count, at::kInt, "count");
  TORCH_CHECK(ptrs.dim() == 2 && ptrs.size(1) == 4, "score_ema_launch: ptrs must be [T, 4]");
  TORCH_CHECK(blocks.dim() == 2 && blocks.size(1) == 2, "score_ema_launch: blocks must be [B, 2]");
  const c10::cuda::CUDAGuard guard(ptrs.device());
  int sms = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, ptrs.get_device()) == cudaSuccess,
              "score_ema_launch: cannot query the device");
  // Scalars are rounded to float32 exactly as torch rounds a Python scalar for a float32 tensor.
  const cudaError_t err = elalora::score_ema_launch(
      ptrs.data_ptr<int64_t>(), numels.data_ptr<int64_t>(), blocks.data_ptr<int64_t>(), blocks.size(0),
      static_cast<int>(w_dtype), static_cast<int>(g_dtype), aligned, static_cast<float>(beta1),
      static_cast<float>(one_minus_beta1), static_cast<float>(beta2), static_cast<float>(one_minus_beta2),
      count.data_ptr<int>(), sms * 8, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "score_ema_launch: ", cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "elalora CUDA kernels: multi-tensor score + EMA update (docs/ALGORITHM.md §2)";
  m.attr("CHUNK") = elalora::kScoreEmaChunk;
  m.def("score_ema_launch", &score_ema_launch, "Multi-tensor score+EMA over prebuilt device tables",
        pybind11::arg("ptrs"), pybind11::arg("numels"), pybind11::arg("blocks"), pybind11::arg("count"),
        pybind11::arg("w_dtype"), pybind11::arg("g_dtype"), pybind11::arg("aligned"), pybind11::arg("beta1"),
        pybind11::arg("one_minus_beta1"), pybind11::arg("beta2"), pybind11::arg("one_minus_beta2"));
}
