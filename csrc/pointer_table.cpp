// The pointer table of the GPU score+EMA launch (elalora_kernels/triton/resident_score_ema.py),
// kept current in C++ so that a training step costs O(1) Python work however many
// adapter tensors there are.
//
// Row k of the int64 [T, 4] table holds the addresses of (w, g, Ī, Ū) of one tensor.
// refresh() reads every parameter's .grad here, compares the addresses with the last
// ones and, when one moved (zero_grad(set_to_none=True) re-allocates every gradient),
// rewrites the table and uploads it with one asynchronous copy from pinned memory
// (the caching host allocator keeps that buffer until the copy has run).
//
// It holds no reference to the gradients: holding them would move the freeing of the
// previous step's gradients into this step. current() tells whether the table still
// points at every parameter's present gradient (what a CUDA graph replay relies on).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

class PointerTable {
 public:
  // `rows[k]` is the index in `params` (and in every list given to refresh_with) of row k.
  PointerTable(std::vector<at::Tensor> params, const std::vector<at::Tensor>& ema_ipt,
               const std::vector<at::Tensor>& ema_unc, std::vector<int64_t> rows, at::Tensor table)
      : params_(std::move(params)), rows_(std::move(rows)), table_(std::move(table)), device_(table_.device()) {
    const size_t t = rows_.size();
    TORCH_CHECK(ema_ipt.size() == params_.size() && ema_unc.size() == params_.size(),
                "PointerTable: one EMA pair per parameter");
    TORCH_CHECK(table_.scalar_type() == at::kLong && table_.is_contiguous() && table_.dim() == 2 &&
                    table_.size(0) == static_cast<int64_t>(t) && table_.size(1) == 4,
                "PointerTable: the table must be a contiguous int64 [rows, 4] tensor");
    host_.assign(4 * t, 0);
    zeros_.resize(t);
    for (size_t k = 0; k < t; ++k) {
      const int64_t i = rows_[k];
      TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(params_.size()), "PointerTable: row index out of range");
      dtypes_.push_back(params_[i].scalar_type());
      emas_.push_back(ema_ipt[i]);
      emas_.push_back(ema_unc[i]);
      host_[4 * k + 2] = address(ema_ipt[i]);
      host_[4 * k + 3] = address(ema_unc[i]);
    }
  }

  // Reads every parameter's own .grad (a missing one counts as zeros).
  // Returns 1 if the table was rewritten and uploaded, 0 if nothing moved, -1 if a
  // tensor is not one the table was planned for (not contiguous, another dtype or
  // device): the caller takes the generic path for this step.
  int refresh() {
    bool moved = false;
    for (size_t k = 0; k < rows_.size(); ++k) {
      const at::Tensor& p = params_[rows_[k]];
      if (!set_row(k, p, grad_or_zeros(k, p), moved)) return -1;
    }
    return finish(moved);
  }

  // The same with the weights and gradients given (FSDP2 shards, benchmarks).
  int refresh_with(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& grads) {
    TORCH_CHECK(weights.size() == params_.size() && grads.size() == params_.size(),
                "PointerTable.refresh_with: one weight and one gradient per parameter");
    bool moved = false;
    for (size_t k = 0; k < rows_.size(); ++k) {
      const int64_t i = rows_[k];
      const at::Tensor& w = weights[i];
      const at::Tensor& g = grads[i];
      if (!g.defined() || g.numel() != w.numel() || g.device() != w.device() || g.scalar_type() != w.scalar_type() ||
          !set_row(k, w, g, moved))
        return -1;
    }
    return finish(moved);
  }

  // Whether every row still holds its parameter's present weight and gradient (nothing uploaded).
  bool current() const {
    for (size_t k = 0; k < rows_.size(); ++k) {
      const at::Tensor& p = params_[rows_[k]];
      const at::Tensor& g = p.grad();
      const int64_t ga = g.defined() ? address(g) : (zeros_[k].defined() ? address(zeros_[k]) : -1);
      if (host_[4 * k] != address(p) || host_[4 * k + 1] != ga) return false;
    }
    return uploads_ > 0;
  }

  bool aligned() const { return aligned_; }
  int64_t uploads() const { return uploads_; }

 private:
  static int64_t address(const at::Tensor& t) { return reinterpret_cast<int64_t>(t.data_ptr()); }

  const at::Tensor& grad_or_zeros(size_t k, const at::Tensor& p) {
    const at::Tensor& g = p.grad();
    if (g.defined()) return g;
    if (!zeros_[k].defined()) zeros_[k] = at::zeros_like(p, at::MemoryFormat::Contiguous);
    return zeros_[k];
  }

  bool set_row(size_t k, const at::Tensor& w, const at::Tensor& g, bool& moved) {
    if (!w.is_contiguous() || !g.is_contiguous() || w.scalar_type() != dtypes_[k] || w.device() != device_) return false;
    const int64_t wa = address(w), ga = address(g);
    if (host_[4 * k] != wa || host_[4 * k + 1] != ga) {
      host_[4 * k] = wa;
      host_[4 * k + 1] = ga;
      moved = true;
    }
    return true;
  }

  int finish(bool moved) {
    if (!moved) return 0;
    bool aligned = true;
    for (int64_t a : host_) aligned = aligned && a % 16 == 0;
    aligned_ = aligned;
    const auto options = at::TensorOptions().dtype(at::kLong).pinned_memory(table_.is_cuda());
    at::Tensor staged = at::empty(table_.sizes(), options);
    std::memcpy(staged.data_ptr<int64_t>(), host_.data(), host_.size() * sizeof(int64_t));
    table_.copy_(staged, /*non_blocking=*/true);
    ++uploads_;
    return 1;
  }

  std::vector<at::Tensor> params_, emas_, zeros_;
  std::vector<int64_t> rows_, host_;
  std::vector<at::ScalarType> dtypes_;
  at::Tensor table_;
  at::Device device_;
  bool aligned_ = false;
  int64_t uploads_ = 0;
};

}  // namespace

void register_pointer_table(pybind11::module& m) {
  pybind11::class_<PointerTable>(m, "PointerTable", "Device pointer table of the score+EMA launch, kept current in C++")
      .def(pybind11::init<std::vector<at::Tensor>, const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                          std::vector<int64_t>, at::Tensor>(),
           pybind11::arg("params"), pybind11::arg("ema_ipt"), pybind11::arg("ema_unc"), pybind11::arg("rows"),
           pybind11::arg("table"))
      .def("refresh", &PointerTable::refresh)
      .def("refresh_with", &PointerTable::refresh_with, pybind11::arg("weights"), pybind11::arg("grads"))
      .def("current", &PointerTable::current)
      .def_property_readonly("aligned", &PointerTable::aligned)
      .def_property_readonly("uploads", &PointerTable::uploads);
}
