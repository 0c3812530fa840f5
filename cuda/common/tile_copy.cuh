// Global -> shared copies of tile rows, shared by the GEMM kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "mma_sm80.cuh"

namespace pit {

// Host side: rows of `row_len` elements starting at `base` can be copied 16 bytes at a time
// (the `kVectorized` choice of load_segment).
template <typename T>
inline bool rows_copy_by_16_bytes(const void* base, int64_t row_len) {
  return row_len % (16 / int64_t(sizeof(T))) == 0 && reinterpret_cast<uintptr_t>(base) % 16 == 0;
}

// Host side: lets `kernel` take `bytes` of dynamic shared memory (above 48 KB needs opting in).
template <typename Kernel>
inline cudaError_t allow_dynamic_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

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

// Copies a kRows x kCols tile of a row-major matrix (`ld` elements per row; `rows_left` and
// `cols_left` elements exist from the tile's origin `src`) into shared rows of `stride`
// elements, 16 bytes per copy, zeros outside the matrix. All kThreads threads take part.
template <typename T, bool kVectorized, int kRows, int kCols, int kThreads>
__device__ __forceinline__ void load_tile(T* dst, int stride, const T* src, int64_t ld, int64_t rows_left,
                                          int64_t cols_left, const T* any_valid_address) {
  constexpr int kVec = 16 / int(sizeof(T)), kVecsPerRow = kCols / kVec;
  for (int i = threadIdx.x; i < kRows * kVecsPerRow; i += kThreads) {
    const int r = i / kVecsPerRow, c = (i % kVecsPerRow) * kVec;
    const int64_t valid = r >= rows_left ? 0 : (cols_left - c < kVec ? cols_left - c : kVec);
    load_segment<T, kVectorized>(dst + r * stride + c, src + r * ld + c, valid, any_valid_address);
  }
}

// Runs compute(i, stage) for i in [0, n) over a kStages-deep cp.async ring that
// load(i, stage) fills: loads run kStages - 1 steps ahead; one barrier per step makes stage i
// visible and frees stage i - 1 for refill. All copies have landed on return.
template <int kStages, typename Load, typename Compute>
__device__ __forceinline__ void pipelined_mainloop(int n, Load&& load, Compute&& compute) {
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < n) load(st, st);
    cp_async_commit();
  }
  for (int i = 0; i < n; ++i) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = i + kStages - 1;
    if (next < n) load(next, next % kStages);
    cp_async_commit();
    compute(i, i % kStages);
  }
  cp_async_wait<0>();
}

}  // namespace pit
