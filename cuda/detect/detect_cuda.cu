// Micro-tile detection, CUDA kernels and FFI handler.
//
// Two passes, no host synchronisation:
//  1. column mask: read x once (16-byte loads, coalesced), and for every group of `sub_rows`
//     rows record which columns hold a nonzero, as a bitmask of 32-column words.
//     This is the only pass over x; the mask is 1/(16*sub_rows) of x's bytes for bf16.
//  2. compact: one CTA per outer block ORs the mask bits under each micro-tile and writes the
//     ascending ids of nonzero tiles with a CUB block scan (no atomics, so the order is fixed),
//     then -1 padding, then the count.
//  3. offsets: one CTA per batch element scans the counts into CSR offsets.
#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>

#include "../common/ffi_common.h"
#include "detect_layout.h"

namespace pit {
namespace {

constexpr int kMaskWarps = 8;          // warps per CTA in the mask pass
constexpr int kCompactThreads = 256;   // threads per CTA in the compact pass
constexpr int kCompactItems = 4;       // tiles per thread per scan step
constexpr int kOffsetThreads = 256;

// Rows folded together in the mask pass: the largest divisor of tile_m that is <= 16, so a
// row block is a whole number of mask rows. Python computes the same (detect workspace size).
inline int64_t mask_sub_rows(int64_t tile_m) {
  for (int64_t g = 16; g > 1; --g)
    if (tile_m % g == 0) return g;
  return 1;
}

// Bit e set when element e of the 16-byte vector is nonzero (any magnitude bit set).
template <typename Bits>
__device__ __forceinline__ uint32_t nonzero_bits(uint4 v);

template <>
__device__ __forceinline__ uint32_t nonzero_bits<uint16_t>(uint4 v) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  uint32_t bits = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    bits |= uint32_t((w[i] & 0x7fffu) != 0) << (2 * i);
    bits |= uint32_t((w[i] & 0x7fff0000u) != 0) << (2 * i + 1);
  }
  return bits;
}

template <>
__device__ __forceinline__ uint32_t nonzero_bits<uint32_t>(uint4 v) {
  return uint32_t((v.x & 0x7fffffffu) != 0) | (uint32_t((v.y & 0x7fffffffu) != 0) << 1) |
         (uint32_t((v.z & 0x7fffffffu) != 0) << 2) | (uint32_t((v.w & 0x7fffffffu) != 0) << 3);
}

template <typename Bits>
__device__ __forceinline__ uint4 load_streaming(const Bits* p) {
  return __ldcs(reinterpret_cast<const uint4*>(p));
}

// One warp per task (batch, mask row, 32*V-column chunk); each lane owns V columns.
template <typename Bits>
__global__ void __launch_bounds__(kMaskWarps * 32)
    pit_detect_mask_kernel(const Bits* __restrict__ x, uint32_t* __restrict__ colmask, int64_t batch,
                           int64_t rows, int64_t cols, int64_t sub_rows, int64_t n_sub,
                           int64_t n_words, int64_t n_chunks, bool vectorized) {
  constexpr int V = 16 / sizeof(Bits);
  constexpr int kLanesPerWord = 32 / V;
  constexpr Bits kMag = static_cast<Bits>(~(Bits(1) << (sizeof(Bits) * 8 - 1)));
  const int lane = threadIdx.x & 31;
  const int64_t task = int64_t(blockIdx.x) * kMaskWarps + (threadIdx.x >> 5);
  if (task >= batch * n_sub * n_chunks) return;  // uniform per warp: shuffles below stay full
  const int64_t chunk = task % n_chunks;
  const int64_t mask_row = task / n_chunks;  // b * n_sub + s
  const int64_t b = mask_row / n_sub, s = mask_row % n_sub;
  const int64_t c0 = chunk * 32 * V + int64_t(lane) * V;
  const int64_t r0 = s * sub_rows;
  const int64_t r1 = min(rows, r0 + sub_rows);
  const Bits* base = x + b * rows * cols;

  uint32_t bits = 0;
  if (c0 < cols) {
    if (vectorized) {  // cols % V == 0 and x is 16-byte aligned, so the vector is in bounds
      const Bits* p = base + r0 * cols + c0;
      int64_t r = r0;
      for (; r + 4 <= r1; r += 4, p += 4 * cols) {
        uint4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) v[u] = load_streaming(p + u * cols);
#pragma unroll
        for (int u = 0; u < 4; ++u) bits |= nonzero_bits<Bits>(v[u]);
      }
      for (; r < r1; ++r, p += cols) bits |= nonzero_bits<Bits>(load_streaming(p));
    } else {
      const int64_t n = min(int64_t(V), cols - c0);
      for (int64_t r = r0; r < r1; ++r) {
        const Bits* p = base + r * cols + c0;
        for (int e = 0; e < n; ++e) bits |= uint32_t((p[e] & kMag) != 0) << e;
      }
    }
  }
  // Gather the V-bit pieces of kLanesPerWord neighbouring lanes into one 32-column word.
  uint32_t word = bits << ((lane * V) & 31);
