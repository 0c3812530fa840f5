// MoE grouped GEMMs on Hopper tensor cores (wgmma), for bf16 / fp16 with d and f multiples of 8
// (16-byte rows):
//
//   forward  out[a] = x[a / r] @ w[e(a)]      (w [E, d, f]: B is MN-major in shared memory)
//            out[a] = x[a / r] @ w[e(a)]ᵀ     (w [E, f, d], the dx pass: B is K-major, no copy)
//   dW       dw[e]  = Σ_{a in group e} x[a / r]ᵀ dy[a]   (A and B both MN-major gathered rows)
//
// Both kernels are one CTA of two warpgroups per 128 x 256 output tile. Every thread copies
// its share of each stage with cp.async into a 4-stage ring of 128-byte swizzled tiles; each
// warpgroup multiplies its 64 rows by the 256 columns with wgmma.m64n256k16 (fp32 accumulators
// in registers). The forward gathers its A rows (SRead) by `order` and scatters output rows
// (SWrite) to their assignment positions; the dW kernel gathers the K dimension — the expert's
// rows of x and dy — by `order` and writes a dense tile of dw[e].
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>

#include "../common/mma_sm80.cuh"
#include "../common/tile_copy.cuh"
#include "../common/wgmma_sm90.cuh"
#include "moe_tiles.cuh"

namespace pit {

struct MoeSm90Config {
  static constexpr int kBM = kMoeRouteTileRows, kBN = 256, kBK = 64, kStages = 4, kThreads = 256;
  static constexpr int kRowBytes = kBK * 2;                   // one 128-byte swizzle row
  static constexpr int kABytes = kBM * kRowBytes, kBBytes = kBN * kRowBytes;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kBAtomBytes = kBK * 128;               // MN-major B: 64 columns x 64 K rows
  static constexpr int kCStride = kBN + 8;                    // epilogue row, padded: no bank conflicts
  static constexpr int kSmemBytes = kStages * kStageBytes + 1024 + kBM * 4;  // + alignment + row ids
  static_assert(kBM * kCStride * 2 <= kStages * kStageBytes, "epilogue staging must fit the ring");
};

#if PIT_HAS_WGMMA
// The 1024-byte-aligned start of the dynamic shared memory (swizzle atoms must be aligned).
__device__ __forceinline__ unsigned char* aligned_smem(unsigned char* raw) {
  return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t(1023));
}

// acc (+)= the tile's product over n_chunks stages of kBK. load_stage(chunk, stage) issues this
// thread's cp.async copies of one chunk; desc_a0 / desc_b0 describe this warpgroup's operands in
// stage 0, and a stage or a K step of 16 moves only their start addresses.
template <int kTransposeA, int kTransposeB, int kAStepBytes, int kBStepBytes, typename T, typename LoadStage>
__device__ __forceinline__ void wgmma_pipelined_mainloop(float (&acc)[128], int n_chunks, uint64_t desc_a0,
                                                         uint64_t desc_b0, LoadStage&& load_stage) {
  using C = MoeSm90Config;
#pragma unroll
  for (int st = 0; st < C::kStages - 1; ++st) {
    if (st < n_chunks) load_stage(st, st);
    cp_async_commit();
  }
  for (int i = 0; i < n_chunks; ++i) {
    cp_async_wait<C::kStages - 2>();
    fence_proxy_async_shared();  // this thread's cp.async writes, visible to the tensor cores
    __syncthreads();
    const uint64_t stage_offset = uint64_t((i % C::kStages) * C::kStageBytes) >> 4;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < C::kBK / 16; ++kk)
      wgmma_m64n256k16<kTransposeA, kTransposeB>(acc, desc_a0 + stage_offset + ((kk * kAStepBytes) >> 4),
                                                 desc_b0 + stage_offset + ((kk * kBStepBytes) >> 4), 1, T{});
    wgmma_commit();
    // Refill the stage step i - 1 read while step i runs: every warpgroup finished step i - 1
    // (waited below) before the barrier above. Waiting for step i before the next step keeps no
    // wgmma in flight across the loop's back edge, which ptxas would serialise (C7514).
    const int next = i + C::kStages - 1;
    if (next < n_chunks) load_stage(next, next % C::kStages);
    cp_async_commit();
    wgmma_wait<0>();
  }
  wgmma_wait<0>();
  pin_registers(acc);
  cp_async_wait<0>();
  __syncthreads();  // the ring is free for the epilogue
}

