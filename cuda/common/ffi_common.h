// Shared helpers for pit_jax FFI handlers (CPU and CUDA).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>

#include "xla/ffi/api/ffi.h"

// Helpers that kernels call too are marked for both host and device under nvcc.
#ifdef __CUDACC__
#define PIT_HOST_DEVICE __host__ __device__
#else
#define PIT_HOST_DEVICE
#endif

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

// With PIT_DEBUG_POISON_OUTPUTS=1 in the environment, handlers fill their outputs with this byte
// before computing, so a test that compares every element proves every element was written.
constexpr int kPoisonByte = 0x5A;
inline bool debug_poison_outputs() {
  static const bool on = [] {
    const char* v = std::getenv("PIT_DEBUG_POISON_OUTPUTS");
    return v != nullptr && v[0] == '1';
  }();
  return on;
}

PIT_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t element_count(ffi::AnyBuffer::Dimensions dims) {
  int64_t n = 1;
  for (auto d : dims) n *= d;
  return n;
}

}  // namespace pit
