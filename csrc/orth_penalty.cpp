// docs/ALGORITHM.md §6 on the CPU: the orthogonality penalty's value and its
// gradient in one call, over the active slots only, straight from the parameters.
//
// Every Q [r_max, in] and every Pᵀ (P is [out, r_max]) is a set of row vectors,
// one per slot. For the k active rows R [k, d] of one set:
//     G = R Rᵀ − I          n = ‖G‖_F          ∂n/∂R = 2 G R / n
// The penalty is c/(2M) Σ n over the 2M sets, so its gradient on R is
// (c/M) · G R / n (zero where n = 0, as torch's norm gives), and zero on the
// rows of inactive slots.
//
// Each set is one unit of work: its active rows are read once into a float32
// scratch [k, d] (converting bfloat16/half/float64 as `.float()` does), then
// the Gram matrix and G·R are computed from that cache-resident copy and the
// gradient is written once, inactive slots as zeros. The threads of torch's
// intra-op pool claim units (largest first); every unit's norm goes to its own
// entry and the norms are summed in a fixed order, so the value does not depend
// on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

namespace {

// Built for the portable baseline and for x86-64-v3 (AVX2 + FMA), picked at load time (as in
// score_ema.cpp). Unlike score_ema.cpp this op owes no bit-identity to separate torch multiplies
// and adds (its sums run in its own order anyway), so here a multiply and an add may fuse into one
// instruction (one rounding instead of two): the build's -ffp-contract=off is lifted for this file.
#pragma GCC optimize("fp-contract=fast")
#if (defined(__x86_64__) || defined(__i386__)) && defined(__linux__) && !defined(ELALORA_NO_TARGET_CLONES)
#define ELALORA_AVX2_CLONE __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ELALORA_AVX2_CLONE
#endif

// Eight floats as one value: GCC's vector extension becomes one AVX register in the AVX2
// clone and two SSE registers in the baseline, without leaning on the auto-vectoriser.
typedef float Vec8 __attribute__((vector_size(32)));

__attribute__((always_inline)) inline Vec8 load8(const float* p) {
  Vec8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

__attribute__((always_inline)) inline float sum8(Vec8 v) {
  float sum = 0.f;
  for (int l = 0; l < 8; ++l) sum += v[l];
  return sum;
}

// G[a0 + r, b] = X[a0 + r] · X[b] for r < R: one pass over X[b] feeds R sums (8 lanes each, then the tail).
template <int64_t R>
__attribute__((always_inline)) inline void gram_tile(const float* __restrict__ X, int64_t k, int64_t d, int64_t a0,
                                                     int64_t b, float* __restrict__ G) {
  Vec8 acc[R] = {};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    const Vec8 xb = load8(X + b * d + i);
    for (int64_t r = 0; r < R; ++r) acc[r] += load8(X + (a0 + r) * d + i) * xb;
  }
  for (int64_t r = 0; r < R; ++r) {
    float sum = sum8(acc[r]);
    for (int64_t j = i; j < d; ++j) sum += X[(a0 + r) * d + j] * X[b * d + j];
    G[(a0 + r) * k + b] = sum;
  }
}

// G = X Xᵀ [k, k] for the k rows of X [k, d]: the lower triangle four rows at a time, then mirrored.
ELALORA_AVX2_CLONE void gram(const float* __restrict__ X, int64_t k, int64_t d, float* __restrict__ G) {
  int64_t a0 = 0;
  for (; a0 + 4 <= k; a0 += 4) {
    for (int64_t b = 0; b < a0 + 4; ++b) gram_tile<4>(X, k, d, a0, b, G);
  }
  for (; a0 < k; ++a0) {
    for (int64_t b = 0; b <= a0; ++b) gram_tile<1>(X, k, d, a0, b, G);
  }
  for (int64_t a = 0; a < k; ++a) {
    for (int64_t b = 0; b < a; ++b) G[b * k + a] = G[a * k + b];
  }
}

// out[a0 + r, i0 .. i0+16) = s · Σ_b G[a0 + r, b] · X[b, i0 .. i0+16) for r < R: the sums stay in
// registers while the k rows of X stream past (each load of X feeds R rows of the result).
template <int64_t R>
__attribute__((always_inline)) inline void combine_tile(const float* __restrict__ G, const float* __restrict__ X,
                                                        float s, int64_t k, int64_t d, int64_t a0, int64_t i0,
                                                        float* __restrict__ out) {
  Vec8 lo[R] = {}, hi[R] = {};
  for (int64_t b = 0; b < k; ++b) {
    const Vec8 x_lo = load8(X + b * d + i0), x_hi = load8(X + b * d + i0 + 8);
    for (int64_t r = 0; r < R; ++r) {
      const float g = G[(a0 + r) * k + b];
      lo[r] += g * x_lo;
      hi[r] += g * x_hi;
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const Vec8 y_lo = s * lo[r], y_hi = s * hi[r];
    std::memcpy(out + (a0 + r) * d + i0, &y_lo, sizeof y_lo);
    std::memcpy(out + (a0 + r) * d + i0 + 8, &y_hi, sizeof y_hi);
  }
}

// out = s · G X for G [k, k] and the k rows of X [k, d].
ELALORA_AVX2_CLONE void gram_times_rows(const float* __restrict__ G, const float* __restrict__ X, float s, int64_t k,
                                        int64_t d, float* __restrict__ out) {
  constexpr int64_t kRows = 4;
  const int64_t d_tiled = d - d % 16;
  int64_t a0 = 0;
  for (; a0 + kRows <= k; a0 += kRows) {
    for (int64_t i0 = 0; i0 < d_tiled; i0 += 16) combine_tile<kRows>(G, X, s, k, d, a0, i0, out);
  }
  for (; a0 < k; ++a0) {
    for (int64_t i0 = 0; i0 < d_tiled; i0 += 16) combine_tile<1>(G, X, s, k, d, a0, i0, out);
  }
  for (int64_t a = 0; a < k; ++a) {  // the last d % 16 positions
    for (int64_t i = d_tiled; i < d; ++i) {
      float acc = 0.f;
      for (int64_t b = 0; b < k; ++b) acc += G[a * k + b] * X[b * d + i];
      out[a * d + i] = s * acc;
    }
  }
}

// One set of row vectors: element (slot j, position i) at data[j * slot_stride + i * pos_stride].
struct RowSet {
  const at::Tensor* source;
  at::Tensor* grad;  // contiguous, same shape as the source; null when no gradient is wanted
  bool slot_is_dim0;  // Q: slots are rows; Pᵀ: slots are P's columns
  int64_t slots, len, slot_stride, pos_stride;
  std::vector<int64_t> active;  // indices of the active slots, ascending
};

struct Scratch {
  std::vector<float> rows, grad_rows, gram;
};

template <typename T>
double run_set(const RowSet& set, float grad_scale, Scratch& s) {
  const int64_t k = static_cast<int64_t>(set.active.size()), d = set.len;
  s.rows.resize(k * d);
  s.gram.resize(k * k);
  // The active rows into float32 scratch, reading the source in its memory order.
  const T* src = set.source->const_data_ptr<T>();
  float* x = s.rows.data();
  if (set.slot_is_dim0) {
    for (int64_t a = 0; a < k; ++a) {
      const T* row = src + set.active[a] * set.slot_stride;
      for (int64_t i = 0; i < d; ++i) x[a * d + i] = static_cast<float>(row[i * set.pos_stride]);
    }
  } else {
    for (int64_t i = 0; i < d; ++i) {
      const T* row = src + i * set.pos_stride;
      for (int64_t a = 0; a < k; ++a) x[a * d + i] = static_cast<float>(row[set.active[a] * set.slot_stride]);
    }
  }
  gram(s.rows.data(), k, d, s.gram.data());
  double sum_sq = 0.0;
  for (int64_t a = 0; a < k; ++a) {
    s.gram[a * k + a] -= 1.f;
    for (int64_t b = 0; b < k; ++b) sum_sq += static_cast<double>(s.gram[a * k + b]) * s.gram[a * k + b];
  }
  const double norm = std::sqrt(sum_sq);
  if (set.grad == nullptr) return norm;

  s.grad_rows.resize(k * d);
  const float scale = norm > 0 ? static_cast<float>(grad_scale / norm) : 0.f;
  gram_times_rows(s.gram.data(), s.rows.data(), scale, k, d, s.grad_rows.data());
  // The whole gradient: zeros (inactive slots), then each active slot's values from grad_rows.
  T* out = set.grad->mutable_data_ptr<T>();
  std::fill(out, out + set.slots * d, T(0));
  const float* y = s.grad_rows.data();
  if (set.slot_is_dim0) {
    for (int64_t a = 0; a < k; ++a) {
      T* row = out + set.active[a] * d;
      for (int64_t i = 0; i < d; ++i) row[i] = static_cast<T>(y[a * d + i]);
    }
  } else {
    for (int64_t i = 0; i < d; ++i, out += set.slots) {
      for (int64_t a = 0; a < k; ++a) out[set.active[a]] = static_cast<T>(y[a * d + i]);
    }
  }
  return norm;
}

double run_any(const RowSet& set, float grad_scale, Scratch& s) {
  switch (set.source->scalar_type()) {
    case at::kFloat: return run_set<float>(set, grad_scale, s);
    case at::kDouble: return run_set<double>(set, grad_scale, s);
    case at::kBFloat16: return run_set<c10::BFloat16>(set, grad_scale, s);
    case at::kHalf: return run_set<c10::Half>(set, grad_scale, s);
    default: return std::nan("");  // never reached: orth_penalty checks every dtype first
  }
}

std::vector<int64_t> active_slots(const at::Tensor& active, int64_t slots, size_t m) {
  TORCH_CHECK_VALUE(active.scalar_type() == at::kBool && active.dim() == 1 && active.size(0) == slots &&
                        active.device().is_cpu(),
                    "orth_penalty: active mask ", m, " must be a CPU bool tensor of shape [", slots, "]");
  std::vector<int64_t> out;
  const bool* mask = active.const_data_ptr<bool>();
  for (int64_t j = 0; j < slots; ++j) {
    if (mask[j * active.stride(0)]) out.push_back(j);
  }
  return out;
}

// Contiguous gradients shaped as every P, then every Q. Where all share one dtype they are views of
// one buffer: one allocation, which the allocator can hand back step after step without fresh pages
// (56 separate ones were measured paying page faults every call, more than the arithmetic).
void allocate_grads(const std::vector<at::Tensor>& Ps, const std::vector<at::Tensor>& Qs,
                    std::vector<at::Tensor>& grads) {
  std::vector<const at::Tensor*> all;
  for (const auto& P : Ps) all.push_back(&P);
  for (const auto& Q : Qs) all.push_back(&Q);
  const bool one_dtype = std::all_of(all.begin(), all.end(), [&](const at::Tensor* t) {
    return t->scalar_type() == all[0]->scalar_type();
  });
  if (!one_dtype) {
    for (const at::Tensor* t : all) grads.push_back(at::empty(t->sizes(), t->options()));
    return;
  }
  int64_t total = 0;
  for (const at::Tensor* t : all) total += t->numel();
  const at::Tensor flat = at::empty({total}, all[0]->options());
  int64_t offset = 0;
  for (const at::Tensor* t : all) {
    grads.push_back(flat.narrow(0, offset, t->numel()).view(t->sizes()));
    offset += t->numel();
  }
}

// Returns Σ of the 2M norms (Q_0, Pᵀ_0, Q_1, ... summed in that order, in float64) and, when
// asked, the gradients of (grad_scale/2)·Σ norms for every P, then every Q.
std::pair<double, std::vector<at::Tensor>> orth_penalty(const std::vector<at::Tensor>& Ps,
                                                        const std::vector<at::Tensor>& Qs,
                                                        const std::vector<at::Tensor>& actives, double grad_scale,
                                                        bool want_grads) {
  const size_t M = Ps.size();
  TORCH_CHECK_VALUE(Qs.size() == M && actives.size() == M, "orth_penalty: ", Ps.size(), " P, ", Qs.size(), " Q and ",
                    actives.size(), " active masks");
  std::vector<at::Tensor> grads;
  if (want_grads) grads.reserve(2 * M);
  std::vector<RowSet> sets;
  sets.reserve(2 * M);
  for (size_t m = 0; m < M; ++m) {
    const at::Tensor &P = Ps[m], &Q = Qs[m];
    TORCH_CHECK_VALUE(P.dim() == 2 && Q.dim() == 2 && P.size(1) == Q.size(0) && P.device().is_cpu() &&
                          Q.device().is_cpu() && P.scalar_type() == Q.scalar_type(),
                      "orth_penalty: matrix ", m, " needs CPU P [out, r_max] and Q [r_max, in] of one dtype (got ",
                      P.sizes(), " ", P.scalar_type(), " and ", Q.sizes(), " ", Q.scalar_type(), ")");
    const auto dtype = P.scalar_type();
    TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                      "orth_penalty: unsupported dtype ", dtype);
    const int64_t slots = Q.size(0);
    std::vector<int64_t> active = active_slots(actives[m], slots, m);
    sets.push_back({&Q, nullptr, true, slots, Q.size(1), Q.stride(0), Q.stride(1), active});
    sets.push_back({&P, nullptr, false, slots, P.size(0), P.stride(1), P.stride(0), std::move(active)});
  }
  if (want_grads) {  // allocated first, so the vector does not move while sets point into it
    allocate_grads(Ps, Qs, grads);
    for (size_t m = 0; m < M; ++m) {
      sets[2 * m].grad = &grads[M + m];
      sets[2 * m + 1].grad = &grads[m];
    }
  }
  // Largest units first, so that no thread is left with a big one at the end.
  std::vector<size_t> order(sets.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) {
    return sets[x].len * sets[x].active.size() * sets[x].active.size() >
           sets[y].len * sets[y].active.size() * sets[y].active.size();
  });
  std::vector<double> norms(sets.size());
  std::atomic<size_t> next{0};
  const float scale = static_cast<float>(grad_scale);
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(sets.size()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch scratch;
    for (size_t u; (u = next.fetch_add(1, std::memory_order_relaxed)) < order.size();) {
      norms[order[u]] = run_any(sets[order[u]], scale, scratch);
    }
  });
  return {std::accumulate(norms.begin(), norms.end(), 0.0), std::move(grads)};
}

}  // namespace

void register_orth_penalty(pybind11::module& m) {
  m.def("orth_penalty", &orth_penalty, pybind11::arg("Ps"), pybind11::arg("Qs"), pybind11::arg("actives"),
        pybind11::arg("grad_scale"), pybind11::arg("want_grads"),
        "docs/ALGORITHM.md §6: (Σ of the 2M Frobenius norms, [dP..., dQ...] of grad_scale/2 · that sum).");
}