// Writes the accumulators as T into the row-major staging tile cs [kBM][kCStride] (the ring).
template <typename T>
__device__ __forceinline__ void stage_accumulators(const float (&acc)[128], T* cs, int tid) {
  using C = MoeSm90Config;
  const int lane = tid % 32, row = (tid / 128) * 64 + ((tid % 128) / 32) * 16 + lane / 4;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const int c = 8 * j + 2 * (lane % 4);
    cs[row * C::kCStride + c] = from_float<T>(acc[4 * j]);
    cs[row * C::kCStride + c + 1] = from_float<T>(acc[4 * j + 1]);
    cs[(row + 8) * C::kCStride + c] = from_float<T>(acc[4 * j + 2]);
    cs[(row + 8) * C::kCStride + c + 1] = from_float<T>(acc[4 * j + 3]);
  }
  __syncthreads();
}
#endif  // PIT_HAS_WGMMA

template <typename T, bool kWTransposed>
__global__ void __launch_bounds__(MoeSm90Config::kThreads, 1)
    pit_moe_forward_sm90_kernel(const T* __restrict__ x, const T* __restrict__ w, const int32_t* __restrict__ order,
                                const int32_t* __restrict__ group_starts, const int32_t* __restrict__ tile_starts,
                                T* __restrict__ out, MoeShape s) {
#if PIT_HAS_WGMMA
  using C = MoeSm90Config;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = aligned_smem(smem_raw);
  int32_t* dst_rows = reinterpret_cast<int32_t*>(smem + C::kStages * C::kStageBytes);
  const int tid = threadIdx.x, warpgroup = tid / 128;
  MoeRouteTile tile;  // row tiles vary fastest: CTAs in flight share w[e]'s column tile in L2
  if (!find_route_tile(tile_starts, group_starts, s.experts, blockIdx.x % s.max_row_tiles, &tile)) return;
  const int64_t n0 = (blockIdx.x / s.max_row_tiles) * C::kBN;
  const int64_t cols = s.f - n0 < C::kBN ? s.f - n0 : C::kBN;
  for (int r = tid; r < C::kBM; r += C::kThreads) dst_rows[r] = r < tile.rows ? order[tile.first + r] : 0;
  __syncthreads();

  if (tile.group == s.experts) {  // assignments with an invalid expert id: zero rows
    const uint4 zero = make_uint4(0, 0, 0, 0);
    for (int i = tid; i < tile.rows * (C::kBN / 8); i += C::kThreads) {
      const int r = i / (C::kBN / 8), c = (i % (C::kBN / 8)) * 8;
      if (c < cols) *reinterpret_cast<uint4*>(out + int64_t(dst_rows[r]) * s.f + n0 + c) = zero;
    }
    return;
  }

  const T* w_e = w + int64_t(tile.group) * s.d * s.f;
  // Each thread copies the same chunk column of rows tid/8 + 32j (A) and of every 8th row (B)
  // in every stage, so its swizzled positions are fixed and few registers stay live next to the
  // 128 accumulators (more would make ptxas serialise the wgmmas).
  const int a_row0 = tid / 8, a_chunk = tid % 8;
  const int a_dst0 = a_row0 * C::kRowBytes + swizzle128(a_row0, a_chunk) * 16;
  auto load_stage = [&](int chunk, int stage) {
    unsigned char* a_s = smem + stage * C::kStageBytes;
    unsigned char* b_s = a_s + C::kABytes;
    const int64_t k0 = int64_t(chunk) * C::kBK;
    const int64_t ka = k0 + a_chunk * 8;
#pragma unroll
    for (int j = 0; j < C::kBM / 32; ++j) {  // SRead: 128 token rows x 8 chunks
      const int r = a_row0 + 32 * j;
      const bool ok = r < tile.rows && ka < s.d;
      const T* src = ok ? x + (int64_t(dst_rows[r]) / s.rows_per_source) * s.d + ka : x;
      cp_async_16(a_s + a_dst0 + j * 32 * C::kRowBytes, src, ok ? 16 : 0);  // (r + 32j) % 8 = r % 8
    }
    if constexpr (kWTransposed) {  // w[e] is [f, d]: 256 rows of n, 8 chunks of k (K-major)
      const int64_t k = ka;
#pragma unroll
      for (int j = 0; j < C::kBN / 32; ++j) {
        const int r = a_row0 + 32 * j;
        const int64_t n = n0 + r;
        const bool ok = n < s.f && k < s.d;
        cp_async_16(b_s + a_dst0 + j * 32 * C::kRowBytes, ok ? w_e + n * s.d + k : w, ok ? 16 : 0);
      }
    } else {  // w[e] is [d, f]: 64 rows of k, 4 atoms of 64 columns (MN-major)
      const int b_row0 = tid / 32, b_col = tid % 32;  // column chunk b_col of rows b_row0 + 8j
      const int64_t n = n0 + b_col * 8;
      const T* src = w_e + (k0 + b_row0) * s.f + n;
      unsigned char* dst = b_s + (b_col / 8) * C::kBAtomBytes + b_row0 * C::kRowBytes + swizzle128(b_row0, b_col % 8) * 16;
#pragma unroll
      for (int j = 0; j < C::kBK / 8; ++j) {
        const bool ok = k0 + b_row0 + 8 * j < s.d && n < s.f;
        cp_async_16(dst + j * 8 * C::kRowBytes, ok ? src + int64_t(8 * j) * s.f : w, ok ? 16 : 0);
      }
    }
  };

  float acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
  const uint64_t desc_a0 = smem_descriptor_sw128(smem + warpgroup * 64 * C::kRowBytes, 16, 1024);
  const uint64_t desc_b0 = kWTransposed ? smem_descriptor_sw128(smem + C::kABytes, 16, 1024)
                                        : smem_descriptor_sw128(smem + C::kABytes, C::kBAtomBytes, 1024);
  wgmma_pipelined_mainloop<0, kWTransposed ? 0 : 1, 32, kWTransposed ? 32 : 16 * C::kRowBytes, T>(
      acc, int(ceil_div(s.d, C::kBK)), desc_a0, desc_b0, load_stage);

  T* cs = reinterpret_cast<T*>(smem);
  stage_accumulators(acc, cs, tid);
  for (int i = tid; i < tile.rows * (C::kBN / 8); i += C::kThreads) {  // SWrite: 16 bytes per store
    const int r = i / (C::kBN / 8), c = (i % (C::kBN / 8)) * 8;
    if (c < cols)
      *reinterpret_cast<uint4*>(out + int64_t(dst_rows[r]) * s.f + n0 + c) =
          *reinterpret_cast<const uint4*>(cs + r * C::kCStride + c);
  }
#endif  // PIT_HAS_WGMMA
}

