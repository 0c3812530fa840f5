// The sampled NT product: out[b, r, c] = Σ_n dy[b, r, n] · w[c, n] on the micro-tiles that x's
// index lists, zero elsewhere. It is the masked cotangent of sparse_dense's sparse operand, which
// dense_sparse(grad="masked") needs for its weight (PIT sparse training: pruned tiles get no
// gradient, so none is computed for them).
//
// One CTA per (32-row group, 64 of the group's listed columns). The CTA names its columns from the
// index (block id · tile_k + offset, as pack lists them) and streams the contraction dim N through
// a cp.async ring: the group's 32 rows of dy (dense) and the rows of w its columns name (SRead),
// then tensor cores (mma.sync m16n8k16, fp32 accumulate; fp32 inputs on CUDA cores) multiply
// dy_g · w_idsᵀ. Results are stored to their (row, column) places; the rest of `out` is zeroed by
// one memset before the kernel.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/mma_sm80.cuh"
#include "../common/tile_copy.cuh"
#include "kgather_layout.h"

namespace pit {

constexpr int kNtThreads = 128;  // 4 warps

template <typename T>
struct NtConfig {
  static constexpr bool kTensorCores = sizeof(T) == 2;
  static constexpr int kBM = int(kGroupRows);  // rows of one group
  static constexpr int kBL = 64;               // listed columns per CTA
  static constexpr int kBK = 64;               // contraction (N) per step
  static constexpr int kStages = 3;
  static constexpr int kVec = 16 / int(sizeof(T));
  // 16-bit types: 128-byte rows with their 16-byte chunks XOR-swizzled by row % 8 (the forward's
  // layout), so that ldmatrix's 8 rows fall in 8 bank groups; fp32 rows are padded instead.
  static constexpr bool kSwizzle = kTensorCores;
  static constexpr int kStride = kSwizzle ? kBK : kBK + kVec;
  static constexpr int kStageElems = (kBM + kBL) * kStride;
  static constexpr int kSmemBytes = kStages * kStageElems * int(sizeof(T));
  static_assert(!kSwizzle || kBK / kVec == 8, "a swizzled row is one group of 8 chunks");

  __device__ __forceinline__ static int at(int row, int col) {
    if constexpr (kSwizzle) return row * kStride + (((col / kVec) ^ (row & 7)) * kVec) + col % kVec;
    else return row * kStride + col;
  }
};

template <typename T>
struct NtTensorCoreMath {  // warp w: the 32 rows x listed columns [16w, 16w + 16)
  using C = NtConfig<T>;
  float acc[2][2][4] = {};

  __device__ __forceinline__ void step(const T* as, const T* bs, int warp, int lane) {
#pragma unroll
    for (int ks = 0; ks < C::kBK / 16; ++ks) {
      uint32_t a[2][4], b[4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) ldmatrix_x4(a[mi], as + C::at(mi * 16 + lane % 16, ks * 16 + (lane / 16) * 8));
      // w's rows are the product's columns with the contraction contiguous: the "col" B operand as
      // stored, so ldmatrix without transpose: matrices (cols 0-7 | 8-15) x (k 0-7 | 8-15)
      const int q = lane / 8;
      ldmatrix_x4(b, bs + C::at(warp * 16 + (q / 2) * 8 + lane % 8, ks * 16 + (q % 2) * 8));
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int nj = 0; nj < 2; ++nj) mma_16816<T>(acc[mi][nj], a[mi], b[2 * nj], b[2 * nj + 1]);
    }
  }

  template <typename Store>
  __device__ __forceinline__ void store(Store&& put, int warp, int lane) const {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int nj = 0; nj < 2; ++nj)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          put(mi * 16 + lane / 4 + (e / 2) * 8, warp * 16 + nj * 8 + 2 * (lane % 4) + e % 2, acc[mi][nj][e]);
  }
};

template <typename T>
struct NtCudaCoreMath {  // fp32: thread t owns rows 4(t / 16) + i and listed columns 4(t % 16) + j
  using C = NtConfig<T>;
  float acc[4][4] = {};

