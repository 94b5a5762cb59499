// Multi-tensor score + EMA update (docs/ALGORITHM.md §2) in plain CUDA C++.
//
//   ipt = |w * g|;  I <- b1*I + (1-b1)*ipt;  U <- b2*U + (1-b2)*|ipt - I|   (new I)
//
// One launch for every adapter tensor: a grid-stride loop over a table of
// 4096-element chunks, each chunk read with 16-byte vector loads when every
// address is 16-byte aligned (4 float32 EMAs per load; w and g 4 elements per
// load), scalar otherwise and on tails. Float32 arithmetic in the reference's
// order with explicit round-to-nearest multiplies and adds (__fmul_rn,
// __fadd_rn) so nothing is contracted to an FMA: bit-identical to torch.
// Elements whose ipt is inf/nan keep their EMAs and are counted.
#include "score_ema.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace elalora {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;  // elements per vector step

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// kVec elements of T loaded as one vector through the read-only global path
// (ld.global.nc): 16 bytes for float, 8 bytes for the half types.
template <typename T>
struct Vec {
  T v[kVec];
};

template <typename T>
__device__ __forceinline__ Vec<T> load_vec(const T* p) {
  Vec<T> out;
  if constexpr (sizeof(T) == 4) {
    const float4 raw = __ldg(reinterpret_cast<const float4*>(p));
    memcpy(&out, &raw, sizeof(raw));
  } else {
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
    memcpy(&out, &raw, sizeof(raw));
  }
  return out;
}

__device__ __forceinline__ bool update_one(float w, float g, float& ei, float& eu, float b1, float omb1, float b2,
                                           float omb2) {
  const float ipt = fabsf(__fmul_rn(w, g));
  if (!(ipt < INFINITY)) return false;  // inf or nan: keep the EMAs
  const float ni = __fadd_rn(__fmul_rn(b1, ei), __fmul_rn(omb1, ipt));
  const float nu = __fadd_rn(__fmul_rn(b2, eu), __fmul_rn(omb2, fabsf(__fsub_rn(ipt, ni))));
  ei = ni;
  eu = nu;
  return true;
}

template <typename W, typename G, bool kAligned>
__global__ void __launch_bounds__(kThreads) score_ema_kernel(const int64_t* __restrict__ ptrs,
                                                             const int64_t* __restrict__ numels,
                                                             const int64_t* __restrict__ blocks, int64_t nblocks,
                                                             float b1, float omb1, float b2, float omb2, int* count) {
  __shared__ int block_bad;
  if (threadIdx.x == 0) block_bad = 0;
  __syncthreads();
  int bad = 0;
  for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
    const int64_t t = blocks[2 * b];
    const int64_t start = blocks[2 * b + 1];
    const int64_t n = numels[t];
    const W* __restrict__ w = reinterpret_cast<const W*>(ptrs[4 * t + 0]);
    const G* __restrict__ g = reinterpret_cast<const G*>(ptrs[4 * t + 1]);
    float* __restrict__ ei = reinterpret_cast<float*>(ptrs[4 * t + 2]);
    float* __restrict__ eu = reinterpret_cast<float*>(ptrs[4 * t + 3]);
    const int64_t end = start + kScoreEmaChunk < n ? start + kScoreEmaChunk : n;
    if (kAligned && end - start == kScoreEmaChunk) {
      // full chunk, aligned: kChunk / (kThreads * kVec) vector steps per thread, coalesced
#pragma unroll
      for (int s = 0; s < kScoreEmaChunk / (kThreads * kVec); ++s) {
        const int64_t i = start + (int64_t(s) * kThreads + threadIdx.x) * kVec;
        const Vec<W> wv = load_vec(w + i);
        const Vec<G> gv = load_vec(g + i);
        float4 iv = __ldcs(reinterpret_cast<const float4*>(ei + i));  // streamed: read once, written once
        float4 uv = __ldcs(reinterpret_cast<const float4*>(eu + i));
        float* ip = reinterpret_cast<float*>(&iv);
        float* up = reinterpret_cast<float*>(&uv);
#pragma unroll
        for (int k = 0; k < kVec; ++k)
          bad += !update_one(to_float(wv.v[k]), to_float(gv.v[k]), ip[k], up[k], b1, omb1, b2, omb2);
        __stcs(reinterpret_cast<float4*>(ei + i), iv);
        __stcs(reinterpret_cast<float4*>(eu + i), uv);
      }
    } else {
      for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
        float a = ei[i], u = eu[i];
        bad += !update_one(to_float(__ldg(w + i)), to_float(__ldg(g + i)), a, u, b1, omb1, b2, omb2);
        ei[i] = a;
        eu[i] = u;
      }
    }
  }
  if (bad) atomicAdd(&block_bad, bad);
  __syncthreads();
  if (threadIdx.x == 0 && block_bad) atomicAdd(count, block_bad);
}

template <typename W, typename G>
cudaError_t launch_typed(const int64_t* ptrs, const int64_t* numels, const int64_t* blocks, int64_t nblocks,
                         bool aligned, float b1, float omb1, float b2, float omb2, int* count, int max_grid,
                         cudaStream_t stream) {
  const int64_t grid64 = nblocks < max_grid ? nblocks : max_grid;
  const unsigned grid = static_cast<unsigned>(grid64 > 0 ? grid64 : 1);
  if (aligned)
    score_ema_kernel<W, G, true><<<grid, kThreads, 0, stream>>>(ptrs, numels, blocks, nblocks, b1, omb1, b2, omb2, count);
  else
    score_ema_kernel<W, G, false><<<grid, kThreads, 0, stream>>>(ptrs, numels, blocks, nblocks, b1, omb1, b2, omb2, count);
  return cudaGetLastError();
}

template <typename W>
cudaError_t launch_w(int g_dtype, const int64_t* ptrs, const int64_t* numels, const int64_t* blocks, int64_t nblocks,
                     bool aligned, float b1, float omb1, float b2, float omb2, int* count, int max_grid,
                     cudaStream_t stream) {
  switch (g_dtype) {
    case kFloat32:
      return launch_typed<W, float>(ptrs, numels, blocks, nblocks, aligned, b1, omb1, b2, omb2, count, max_grid, stream);
    case kFloat16:
      return launch_typed<W, __half>(ptrs, numels, blocks, nblocks, aligned, b1, omb1, b2, omb2, count, max_grid, stream);
    case kBFloat16:
      return launch_typed<W, __nv_bfloat16>(ptrs, numels, blocks, nblocks, aligned, b1, omb1, b2, omb2, count, max_grid,
                                            stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t score_ema_launch(const int64_t* ptrs, const int64_t* numels, const int64_t* blocks, int64_t nblocks,
                             int w_dtype, int g_dtype, bool aligned, float beta1, float one_minus_beta1, float beta2,
                             float one_minus_beta2, int* count, int max_grid, cudaStream_t stream) {
  if (nblocks <= 0) return cudaSuccess;
  switch (w_dtype) {
    case kFloat32:
      return launch_w<float>(g_dtype, ptrs, numels, blocks, nblocks, aligned, beta1, one_minus_beta1, beta2,
                             one_minus_beta2, count, max_grid, stream);
    case kFloat16:
      return launch_w<__half>(g_dtype, ptrs, numels, blocks, nblocks, aligned, beta1, one_minus_beta1, beta2,
                              one_minus_beta2, count, max_grid, stream);
    case kBFloat16:
      return launch_w<__nv_bfloat16>(g_dtype, ptrs, numels, blocks, nblocks, aligned, beta1, one_minus_beta1, beta2,
                                     one_minus_beta2, count, max_grid, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace elalora
