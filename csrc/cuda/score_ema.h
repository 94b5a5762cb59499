// Multi-tensor score + EMA update (docs/ALGORITHM.md §2) — plain CUDA C++ entry point.
//
// The tables are the ones elalora_kernels/triton/score_ema_tables.py builds and caches:
//   ptrs   int64 [T, 4]  device addresses of (w, g, ema_ipt, ema_unc) per tensor
//   numels int64 [T]
//   blocks int64 [B, 2]  (tensor index, first element) of each 4096-element chunk
// EMAs are float32; w and g are float32, float16 or bfloat16 (dtype codes below).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace elalora {

constexpr int kScoreEmaChunk = 4096;  // elements per table entry (must match score_ema.BLOCK)

enum ScoreEmaDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Launches one kernel over every chunk; adds the number of non-finite |w*g| to *count.
// Returns cudaSuccess or the launch error. `aligned`: every address is 16-byte aligned.
cudaError_t score_ema_launch(const int64_t* ptrs, const int64_t* numels, const int64_t* blocks, int64_t nblocks,
                             int w_dtype, int g_dtype, bool aligned, float beta1, float one_minus_beta1, float beta2,
                             float one_minus_beta2, int* count, int max_grid, cudaStream_t stream);

}  // namespace elalora
