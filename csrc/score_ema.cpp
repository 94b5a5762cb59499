// docs/ALGORITHM.md §2 on the CPU: the importance score + EMA update of every
// adapter tensor of a model in one OpenMP-parallel pass.
//
// For each element, with w the parameter and g its gradient:
//     ipt = |w·g|                                   (float32)
//     Ī  ← β1·Ī + (1−β1)·ipt
//     Ū  ← β2·Ū + (1−β2)·|ipt − Ī_new|
// An element whose ipt is not finite keeps its Ī, Ū and is counted.
//
// The arithmetic is the reference's, operation for operation, in float32 with
// the scalars rounded to float as torch rounds a Python scalar for a float32
// tensor; -ffp-contract=off (setup.py) forbids fused multiply-adds, so the
// result is bit-identical to elalora_kernels.reference.score_ema_update.
//
// All tensors are concatenated into one virtual range of elements cut into
// chunks (a chunk may span many small tensors or part of one large one), so the
// pass is balanced whatever the mix of sizes. The threads of torch's own
// intra-op (OpenMP) team, started by at::parallel_for, claim chunks one at a
// time, so a thread the OS delays does not hold the others up. A private
// pool was tried and measured worse: called right after torch ops (as it is,
// after optimizer.step()), torch's OpenMP threads still spin-wait on the cores
// and a second pool competes with them (numbers in benchmarks/RESULTS.md,
// "Measurements behind design choices").
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

enum class Kind : int8_t { F32 = 0, BF16 = 1, F16 = 2 };

struct Segment {
  const void* w;
  const void* g;
  float* ipt;
  float* unc;
  int64_t n;
  Kind wk, gk;
};

struct Coeffs {
  float b1, omb1, b2, omb2;
};