// dw[e] tile (m0.., n0..) = Σ over the expert's rows p of x[order[p] / r][m0..]ᵀ dy[order[p]][n0..].
// The K dimension is the expert's row list: a stage holds 64 gathered rows of x (A, MN-major:
// 128 d columns as two 64-column atoms, one per warpgroup) and of dy (B, MN-major, 4 atoms).
// Rows past the group's end are zero-filled; an empty expert writes a zero tile.
template <typename T>
__global__ void __launch_bounds__(MoeSm90Config::kThreads, 1)
    pit_moe_tn_sm90_kernel(const T* __restrict__ x, const T* __restrict__ dy, const int32_t* __restrict__ order,
                           const int32_t* __restrict__ group_starts, T* __restrict__ dw, MoeShape s, int64_t d_tiles,
                           int64_t f_tiles) {
#if PIT_HAS_WGMMA
  using C = MoeSm90Config;
  constexpr int kAAtomBytes = C::kBK * C::kRowBytes;  // 64 d columns x 64 rows
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = aligned_smem(smem_raw);
  const int tid = threadIdx.x, warpgroup = tid / 128;
  // f tiles vary fastest: CTAs in flight share the expert's x columns in L2
  const int64_t f_tile = blockIdx.x % f_tiles, d_tile = (blockIdx.x / f_tiles) % d_tiles;
  const int64_t expert = blockIdx.x / (f_tiles * d_tiles);
  const int64_t m0 = d_tile * C::kBM, n0 = f_tile * C::kBN;
  const int64_t first = group_starts[expert], end = group_starts[expert + 1];

  // Fixed per-thread positions (see the forward): chunk column a_col of rows a_row0 + 16j of x,
  // chunk column b_col of rows b_row0 + 8j of dy.
  const int a_row0 = tid / 16, a_col = tid % 16, b_row0 = tid / 32, b_col = tid % 32;
  const int a_dst0 = (a_col / 8) * kAAtomBytes + a_row0 * C::kRowBytes + swizzle128(a_row0, a_col % 8) * 16;
  const int b_dst0 = (b_col / 8) * C::kBAtomBytes + b_row0 * C::kRowBytes + swizzle128(b_row0, b_col % 8) * 16;
  const int64_t m = m0 + a_col * 8, n = n0 + b_col * 8;
  auto load_stage = [&](int chunk, int stage) {
    unsigned char* a_s = smem + stage * C::kStageBytes;
    unsigned char* b_s = a_s + C::kABytes;
    const int64_t p0 = first + int64_t(chunk) * C::kBK;
#pragma unroll
    for (int j = 0; j < C::kBK / 16; ++j) {  // SRead of x: 64 rows x 16 chunks
      const int64_t p = p0 + a_row0 + 16 * j;
      const bool ok = p < end && m < s.d;
      const T* src = ok ? x + (int64_t(order[p]) / s.rows_per_source) * s.d + m : x;
      cp_async_16(a_s + a_dst0 + j * 16 * C::kRowBytes, src, ok ? 16 : 0);
    }
#pragma unroll
    for (int j = 0; j < C::kBK / 8; ++j) {  // SRead of dy: 64 rows x 32 chunks
      const int64_t p = p0 + b_row0 + 8 * j;
      const bool ok = p < end && n < s.f;
      const T* src = ok ? dy + int64_t(order[p]) * s.f + n : dy;
      cp_async_16(b_s + b_dst0 + j * 8 * C::kRowBytes, src, ok ? 16 : 0);
    }
  };

  float acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
  const uint64_t desc_a0 = smem_descriptor_sw128(smem + warpgroup * kAAtomBytes, kAAtomBytes, 1024);
  const uint64_t desc_b0 = smem_descriptor_sw128(smem + C::kABytes, C::kBAtomBytes, 1024);
  wgmma_pipelined_mainloop<1, 1, 16 * C::kRowBytes, 16 * C::kRowBytes, T>(
      acc, int(ceil_div(end - first, int64_t(C::kBK))), desc_a0, desc_b0, load_stage);

  T* cs = reinterpret_cast<T*>(smem);
  stage_accumulators(acc, cs, tid);
  const int64_t rows = s.d - m0 < C::kBM ? s.d - m0 : C::kBM, cols = s.f - n0 < C::kBN ? s.f - n0 : C::kBN;
  T* dw_tile = dw + (expert * s.d + m0) * s.f + n0;
  for (int i = tid; i < rows * (C::kBN / 8); i += C::kThreads) {  // 16 bytes per store
    const int r = i / (C::kBN / 8), c = (i % (C::kBN / 8)) * 8;
    if (c < cols)
      *reinterpret_cast<uint4*>(dw_tile + int64_t(r) * s.f + c) = *reinterpret_cast<const uint4*>(cs + r * C::kCStride + c);
  }
#endif  // PIT_HAS_WGMMA
}

