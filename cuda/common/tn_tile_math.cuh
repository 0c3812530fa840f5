// xᵀ·dy tile math shared by the dW kernels (k-gather, MoE): a 128 x 128 tile of dw per CTA of
// 8 warps, reduction over 32 gathered rows per pipeline stage, optional per-column masks.
#pragma once

#include <cstdint>
#include <type_traits>

#include "mma_sm80.cuh"

namespace pit {

constexpr int kTnRows = 32;  // rows (tokens) reduced per pipeline stage

// dW tiles are 128 x 128: x and dy are re-read once per tile column / row, so the tile is as
// large as two CTAs per SM allow. One 32-row group per stage.
template <typename T>
struct TnConfig {
  static constexpr bool kTensorCores = sizeof(T) == 2;
  static constexpr int kThreads = 256;  // 8 warps: 2 (dw rows) x 4 (dw columns), 64 x 32 each
  static constexpr int kWords = 2;      // 64-bit column masks per tile (the code below assumes 2)
  static constexpr int kBM = kWords * 64, kBN = 128, kBR = kTnRows;
  static constexpr int kStages = kTensorCores ? 4 : 2;
  static constexpr int kVec = 16 / int(sizeof(T));
  static constexpr int kXStride = kBM + kVec;
  static constexpr int kDStride = kBN + kVec;
  static constexpr int kStageElems = kBR * kXStride + kBR * kDStride;
  static constexpr int kListCap = 512;  // row groups considered per pass
  static constexpr int kSmemBytes = kStages * kStageElems * int(sizeof(T)) + kListCap * (kWords * 8 + 4);
};

template <typename T>
struct TnTensorCoreMath {  // warps 2 x 4, each 64 rows (columns of x) x 32 columns of dw
  using C = TnConfig<T>;
  float acc[4][4][4] = {};

  // masks[i]: listed columns [64i, 64i + 64) of this tile in the stage's row group.
  __device__ __forceinline__ void step(const T* xs, const T* ds, const uint64_t (&masks)[C::kWords], int warp,
                                       int lane) {
    const int wm = warp / 4, wn = warp % 4, gq = lane / 4;
    const uint64_t mask = wm == 0 ? masks[0] : masks[1];  // a warp's 64 rows are one mask word (kWords == 2)
#pragma unroll
    for (int ks = 0; ks < C::kBR / 16; ++ks) {
      uint32_t a[4][4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        ldmatrix_x4_trans(a[mi], xs + (ks * 16 + lane % 8 + (lane / 16) * 8) * C::kXStride + wm * 64 + mi * 16 +
                                     ((lane / 8) % 2) * 8);
        const int m = mi * 16 + gq;  // this lane's fragment rows are m and m + 8
        if (!((mask >> m) & 1)) a[mi][0] = a[mi][2] = 0;  // unlisted columns of x: never used
        if (!((mask >> (m + 8)) & 1)) a[mi][1] = a[mi][3] = 0;
      }
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        uint32_t bq[4];
        ldmatrix_x4_trans(bq, ds + (ks * 16 + lane % 8 + ((lane / 8) % 2) * 8) * C::kDStride + wn * 32 + nj * 16 +
                                  (lane / 16) * 8);
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
          mma_16816<T>(acc[mi][2 * nj], a[mi], bq[0], bq[1]);
          mma_16816<T>(acc[mi][2 * nj + 1], a[mi], bq[2], bq[3]);
        }
      }
    }
  }

  __device__ __forceinline__ void store(T* out, int64_t ld, int64_t rows, int64_t cols, int warp, int lane) const {
    const int wm = warp / 4, wn = warp % 4, gq = lane / 4, tq = lane % 4;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = wm * 64 + mi * 16 + gq + half * 8, c = wn * 32 + ni * 8 + 2 * tq;
          if (r >= rows) continue;
          if (c < cols) out[r * ld + c] = from_float<T>(acc[mi][ni][2 * half]);
          if (c + 1 < cols) out[r * ld + c + 1] = from_float<T>(acc[mi][ni][2 * half + 1]);
        }
  }
};

template <typename T>
struct TnCudaCoreMath {  // fp32: each of 256 threads 8 rows x 8 columns of dw
  using C = TnConfig<T>;
  float acc[8][8] = {};

  __device__ __forceinline__ void step(const T* xs, const T* ds, const uint64_t (&masks)[C::kWords], int, int) {
    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
    const unsigned bits = unsigned((tr < 8 ? masks[0] : masks[1]) >> ((tr % 8) * 8)) & 0xffu;
#pragma unroll 4
    for (int r = 0; r < C::kBR; ++r) {
      float a[8], b[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = ((bits >> i) & 1u) ? float(xs[r * C::kXStride + tr * 8 + i]) : 0.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = float(ds[r * C::kDStride + tc * 8 + j]);
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(T* out, int64_t ld, int64_t rows, int64_t cols, int, int) const {
    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (tr * 8 + i < rows && tc * 8 + j < cols) out[(tr * 8 + i) * ld + tc * 8 + j] = from_float<T>(acc[i][j]);
  }
};

template <typename T>
using TnMath = std::conditional_t<TnConfig<T>::kTensorCores, TnTensorCoreMath<T>, TnCudaCoreMath<T>>;

}  // namespace pit