// Built for the portable baseline and for AVX2, picked at load time (GCC function
// multiversioning): AVX2 widens bfloat16 faster (measured, see RESULTS.md); float32 is
// memory-bound either way. AVX2 has no FMA, and -ffp-contract=off holds in both.
//
// Function multiversioning needs x86 and the ELF loader's ifunc (Linux); elsewhere,
// or when built with -DELALORA_NO_TARGET_CLONES, only the baseline is compiled.
#if (defined(__x86_64__) || defined(__i386__)) && defined(__linux__) && !defined(ELALORA_NO_TARGET_CLONES)
#define ELALORA_AVX2_CLONE __attribute__((target_clones("avx2", "default")))
#else
#define ELALORA_AVX2_CLONE
#endif
// `ok ? new : old` as a bitwise select. Written as a ternary, GCC turns "store the
// old value back" into "skip the store", a branch that leaves the loop scalar
// (measured slower than this vectorised form: benchmarks/RESULTS.md).
inline float select(bool ok, float new_value, float old_value) {
  uint32_t n, o;
  std::memcpy(&n, &new_value, sizeof n);
  std::memcpy(&o, &old_value, sizeof o);
  const uint32_t keep_new = 0u - static_cast<uint32_t>(ok);
  const uint32_t bits = (n & keep_new) | (o & ~keep_new);
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// At most this many elements per vector loop: its int32 count cannot overflow (a
// 64-bit count would cost the loop half its vector width).
constexpr int64_t kCountBlock = int64_t{1} << 30;

template <typename W, typename G>
ELALORA_AVX2_CLONE int32_t update_block(const W* __restrict__ w, const G* __restrict__ g, float* __restrict__ ipt,
                                        float* __restrict__ unc, int64_t n, Coeffs c) {
  int32_t skipped = 0;
#pragma omp simd reduction(+ : skipped)
  for (int64_t i = 0; i < n; ++i) {
    const float p = std::fabs(static_cast<float>(w[i]) * static_cast<float>(g[i]));
    const float ie = ipt[i];
    const float ue = unc[i];
    const float ni = c.b1 * ie + c.omb1 * p;
    const float nu = c.b2 * ue + c.omb2 * std::fabs(p - ni);
    const bool ok = p <= FLT_MAX;  // false for +inf and NaN (p is an absolute value)
    ipt[i] = select(ok, ni, ie);
    unc[i] = select(ok, nu, ue);
    skipped += ok ? 0 : 1;
  }
  return skipped;
}

template <typename W, typename G>
int64_t update(const W* w, const G* g, float* ipt, float* unc, int64_t n, Coeffs c) {
  int64_t skipped = 0;
  for (int64_t lo = 0; lo < n; lo += kCountBlock) {
    const int64_t m = std::min(kCountBlock, n - lo);
    skipped += update_block(w + lo, g + lo, ipt + lo, unc + lo, m, c);
  }
  return skipped;
}

template <typename W>
int64_t update_w(const Segment& s, int64_t lo, int64_t hi, Coeffs c) {
  const W* w = static_cast<const W*>(s.w) + lo;
  float* ipt = s.ipt + lo;
  float* unc = s.unc + lo;
  const int64_t n = hi - lo;
  switch (s.gk) {
    case Kind::F32: return update(w, static_cast<const float*>(s.g) + lo, ipt, unc, n, c);
    case Kind::BF16: return update(w, static_cast<const c10::BFloat16*>(s.g) + lo, ipt, unc, n, c);
    case Kind::F16: return update(w, static_cast<const c10::Half*>(s.g) + lo, ipt, unc, n, c);
  }
  return 0;
}

int64_t update_segment(const Segment& s, int64_t lo, int64_t hi, Coeffs c) {
  switch (s.wk) {
    case Kind::F32: return update_w<float>(s, lo, hi, c);
    case Kind::BF16: return update_w<c10::BFloat16>(s, lo, hi, c);
    case Kind::F16: return update_w<c10::Half>(s, lo, hi, c);
  }
  return 0;
}

Kind kind_of(const at::Tensor& t, const char* what, size_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return Kind::F32;
    case at::kBFloat16: return Kind::BF16;
    case at::kHalf: return Kind::F16;
    default: TORCH_CHECK(false, "score_ema_update: ", what, "[", i, "] must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// Below this many elements in all, the calling thread does the whole pass alone
// (handing work out costs more than it saves); chunks are kChunk elements.
constexpr int64_t kSerial = 1 << 15;
constexpr int64_t kChunk = 1 << 16;  // a multiple of 16 floats: chunks do not share cache lines

// Every tensor as one virtual range of elements.
struct Work {
  std::vector<Segment> segs;
  std::vector<int64_t> offsets{0};
  Coeffs c{};

  int64_t run_range(int64_t begin, int64_t end) const {
    int64_t count = 0;
    const int64_t nseg = static_cast<int64_t>(segs.size());
    // First segment that ends after `begin`.
    int64_t i = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    for (; i < nseg && offsets[i] < end; ++i) {
      const int64_t lo = std::max(begin, offsets[i]) - offsets[i];
      const int64_t hi = std::min(end, offsets[i + 1]) - offsets[i];
      count += update_segment(segs[i], lo, hi, c);
    }
    return count;
  }
};

int64_t score_ema_update(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                         const std::vector<at::Tensor>& ema_ipt, const std::vector<at::Tensor>& ema_unc, double beta1,
                         double beta2) {
  const size_t m = params.size();
  TORCH_CHECK(grads.size() == m && ema_ipt.size() == m && ema_unc.size() == m,
              "score_ema_update: params, grads, ema_ipt and ema_unc must have the same length (got ", m, ", ",
              grads.size(), ", ", ema_ipt.size(), ", ", ema_unc.size(), ")");
  // Contiguous stand-ins for strided inputs; strided EMAs are written back after the pass.
  std::vector<at::Tensor> keep;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;
  Work work;
  std::vector<Segment>& segs = work.segs;
  std::vector<int64_t>& offsets = work.offsets;
  segs.reserve(m);
  offsets.reserve(m + 1);
  for (size_t i = 0; i < m; ++i) {
    const at::Tensor* ts[4] = {&params[i], &grads[i], &ema_ipt[i], &ema_unc[i]};
    const int64_t n = params[i].numel();
    for (int k = 0; k < 4; ++k) {
      TORCH_CHECK(ts[k]->defined(), "score_ema_update: undefined tensor at index ", i);
      TORCH_CHECK(ts[k]->device().is_cpu(), "score_ema_update: CPU tensors expected (index ", i, ")");
      TORCH_CHECK(ts[k]->numel() == n, "score_ema_update: tensors at index ", i, " differ in size");
    }
    TORCH_CHECK(ema_ipt[i].scalar_type() == at::kFloat && ema_unc[i].scalar_type() == at::kFloat,
                "score_ema_update: EMAs must be float32 (index ", i, ")");
    if (n == 0) continue;
    Segment s;
    s.wk = kind_of(params[i], "params", i);
    s.gk = kind_of(grads[i], "grads", i);
    at::Tensor w = params[i].is_contiguous() ? params[i] : params[i].contiguous();
    at::Tensor g = grads[i].is_contiguous() ? grads[i] : grads[i].contiguous();
    at::Tensor a = ema_ipt[i], u = ema_unc[i];
    if (!a.is_contiguous()) {
      write_back.emplace_back(a, a.contiguous());
      a = write_back.back().second;
    }
    if (!u.is_contiguous()) {
      write_back.emplace_back(u, u.contiguous());
      u = write_back.back().second;
    }
    keep.push_back(w);
    keep.push_back(g);
    s.w = w.data_ptr();
    s.g = g.data_ptr();
    s.ipt = a.data_ptr<float>();
    s.unc = u.data_ptr<float>();
    s.n = n;
    segs.push_back(s);
    offsets.push_back(offsets.back() + n);
  }
  const int64_t total = offsets.back();
  work.c = Coeffs{static_cast<float>(beta1), static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
                  static_cast<float>(1.0 - beta2)};
  int64_t skipped = 0;
  if (total > 0) {
    pybind11::gil_scoped_release no_gil;
    if (total < kSerial || at::get_num_threads() <= 1) {
      skipped = work.run_range(0, total);
    } else {
      // Each thread of the team claims the next chunk until none is left: a thread
      // that the OS delays (the cores are often shared) just claims fewer chunks.
      const int64_t chunks = (total + kChunk - 1) / kChunk;
      std::atomic<int64_t> next{0}, counted{0};
      at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), chunks), 1, [&](int64_t, int64_t) {
        int64_t mine = 0;
        for (int64_t k; (k = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
          mine += work.run_range(k * kChunk, std::min(total, (k + 1) * kChunk));
        }
        counted += mine;
      });
      skipped = counted.load();
    }
  }
  for (auto& [dst, src] : write_back) dst.copy_(src);
  return skipped;
}

}  // namespace

void register_pointer_table(pybind11::module& m);  // pointer_table.cpp
void register_orth_penalty(pybind11::module& m);   // orth_penalty.cpp

PYBIND11_MODULE(_C, m) {
  m.doc() = "elalora C++ CPU kernels";
  m.def("score_ema_update", &score_ema_update, pybind11::arg("params"), pybind11::arg("grads"),
        pybind11::arg("ema_ipt"), pybind11::arg("ema_unc"), pybind11::arg("beta1"), pybind11::arg("beta2"),
        "docs/ALGORITHM.md §2 over every tensor in one parallel pass; returns the number of non-finite elements skipped.");
  register_pointer_table(m);
  register_orth_penalty(m);
}