// Whether the Hopper kernels serve this call: a 16-bit dtype, 16-byte rows (d and f multiples
// of 8, 16-byte aligned operands a, b, c) and a compute capability 9.0 device (the sm_90a
// cubin). PIT_DISABLE_WGMMA=1 forces the sm_80 kernels (for comparisons).
template <typename T>
inline bool moe_sm90_applies(const MoeShape& s, const void* a, const void* b, const void* c) {
  if (sizeof(T) != 2 || s.d % 8 || s.f % 8) return false;
  if ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) | reinterpret_cast<uintptr_t>(c)) % 16)
    return false;
  const char* off = std::getenv("PIT_DISABLE_WGMMA");
  if (off != nullptr && off[0] == '1') return false;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess)
    return false;
  return major == 9;
}

template <typename T>
cudaError_t launch_moe_forward_sm90(cudaStream_t stream, const MoeShape& s, const void* x, const void* w,
                                    const int32_t* order, const int32_t* group_starts, const int32_t* tile_starts,
                                    void* out) {
  using C = MoeSm90Config;
  auto kernel = s.w_transposed ? pit_moe_forward_sm90_kernel<T, true> : pit_moe_forward_sm90_kernel<T, false>;
  cudaError_t err = allow_dynamic_smem(kernel, C::kSmemBytes);
  if (err != cudaSuccess) return err;
  const unsigned grid = unsigned(s.max_row_tiles * ceil_div(s.f, C::kBN));
  kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(static_cast<const T*>(x), static_cast<const T*>(w), order,
                                                       group_starts, tile_starts, static_cast<T*>(out), s);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_moe_tn_sm90(cudaStream_t stream, const MoeShape& s, const void* x, const void* dy,
                               const int32_t* order, const int32_t* group_starts, void* dw) {
  using C = MoeSm90Config;
  cudaError_t err = allow_dynamic_smem(pit_moe_tn_sm90_kernel<T>, C::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int64_t d_tiles = ceil_div(s.d, C::kBM), f_tiles = ceil_div(s.f, C::kBN);
  pit_moe_tn_sm90_kernel<T><<<unsigned(s.experts * d_tiles * f_tiles), C::kThreads, C::kSmemBytes, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(dy), order, group_starts, static_cast<T*>(dw), s, d_tiles,
      f_tiles);
  return cudaGetLastError();
}

}  // namespace pit
