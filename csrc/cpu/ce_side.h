// One side (source or target) of a cross-entropy call, flattened to (rows, classes) with unit class
// stride and int64 labels; a copy is made only when the caller's layout does not allow a view.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

namespace fastadapt::cpu {

struct CeSide {
  at::Tensor logits;  // (rows, classes), stride(1) == 1
  at::Tensor labels;  // (rows,), int64, contiguous
  std::vector<int64_t> logits_sizes, label_sizes;
  int64_t rows = 0, classes = 0, row_stride = 0;
  double weight = 0.0;
  bool evaluated = false;  // weight != 0: a zero-weight term is not evaluated at all
  // Raw pointers, taken once: Tensor::data_ptr() checks cost more than a 10-class row's arithmetic.
  const void* x = nullptr;
  const int64_t* y = nullptr;

  int64_t label(int64_t i) const { return y[i]; }
  template <typename T>
  const T* row(int64_t i) const {
    return static_cast<const T*>(x) + i * row_stride;
  }
  // Number of rows whose label is not ignore_index; throws on a label outside [0, classes).
  int64_t count_valid(int64_t ignore, const char* name) const {
    if (!evaluated) return 0;
    int64_t n = 0;
    for (int64_t i = 0; i < rows; ++i) {
      if (y[i] == ignore) continue;
      TORCH_CHECK_INDEX(y[i] >= 0 && y[i] < classes, name, " contains the label ", y[i], " (at flat position ", i,
                        "), outside [0, ", classes, ") and not ignore_index (", ignore, ")");
      ++n;
    }
    return n;
  }
};

inline CeSide make_ce_side(const at::Tensor& logits, const at::Tensor& labels, double weight) {
  CeSide d;
  d.classes = logits.size(-1);
  d.rows = labels.numel();
  d.logits_sizes = logits.sizes().vec();
  d.label_sizes = labels.sizes().vec();
  d.weight = weight;
  d.evaluated = weight != 0.0;
  at::Tensor l2 = logits.reshape({d.rows, d.classes});
  if (d.rows > 0 && d.classes > 0 && (l2.stride(1) != 1 || (d.rows > 1 && l2.stride(0) < d.classes))) {
    l2 = l2.contiguous();
  }
  d.logits = l2;
  d.row_stride = d.rows > 1 ? l2.stride(0) : d.classes;
  d.labels = labels.reshape({d.rows}).to(at::kLong).contiguous();
  d.x = d.logits.const_data_ptr();
  d.y = d.labels.const_data_ptr<int64_t>();
  return d;
}

}  // namespace fastadapt::cpu