#pragma unroll
  for (int off = 1; off < kLanesPerWord; off <<= 1) word |= __shfl_xor_sync(0xffffffffu, word, off);
  const int64_t w = (chunk * 32 * V + int64_t(lane) * V) >> 5;
  if (lane % kLanesPerWord == 0 && w < n_words) colmask[mask_row * n_words + w] = word;
}

// Whether micro-tile (row block i, column block j) has a nonzero, from the column mask.
__device__ __forceinline__ int tile_nonzero(const uint32_t* __restrict__ cm, int64_t i, int64_t j,
                                            int64_t cols, int64_t tile_m, int64_t tile_k,
                                            int64_t sub_rows, int64_t n_sub, int64_t n_words) {
  const int64_t per_block = tile_m / sub_rows;
  const int64_t s0 = i * per_block, s1 = min(n_sub, s0 + per_block);
  const int64_t lo = j * tile_k, hi = min(cols, lo + tile_k);  // columns [lo, hi)
  const int64_t w0 = lo >> 5, w1 = (hi - 1) >> 5;
  const uint32_t first = ~0u << (lo & 31);
  const int last_bits = int((hi - 1) & 31) + 1;
  const uint32_t last = last_bits == 32 ? ~0u : ((1u << last_bits) - 1u);
  for (int64_t s = s0; s < s1; ++s) {
    const uint32_t* row = cm + s * n_words;
    for (int64_t w = w0; w <= w1; ++w) {
      uint32_t m = ~0u;
      if (w == w0) m &= first;
      if (w == w1) m &= last;
      if (row[w] & m) return 1;
    }
  }
  return 0;
}

template <bool kRowMajor>
__global__ void __launch_bounds__(kCompactThreads)
    pit_detect_compact_kernel(const uint32_t* __restrict__ colmask, int32_t* __restrict__ counts,
                              int32_t* __restrict__ indices, int64_t n_outer, int64_t n_inner,
                              int64_t cols, int64_t tile_m, int64_t tile_k, int64_t sub_rows,
                              int64_t n_sub, int64_t n_words) {
  using Scan = cub::BlockScan<int, kCompactThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int64_t outer_flat = blockIdx.x;  // b * n_outer + o
  const int64_t b = outer_flat / n_outer, o = outer_flat % n_outer;
  const uint32_t* cm = colmask + b * n_sub * n_words;
  int32_t* out = indices + outer_flat * n_inner;
  int running = 0;
  for (int64_t start = 0; start < n_inner; start += kCompactThreads * kCompactItems) {
    int flags[kCompactItems], pos[kCompactItems];
#pragma unroll
    for (int k = 0; k < kCompactItems; ++k) {
      const int64_t inner = start + int64_t(threadIdx.x) * kCompactItems + k;  // blocked: keeps order
      flags[k] = inner < n_inner
                     ? tile_nonzero(cm, kRowMajor ? o : inner, kRowMajor ? inner : o, cols, tile_m,
                                    tile_k, sub_rows, n_sub, n_words)
                     : 0;
    }
    int step_total;
    Scan(scan_storage).ExclusiveSum(flags, pos, step_total);
#pragma unroll
    for (int k = 0; k < kCompactItems; ++k)
      if (flags[k]) out[running + pos[k]] = int32_t(start + int64_t(threadIdx.x) * kCompactItems + k);
    running += step_total;
    __syncthreads();  // scan_storage is reused by the next step
  }
  for (int64_t p = running + threadIdx.x; p < n_inner; p += kCompactThreads) out[p] = -1;
  if (threadIdx.x == 0) counts[outer_flat] = running;
}

__global__ void __launch_bounds__(kOffsetThreads)
    pit_detect_offsets_kernel(const int32_t* __restrict__ counts, int32_t* __restrict__ offsets,
                              int64_t n_outer) {
  using Scan = cub::BlockScan<int, kOffsetThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int64_t b = blockIdx.x;
  const int32_t* cnt = counts + b * n_outer;
  int32_t* off = offsets + b * (n_outer + 1);
  int running = 0;
  for (int64_t start = 0; start < n_outer; start += kOffsetThreads) {
    const int64_t i = start + threadIdx.x;
    int v = i < n_outer ? cnt[i] : 0, p, step_total;
    Scan(scan_storage).ExclusiveSum(v, p, step_total);
    if (i < n_outer) off[i] = running + p;
    running += step_total;
    __syncthreads();
  }
  if (threadIdx.x == 0) off[n_outer] = running;
}

