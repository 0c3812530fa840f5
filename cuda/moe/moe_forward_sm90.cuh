// MoE grouped-GEMM forward on Hopper tensor cores (wgmma): SRead of token rows, SWrite of
// output rows, for bf16 / fp16 with d and f multiples of 8 (16-byte rows).
//
//   out[a] = x[a / r] @ w[e(a)]      (w [E, d, f]: B is MN-major in shared memory)
//   out[a] = x[a / r] @ w[e(a)]ᵀ     (w [E, f, d], the dx pass: B is K-major, no transposed copy)
//
// One CTA of two warpgroups per (routing tile of 128 rows, 256 output columns). Every thread
// gathers rows of x by `order` and tiles of w[e] with cp.async into a 4-stage ring of 128-byte
// swizzled tiles; each warpgroup multiplies its 64 rows by the 256 columns with
// wgmma.m64n256k16 (fp32 accumulators in registers). The epilogue stages the tile in shared
// memory and writes each output row with 16-byte stores to its assignment position.
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

template <typename T, bool kWTransposed>
__global__ void __launch_bounds__(MoeSm90Config::kThreads, 1)
    pit_moe_forward_sm90_kernel(const T* __restrict__ x, const T* __restrict__ w, const int32_t* __restrict__ order,
                                const int32_t* __restrict__ group_starts, const int32_t* __restrict__ tile_starts,
                                T* __restrict__ out, MoeShape s) {
#if PIT_HAS_WGMMA
  using C = MoeSm90Config;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
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
  const int n_chunks = int(ceil_div(s.d, C::kBK));
#pragma unroll
  for (int st = 0; st < C::kStages - 1; ++st) {
    if (st < n_chunks) load_stage(st, st);
    cp_async_commit();
  }
  // Descriptors of stage 0; a stage or K step moves only the start address (16-byte units).
  const uint64_t desc_a0 = smem_descriptor_sw128(smem + warpgroup * 64 * C::kRowBytes, 16, 1024);
  const uint64_t desc_b0 = kWTransposed ? smem_descriptor_sw128(smem + C::kABytes, 16, 1024)
                                        : smem_descriptor_sw128(smem + C::kABytes, C::kBAtomBytes, 1024);
  constexpr int kBStepBytes = kWTransposed ? 32 : 16 * C::kRowBytes;  // one K step of 16
  for (int i = 0; i < n_chunks; ++i) {
    cp_async_wait<C::kStages - 2>();
    fence_proxy_async_shared();  // this thread's cp.async writes, visible to the tensor cores
    __syncthreads();
    const uint64_t stage_offset = uint64_t((i % C::kStages) * C::kStageBytes) >> 4;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < C::kBK / 16; ++kk)
      wgmma_m64n256k16<kWTransposed ? 0 : 1>(acc, desc_a0 + stage_offset + ((kk * 32) >> 4),
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
  __syncthreads();  // the ring is free: stage the output tile in it

  T* cs = reinterpret_cast<T*>(smem);
  const int lane = tid % 32, row = warpgroup * 64 + ((tid % 128) / 32) * 16 + lane / 4;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const int c = 8 * j + 2 * (lane % 4);
    cs[row * C::kCStride + c] = from_float<T>(acc[4 * j]);
    cs[row * C::kCStride + c + 1] = from_float<T>(acc[4 * j + 1]);
    cs[(row + 8) * C::kCStride + c] = from_float<T>(acc[4 * j + 2]);
    cs[(row + 8) * C::kCStride + c + 1] = from_float<T>(acc[4 * j + 3]);
  }
  __syncthreads();
  for (int i = tid; i < tile.rows * (C::kBN / 8); i += C::kThreads) {  // SWrite: 16 bytes per store
    const int r = i / (C::kBN / 8), c = (i % (C::kBN / 8)) * 8;
    if (c < cols)
      *reinterpret_cast<uint4*>(out + int64_t(dst_rows[r]) * s.f + n0 + c) =
          *reinterpret_cast<const uint4*>(cs + r * C::kCStride + c);
  }
#endif  // PIT_HAS_WGMMA
}

// Whether the Hopper kernel serves this call: a 16-bit dtype, 16-byte rows and a compute
// capability 9.0 device (the sm_90a cubin). PIT_DISABLE_WGMMA=1 forces the sm_80 kernel
// (for comparisons).
template <typename T>
inline bool moe_forward_sm90_applies(const MoeShape& s, const void* x, const void* w, const void* out) {
  if (sizeof(T) != 2 || s.d % 8 || s.f % 8) return false;
  if ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(w) | reinterpret_cast<uintptr_t>(out)) % 16)
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

}  // namespace pit
