// Global -> shared copies of tile rows, shared by the GEMM kernels.
#pragma once

#include <cstdint>

#include "mma_sm80.cuh"

namespace pit {

// Copies one row segment of 16 bytes (kVec elements) into shared memory, zero past `valid`
// elements. Vectorised: one cp.async (the caller guarantees valid is 0 or >= kVec and 16-byte
// alignment). Otherwise element loads and shared stores, visible after the next barrier.
template <typename T, bool kVectorized>
__device__ __forceinline__ void load_segment(T* dst, const T* src, int64_t valid, const T* any_valid_address) {
  constexpr int kVec = 16 / int(sizeof(T));
  if constexpr (kVectorized) {
    const bool ok = valid > 0;
    cp_async_16(dst, ok ? src : any_valid_address, ok ? 16 : 0);
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) dst[e] = e < valid ? src[e] : zero_value<T>();
  }
}

}  // namespace pit