template <typename Bits>
cudaError_t launch_detect(cudaStream_t stream, const void* x, const DetectShape& s, int64_t layout,
                          uint32_t* colmask, int32_t* counts, int32_t* offsets, int32_t* indices) {
  constexpr int V = 16 / sizeof(Bits);
  const int64_t sub_rows = mask_sub_rows(s.tile_m);
  const int64_t n_sub = ceil_div(s.rows, sub_rows), n_words = ceil_div(s.cols, 32);
  const int64_t n_outer = s.n_outer(layout), n_inner = s.n_inner(layout);
  if (s.batch == 0) return cudaSuccess;
  if (s.rows > 0 && s.cols > 0) {
    const int64_t n_chunks = ceil_div(s.cols, 32 * V);
    const int64_t n_tasks = s.batch * n_sub * n_chunks;
    const bool vectorized = s.cols % V == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
    pit_detect_mask_kernel<Bits><<<unsigned(ceil_div(n_tasks, kMaskWarps)), kMaskWarps * 32, 0, stream>>>(
        static_cast<const Bits*>(x), colmask, s.batch, s.rows, s.cols, sub_rows, n_sub, n_words,
        n_chunks, vectorized);
  }
  if (n_outer > 0) {
    const unsigned grid = unsigned(s.batch * n_outer);
    if (n_inner > 0) {
      if (layout == kRowMajor)
        pit_detect_compact_kernel<true><<<grid, kCompactThreads, 0, stream>>>(
            colmask, counts, indices, n_outer, n_inner, s.cols, s.tile_m, s.tile_k, sub_rows, n_sub, n_words);
      else
        pit_detect_compact_kernel<false><<<grid, kCompactThreads, 0, stream>>>(
            colmask, counts, indices, n_outer, n_inner, s.cols, s.tile_m, s.tile_k, sub_rows, n_sub, n_words);
    } else {
      cudaMemsetAsync(counts, 0, sizeof(int32_t) * s.batch * n_outer, stream);
    }
  }
  pit_detect_offsets_kernel<<<unsigned(s.batch), kOffsetThreads, 0, stream>>>(counts, offsets, n_outer);
  return cudaGetLastError();
}

ffi::Error DetectCuda(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::Buffer<ffi::S32>> counts,
                      ffi::Result<ffi::Buffer<ffi::S32>> offsets,
                      ffi::Result<ffi::Buffer<ffi::S32>> indices,
                      ffi::Result<ffi::Buffer<ffi::U32>> workspace, int64_t tile_m, int64_t tile_k,
                      int64_t layout) {
  MatrixView v;
  if (!matrix_view(x.dimensions(), &v)) return ffi::Error::InvalidArgument("pit_detect: x must have rank >= 2");
  if (tile_m <= 0 || tile_k <= 0) return ffi::Error::InvalidArgument("pit_detect: tile must be positive");
  if (layout != kRowMajor && layout != kColMajor) return ffi::Error::InvalidArgument("pit_detect: bad layout");
  DetectShape s{v.batch, v.rows, v.cols, tile_m, tile_k};
  const int64_t n_outer = s.n_outer(layout), n_inner = s.n_inner(layout);
  const int64_t ws_words = s.batch * ceil_div(s.rows, mask_sub_rows(tile_m)) * ceil_div(s.cols, 32);
  if (element_count(counts->dimensions()) != s.batch * n_outer ||
      element_count(offsets->dimensions()) != s.batch * (n_outer + 1) ||
      element_count(indices->dimensions()) != s.batch * n_outer * n_inner ||
      element_count(workspace->dimensions()) < ws_words)
    return ffi::Error::InvalidArgument("pit_detect: output or workspace sizes do not match x and tile");
  if (debug_poison_outputs()) {  // tests: prove every output element is written by the kernels
    cudaMemsetAsync(counts->untyped_data(), kPoisonByte, counts->size_bytes(), stream);
    cudaMemsetAsync(offsets->untyped_data(), kPoisonByte, offsets->size_bytes(), stream);
    cudaMemsetAsync(indices->untyped_data(), kPoisonByte, indices->size_bytes(), stream);
    cudaMemsetAsync(workspace->untyped_data(), kPoisonByte, workspace->size_bytes(), stream);
  }
  cudaError_t err;
  switch (x.element_type()) {
    case ffi::DataType::BF16:
    case ffi::DataType::F16:
      err = launch_detect<uint16_t>(stream, x.untyped_data(), s, layout, workspace->typed_data(),
                                    counts->typed_data(), offsets->typed_data(), indices->typed_data());
      break;
    case ffi::DataType::F32:
      err = launch_detect<uint32_t>(stream, x.untyped_data(), s, layout, workspace->typed_data(),
                                    counts->typed_data(), offsets->typed_data(), indices->typed_data());
      break;
    default:
      return ffi::Error::InvalidArgument("pit_detect: x must be bfloat16, float16 or float32");
  }
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("pit_detect: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace pit

// No host decisions depend on data, so XLA may capture this handler in a CUDA graph.
XLA_FFI_DEFINE_HANDLER_SYMBOL(PitDetectCuda, pit::DetectCuda,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::U32>>()
                                  .Attr<int64_t>("tile_m")
                                  .Attr<int64_t>("tile_k")
                                  .Attr<int64_t>("layout"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