  __device__ __forceinline__ void step(const T* as, const T* bs, int, int) {
    const int r0 = (threadIdx.x / 16) * 4, c0 = (threadIdx.x % 16) * 4;
#pragma unroll 4
    for (int kk = 0; kk < C::kBK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = float(as[C::at(r0 + i, kk)]);
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = float(bs[C::at(c0 + j, kk)]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }

  template <typename Store>
  __device__ __forceinline__ void store(Store&& put, int, int) const {
    const int r0 = (threadIdx.x / 16) * 4, c0 = (threadIdx.x % 16) * 4;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) put(r0 + i, c0 + j, acc[i][j]);
  }
};

template <typename T>
using NtMath = std::conditional_t<NtConfig<T>::kTensorCores, NtTensorCoreMath<T>, NtCudaCoreMath<T>>;

// kVec16: dy's and w's rows are copied 16 bytes at a time (N a multiple of the vector, aligned bases).
template <typename T, bool kVec16>
__global__ void __launch_bounds__(kNtThreads) pit_kgather_nt_kernel(const T* __restrict__ dy, const T* __restrict__ w,
                                                                   const int32_t* __restrict__ counts,
                                                                   const int32_t* __restrict__ indices,
                                                                   T* __restrict__ out, KGatherShape s) {
  using C = NtConfig<T>;
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  T* smem = reinterpret_cast<T*>(smem_bytes);
  __shared__ int32_t ids[C::kBL];
  const int64_t group = blockIdx.x;  // b * groups + g
  const int64_t b = group / s.groups, g = group % s.groups;
  const int64_t len = s.group_length(counts, b, g);
  const int64_t p0 = int64_t(blockIdx.y) * C::kBL;
  if (p0 >= len) return;  // the grid covers the longest possible list
  const int64_t rb = b * s.nb_m + g * kGroupRows / s.tile_m;
  const int32_t* blocks = indices + rb * s.nb_k;
  if (threadIdx.x < C::kBL) {
    const int64_t p = p0 + threadIdx.x;
    ids[threadIdx.x] = int32_t(p < len ? s.listed_column(blocks, p) : -1);
  }
  __syncthreads();

  const int64_t row0 = g * kGroupRows;
  const int64_t rows_left = s.rows - row0;
  const T* dy_rows = dy + (b * s.rows + row0) * s.n;
  constexpr int kVecsPerRow = C::kBK / C::kVec;
  auto load = [&](int chunk, int stage) {
    T* as = smem + stage * C::kStageElems;
    T* bs = as + C::kBM * C::kStride;
    const int64_t n0 = int64_t(chunk) * C::kBK;
    for (int i = threadIdx.x; i < (C::kBM + C::kBL) * kVecsPerRow; i += kNtThreads) {
      const int r = i / kVecsPerRow, c = (i % kVecsPerRow) * C::kVec;
      const int64_t cols_left = s.n - n0 - c;
      const int64_t seg = cols_left < C::kVec ? cols_left : C::kVec;
      if (r < C::kBM) {  // dy: the group's rows
        load_segment<T, kVec16>(as + C::at(r, c), dy_rows + r * s.n + n0 + c, r < rows_left ? seg : 0, dy);
      } else {  // w: the rows the listed columns name
        const int32_t id = ids[r - C::kBM];
        load_segment<T, kVec16>(bs + C::at(r - C::kBM, c), w + int64_t(id < 0 ? 0 : id) * s.n + n0 + c,
                                id < 0 ? 0 : seg, w);
      }
    }
  };
  NtMath<T> math;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  pipelined_mainloop<C::kStages>(int(ceil_div(s.n, int64_t(C::kBK))), load, [&](int, int stage) {
    const T* as = smem + stage * C::kStageElems;
    math.step(as, as + C::kBM * C::kStride, warp, lane);
  });
  T* out_rows = out + (b * s.rows + row0) * s.k;
  math.store([&](int r, int c, float v) {
    const int32_t id = ids[c];
    if (r < rows_left && id >= 0) out_rows[r * s.k + id] = from_float<T>(v);
  }, warp, lane);
}

// Zeroes out [batch, M, K], then writes the listed tiles (tile_m a multiple of 32).
template <typename T>
cudaError_t launch_nt(cudaStream_t stream, const KGatherShape& s, const void* dy, const void* w, const int32_t* counts,
                      const int32_t* indices, void* out) {
  using C = NtConfig<T>;
  const int64_t out_elems = s.batch * s.rows * s.k;
  if (out_elems == 0) return cudaSuccess;
  cudaError_t err = cudaMemsetAsync(out, 0, out_elems * sizeof(T), stream);
  if (err != cudaSuccess || s.n == 0 || s.all_groups() == 0) return err;
  const bool vec = rows_copy_by_16_bytes<T>(dy, s.n) && rows_copy_by_16_bytes<T>(w, s.n);
  auto kernel = vec ? pit_kgather_nt_kernel<T, true> : pit_kgather_nt_kernel<T, false>;
  err = allow_dynamic_smem(kernel, C::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(s.all_groups()), unsigned(ceil_div(s.nb_k * s.tile_k, int64_t(C::kBL))));
  kernel<<<grid, kNtThreads, C::kSmemBytes, stream>>>(static_cast<const T*>(dy), static_cast<const T*>(w), counts,
                                                       indices, static_cast<T*>(out), s);
  return cudaGetLastError();
}

}  // namespace pit
