// Shared helpers for pit_jax FFI handlers (CPU and CUDA).
#pragma once

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace pit {

namespace ffi = xla::ffi;

// Flattened view of an operand [..., rows, cols]: the leading dims become one batch.
struct MatrixView {
  int64_t batch = 1;
  int64_t rows = 0;
  int64_t cols = 0;
};

inline bool matrix_view(ffi::AnyBuffer::Dimensions dims, MatrixView* view) {
  if (dims.size() < 2) return false;
  view->batch = 1;
  for (size_t i = 0; i + 2 < dims.size(); ++i) view->batch *= dims[i];
  view->rows = dims[dims.size() - 2];
  view->cols = dims[dims.size() - 1];
  return true;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t element_count(ffi::AnyBuffer::Dimensions dims) {
  int64_t n = 1;
  for (auto d : dims) n *= d;
  return n;
}

}  // namespace pit
