// k-gather rule on CUDA (PIT SRead along the reduction dim).
//
// Forward  y = (x ⊙ M) @ w, three steps on the stream, no host decisions on data:
//   1. pack:   per 32-row group, copy the columns of x that lie in nonzero micro-tiles, left to
//              right, into a dense row-major buffer (rows padded with zeros to a multiple of 32),
//              and record each packed column's id in x (-1 on padding).
//   2. gemm:   one CTA per (32-row group, 128-column tile of y): a cp.async ring streams the packed
//              x (dense 16-byte loads) and the rows of w named by the column ids (SRead); tensor
//              cores (mma.sync m16n8k16, fp32 accumulate) or CUDA cores for fp32 do the product;
//              bf16/fp16 tiles are staged in shared memory and written in 16-byte row segments.
//              A group with no nonzero tile still writes its zeros.
//   When sparse_dense detects its own 32x1 index (pit_sparse_dense_detect), detection and pack are
//   one kernel (step 0+1 below) that reads x once and writes only what the GEMM reads.
//   The fused path's two kernels take programmatic dependent launches (common/pdl.cuh;
//   PIT_KGATHER_PDL=0 turns them off, read per launch): the GEMM's CTAs are scheduled while
//   detect+pack runs and wait for it before touching memory, hiding the launch gap between them
//   (4096³ bf16 at 90/95/99% sparsity: 0.100/0.070/0.047 -> 0.098/0.068/0.044 ms, H200, session
//   31). The separate pack and GEMM launch plainly: with dependent launches the index-given call
//   on OPT fc2 at 99% went from 0.076 to 0.088 ms in the same A/B.
// dW       dw = Σ_batch (x ⊙ M)ᵀ dy, two steps:
//   1. colmask: per (32-row group, 64-column tile), a 64-bit mask of the columns listed nonzero.
//   2. tn gemm: one CTA per 64x128 tile of dw walks the row groups whose mask is nonzero (in a
//              fixed order, so results are deterministic), loads x and dy tiles and zeroes x's
//              unlisted columns in registers before the MMA. No atomics.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <utility>

#include <cub/block/block_scan.cuh>

#include "../common/ffi_common.h"
#include "../common/dtype_dispatch.cuh"
#include "../common/mma_sm80.cuh"
#include "../common/pdl.cuh"
#include "../common/poison_outputs.cuh"
#include "../common/tile_copy.cuh"
#include "../common/tn_tile_math.cuh"
#include "kgather_layout.h"
#include "kgather_dw_products.cuh"
#include "kgather_nt.cuh"

static_assert(pit::kTnRows == pit::kGroupRows, "dW stages reduce one 32-row group each");

namespace pit {
namespace {

constexpr int kForwardThreads = 128;  // 4 warps per forward GEMM CTA
constexpr int kPackThreads = 256;     // one packed column per thread, blockIdx.y picks the columns

template <typename T>
struct ForwardConfig {
  static constexpr bool kTensorCores = sizeof(T) == 2;
  static constexpr int kBM = int(kGroupRows), kBN = 128, kBK = 2 * int(kPackAlign);
  // A 2-stage ring (40 KB for bf16/fp16; 44 KB with the padded rows used before session 30) leaves room
  // for 5 CTAs per SM; 3 stages (66 KB then, 3 CTAs)
  // were slower at every sparsity measured, most at 99% (4096³: 0.065 vs 0.056 ms, H200, 2026-11-27).
  static constexpr int kStages = 2;
  static constexpr int kVec = 16 / int(sizeof(T));  // elements per 16-byte copy
  // Tensor-core path: rows unpadded (128-byte x rows, 256-byte w rows) with each row's 16-byte
  // chunks XOR-swizzled by the row's low 3 bits, so ldmatrix's 8 rows hit 8 bank groups. A padded
  // row (one extra vector) leaves every row but the first off 128-byte alignment, and cp.async into
  // such rows halved the gather: w rows at density 0.1 arrived at 5.1 TB/s padded, 8.4 unpadded
  // (H200, benchmarks/read_probe/forward_ladder.cu, session 30). The fp32 path keeps the padding.
  static constexpr bool kSwizzle = kTensorCores;
  static constexpr int kAStride = kSwizzle ? kBK : kBK + kVec;
  static constexpr int kBStride = kSwizzle ? kBN : kBN + kVec;
  static constexpr int kStageElems = kBM * kAStride + kBK * kBStride;
  static constexpr int kSmemBytes = kStages * kStageElems * int(sizeof(T));
  static_assert(!kSwizzle || ((kBK / kVec) % 8 == 0 && (kBN / kVec) % 8 == 0),
                "swizzled rows hold whole groups of 8 chunks");

  // Offset of element (row, col) in a stage region of `stride` elements per row; col's 16-byte
  // chunk is permuted within its aligned group of 8 chunks (a 128-byte span) by row % 8.
  __device__ __forceinline__ static int at(int row, int col, int stride) {
    if constexpr (kSwizzle) return row * stride + (((col / kVec) ^ (row & 7)) * kVec) + col % kVec;
    else return row * stride + col;
  }
};

__device__ __forceinline__ uint64_t bit_range(int lo, int hi) {  // bits [lo, hi), 0 <= lo < hi <= 64
  const uint64_t below_hi = hi >= 64 ? ~0ull : ((1ull << hi) - 1);
  return below_hi & ~((1ull << lo) - 1);
}

// ---- forward step 1: pack ----------------------------------------------------------------------

// kTransposedX: the buffer holds xᵀ ([..., K, M] row-major; dense_sparse's weight w is its sparse
// operand's transpose), so a packed column's 32 rows are one contiguous 64-byte run of the buffer
// and no transposed copy of x is materialised first.
template <typename T, bool kTransposedX>
__global__ void __launch_bounds__(kPackThreads) pit_kgather_pack_kernel(const T* __restrict__ x,
                                                               const int32_t* __restrict__ counts,
                                                               const int32_t* __restrict__ indices,
                                                               T* __restrict__ packed, int32_t* __restrict__ column_ids,
                                                               KGatherShape s, const int32_t* __restrict__ gate_total,
                                                               int64_t gate_cap) {
  // the dW products path's pack (kgather_dw_products.cuh) is not needed when its index is over its cap
  if (gate_total != nullptr && *gate_total > gate_cap) return;
  const int64_t group = blockIdx.x;  // b * groups + g
  const int64_t b = group / s.groups, g = group % s.groups;
  const int64_t rb = b * s.nb_m + g * kGroupRows / s.tile_m;
  const int64_t len = s.group_length(counts, b, g);
  const int64_t padded = ceil_div(len, kPackAlign) * kPackAlign;
  const int32_t* blocks = indices + rb * s.nb_k;
  const int64_t row0 = g * kGroupRows;
  T* out = packed + group * kGroupRows * s.packed_k;
  const int64_t p = int64_t(blockIdx.y) * kPackThreads + threadIdx.x;
  if (p < padded) {
    const int64_t col = p < len ? s.listed_column(blocks, p) : -1;
    column_ids[group * s.packed_k + p] = int32_t(col);
    alignas(16) T v[kGroupRows];  // written as 16-byte vectors in the transposed case
    if constexpr (kTransposedX) {
      // xᵀ's row `col`, elements row0 .. row0 + 31: 16-byte loads when the run is whole and aligned
      const T* run = x + (b * s.k + (col < 0 ? 0 : col)) * s.rows + row0;
      constexpr int kVec = 16 / int(sizeof(T));
      if (col >= 0 && row0 + kGroupRows <= s.rows && reinterpret_cast<uintptr_t>(run) % 16 == 0) {
#pragma unroll
        for (int r = 0; r < kGroupRows; r += kVec)
          *reinterpret_cast<uint4*>(v + r) = *reinterpret_cast<const uint4*>(run + r);
      } else {
#pragma unroll
        for (int r = 0; r < kGroupRows; ++r) v[r] = (col >= 0 && row0 + r < s.rows) ? run[r] : zero_value<T>();
      }
    } else {
      const T* x_rows = x + (b * s.rows + row0) * s.k;
#pragma unroll
      for (int r = 0; r < kGroupRows; ++r)  // 32 independent loads in flight
        v[r] = (col >= 0 && row0 + r < s.rows) ? x_rows[r * s.k + col] : zero_value<T>();
    }
#pragma unroll
    for (int r = 0; r < kGroupRows; ++r) out[r * s.packed_k + p] = v[r];
  }
}

// ---- forward step 0+1 fused: detect and pack in one read of x (32x1 tiles) ------------------------
//
// When sparse_dense detects its own index with the default 32x1 tiles, detection and pack need
// only each group's tile count and its packed columns (the GEMM reads nothing else). One CTA per
// 32-row group streams the group's rows through a cp.async ring, chunk by chunk from left to
// right, so the packed offset of a chunk is a running sum inside the CTA: no cross-CTA scan, no
// index in memory, and x is read once. The separate passes read x in detection and again, in
// scattered 2-byte loads, in pack: OPT fc2 at 99% sparsity spent 35.6 + 9.0 + 19.5 µs in those three
// kernels and 47.4 µs in this one (H200, Nsight Compute at unlocked clocks).

template <int kThreadsPerCta>
struct DetectPackConfig {
  // 512 threads, one 32-bit word of each row per thread per chunk: 256 threads (twice the chunks,
  // each with its block scan and barriers) took 55 µs on OPT fc2's x, 512 take 47 µs (H200). The
  // 512-thread ring needs 194 KB of shared memory; GPUs with less per block (sm_80: 163 KB,
  // sm_86/89: 99 KB) get the 256-thread one (97 KB).
  static constexpr int kThreads = kThreadsPerCta;
  static constexpr int kRowBytes = 4 * kThreads;
  static constexpr int kStageBytes = int(kGroupRows) * kRowBytes;
  // One CTA per group and usually one per SM (4096 rows: 128 groups): the ring keeps two chunks
  // of x in flight while one is compacted. 6 stages of 32 KB at 256 threads read as fast as 3.
  static constexpr int kStages = 3;
  static constexpr int kSmemBytes = kStages * kStageBytes + kRowBytes;  // + `selected` (2 bytes per column)
};

template <typename T, int kThreadsPerCta, cub::BlockScanAlgorithm kScanAlgorithm>
__global__ void __launch_bounds__(kThreadsPerCta) pit_kgather_detect_pack_kernel(
    const T* __restrict__ x, int32_t* __restrict__ counts, T* __restrict__ packed, int32_t* __restrict__ column_ids,
    KGatherShape s) {
  using C = DetectPackConfig<kThreadsPerCta>;
  constexpr int kCols = C::kRowBytes / int(sizeof(T));      // columns per chunk: 1024 (16-bit), 512 (fp32)
  constexpr int kElemsPerWord = 4 / int(sizeof(T));
  constexpr uint32_t kMagnitude = sizeof(T) == 4 ? 0x7fffffffu : 0x7fffu;  // x != 0: not -0.0, NaN counts
  constexpr int kVec = 16 / int(sizeof(T));
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  uint16_t* selected = reinterpret_cast<uint16_t*>(smem_bytes + C::kStages * C::kStageBytes);
  using Scan = cub::BlockScan<int, C::kThreads, kScanAlgorithm>;
  __shared__ typename Scan::TempStorage scan_storage;

  const int64_t group = blockIdx.x;  // b * groups + g
  const int64_t b = group / s.groups, g = group % s.groups;
  const int64_t row0 = g * kGroupRows;
  const T* x_rows = x + (b * s.rows + row0) * s.k;
  T* out = packed + group * kGroupRows * s.packed_k;
  int32_t* ids = column_ids + group * s.packed_k;
  const int n_chunks = int(ceil_div(s.k, int64_t(kCols)));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  wait_for_previous_grid();  // whatever wrote x (and last read this workspace)
  allow_dependent_launch();

  auto load_chunk = [&](int chunk) {  // rows past M and columns past K read as zeros
    unsigned char* stage = smem_bytes + (chunk % C::kStages) * C::kStageBytes;
    const int64_t c0 = int64_t(chunk) * kCols;
#pragma unroll
    for (int i = threadIdx.x; i < C::kStageBytes / 16; i += C::kThreads) {
      const int r = i / (C::kRowBytes / 16), c = (i % (C::kRowBytes / 16)) * kVec;
      const bool ok = row0 + r < s.rows && c0 + c < s.k;
      cp_async_16(stage + r * C::kRowBytes + c * int(sizeof(T)), ok ? x_rows + r * s.k + c0 + c : x, ok ? 16 : 0);
    }
  };

#pragma unroll
  for (int st = 0; st < C::kStages - 1; ++st) {
    if (st < n_chunks) load_chunk(st);
    cp_async_commit();
  }
  int64_t base = 0;  // packed columns so far (uniform across the CTA)
  for (int chunk = 0; chunk < n_chunks; ++chunk) {
    cp_async_wait<C::kStages - 2>();
    __syncthreads();  // chunk's stage is visible; the previous chunk's stage and `selected` are free
    if (chunk + C::kStages - 1 < n_chunks) load_chunk(chunk + C::kStages - 1);
    cp_async_commit();
    const unsigned char* stage = smem_bytes + (chunk % C::kStages) * C::kStageBytes;
    const uint32_t* words = reinterpret_cast<const uint32_t*>(stage);
    uint32_t any = 0;
#pragma unroll
    for (int r = 0; r < kGroupRows; ++r) any |= words[r * C::kThreads + threadIdx.x];
    int flags[kElemsPerWord], n_set = 0;
#pragma unroll
    for (int e = 0; e < kElemsPerWord; ++e) {
      flags[e] = ((any >> (16 * e)) & kMagnitude) != 0;
      n_set += flags[e];
    }
    int pos, chunk_total;
    Scan(scan_storage).ExclusiveSum(n_set, pos, chunk_total);
    const int64_t c0 = int64_t(chunk) * kCols;
#pragma unroll
    for (int e = 0; e < kElemsPerWord; ++e) {
      if (!flags[e]) continue;
      const int col = threadIdx.x * kElemsPerWord + e;
      selected[pos] = uint16_t(col);
      ids[base + pos] = int32_t(c0 + col);
      ++pos;
    }
    __syncthreads();  // `selected` complete
    const T* tile = reinterpret_cast<const T*>(stage);
    for (int r = warp; r < kGroupRows; r += C::kThreads / 32)  // a warp writes consecutive packed columns
      for (int q = lane; q < chunk_total; q += 32) out[r * s.packed_k + base + q] = tile[r * kCols + selected[q]];
    base += chunk_total;
  }
  cp_async_wait<0>();
  // pad to the GEMM's k-step: zero columns with id -1
  const int64_t padded = ceil_div(base, kPackAlign) * kPackAlign;
  for (int64_t i = threadIdx.x; i < (padded - base) * kGroupRows; i += C::kThreads) {
    const int64_t r = i / (padded - base), p = base + i % (padded - base);
    out[r * s.packed_k + p] = zero_value<T>();
    if (r == 0) ids[p] = -1;
  }
  if (threadIdx.x == 0) counts[group] = int32_t(base);
}

// ---- forward step 2: gathered GEMM -------------------------------------------------------------

// Where the forward writes its tile and what it adds first. y: [..., M, N], or [..., N, M] when
// `transposed` (dense_sparse computes yᵀ = wᵀ xᵀ and writes y itself, so XLA makes no transposed
// copy of the product). bias (or null): added in fp32 to the accumulators before the one rounding,
// along y's last axis, i.e. the tile's columns, or its rows when transposed (a dense layer's bias
// in one pass instead of an elementwise pass over y). vec: y's rows take 16-byte stores (aligned
// base, a row length that is a multiple of 8 elements).
template <typename T>
struct ForwardOutput {
  T* y;
  const T* bias;
  bool transposed;
  bool vec;
};

template <typename T>
struct ForwardTensorCoreMath {  // each warp: 32 rows x 32 columns
  using C = ForwardConfig<T>;
  float acc[2][4][4] = {};

  __device__ __forceinline__ void step(const T* as, const T* bs, int warp, int lane) {
#pragma unroll
    for (int ks = 0; ks < C::kBK / 16; ++ks) {
      uint32_t a[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
        ldmatrix_x4(a[mi], as + C::at(mi * 16 + lane % 16, ks * 16 + (lane / 16) * 8, C::kAStride));
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        uint32_t bq[4];
        ldmatrix_x4_trans(bq, bs + C::at(ks * 16 + lane % 8 + ((lane / 8) % 2) * 8,
                                         warp * 32 + nj * 16 + (lane / 16) * 8, C::kBStride));
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          mma_16816<T>(acc[mi][2 * nj], a[mi], bq[0], bq[1]);
          mma_16816<T>(acc[mi][2 * nj + 1], a[mi], bq[2], bq[3]);
        }
      }
    }
  }

  // The bias values this thread adds (its fragment's columns, or rows when transposed), read
  // before the main loop so that their latency hides behind it: read at the store, they added
  // about 1 µs to every CTA (the 4096² PrunedLinear forward kernel took 56 µs against 47).
  float col_bias[4][2] = {}, row_bias[2][2] = {};
  __device__ __forceinline__ void load_bias(const ForwardOutput<T>& out, int64_t row0, int64_t col0, int64_t rows,
                                            int64_t cols, int warp, int lane) {
    if (out.bias == nullptr) return;
    const int gq = lane / 4, tq = lane % 4;
    if (out.transposed) {
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = mi * 16 + gq + half * 8;
          row_bias[mi][half] = r < rows ? float(out.bias[row0 + r]) : 0.f;
        }
    } else {
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = warp * 32 + ni * 8 + 2 * tq + e;
          col_bias[ni][e] = c < cols ? float(out.bias[col0 + c]) : 0.f;
        }
    }
  }

  // Writes the tile (`rows`/`cols` of its rows/columns exist) to y_tile through shared memory
  // (`staging`, free once the main loop is done), so that global stores are whole 16-byte
  // segments. Storing from the fragment layout directly wrote 2 bytes at a time, touching every
  // 32-byte sector twice: 0.102 vs 0.068 ms per 4096³ call at 99% sparsity (H200, 2026-11-27).
  // `ld`: y's row length (N, or M when transposed). Transposed, the tile is staged column by column
  // (kTStride per column), so that a thread reads 8 consecutive rows of one column as one 16-byte
  // vector and stores them as a 16-byte segment of a y row.
  static constexpr int kCStride = C::kBN + C::kVec;  // padded row: conflict-free fragment writes
  static constexpr int kTStride = C::kBM + C::kVec;  // padded column (80 bytes): conflict-free too
  static_assert(C::kBM * kCStride <= C::kStages * C::kStageElems, "staging must fit the ring");
  static_assert(C::kBN * kTStride <= C::kStages * C::kStageElems, "staging must fit the ring");
  __device__ __forceinline__ void store(const ForwardOutput<T>& out, T* y_tile, int64_t ld, int64_t rows,
                                        int64_t cols, T* staging, int warp, int lane) const {
    // One body per layout, chosen once per CTA: with the layout a runtime value inside the loops,
    // the copy's line length and trip count were runtime values too (a division per segment), and
    // the store-bound 4096³ call at 99% sparsity took 4-5 µs longer.
    if (out.transposed) store_as<true>(out, y_tile, ld, rows, cols, staging, warp, lane);
    else store_as<false>(out, y_tile, ld, rows, cols, staging, warp, lane);
  }

  template <bool kTransposed>
  __device__ __forceinline__ void store_as(const ForwardOutput<T>& out, T* y_tile, int64_t ld, int64_t rows,
                                           int64_t cols, T* staging, int warp, int lane) const {
    // The caller has waited for the ring's copies and synchronised: `staging` is free.
    const int gq = lane / 4, tq = lane % 4;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = mi * 16 + gq + half * 8, c = warp * 32 + ni * 8 + 2 * tq;
          const float rb = row_bias[mi][half];
          const T v0 = from_float<T>(acc[mi][ni][2 * half] + rb + col_bias[ni][0]);
          const T v1 = from_float<T>(acc[mi][ni][2 * half + 1] + rb + col_bias[ni][1]);
          if constexpr (kTransposed) {
            staging[c * kTStride + r] = v0;
            staging[(c + 1) * kTStride + r] = v1;
          } else {
            staging[r * kCStride + c] = v0;
            staging[r * kCStride + c + 1] = v1;
          }
        }
    __syncthreads();
    constexpr int kLines = kTransposed ? C::kBN : C::kBM;  // y rows in the tile, and their lengths
    constexpr int kStride = kTransposed ? kTStride : kCStride, kVecsPerLine = (kTransposed ? C::kBM : C::kBN) / C::kVec;
    const int64_t line_count = kTransposed ? cols : rows, line_len = kTransposed ? rows : cols;
    for (int i = threadIdx.x; i < kLines * kVecsPerLine; i += kForwardThreads) {
      const int line = i / kVecsPerLine, e0 = (i % kVecsPerLine) * C::kVec;
      if (line >= line_count || e0 >= line_len) continue;
      const T* src = staging + line * kStride + e0;
      T* dst = y_tile + line * ld + e0;
      if (out.vec && e0 + C::kVec <= line_len) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
      } else {
        for (int e = 0; e < C::kVec && e0 + e < line_len; ++e) dst[e] = src[e];
      }
    }
  }
};

template <typename T>
struct ForwardCudaCoreMath {  // fp32: each thread 8 rows x 4 columns
  using C = ForwardConfig<T>;
  float acc[8][4] = {};

  __device__ __forceinline__ void step(const T* as, const T* bs, int, int) {
    const int tr = threadIdx.x / 32, tc = threadIdx.x % 32;
#pragma unroll 4
    for (int kk = 0; kk < C::kBK; ++kk) {
      float b[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = float(bs[kk * C::kBStride + tc * 4 + j]);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float a = float(as[(tr * 8 + i) * C::kAStride + kk]);
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a, b[j], acc[i][j]);
      }
    }
  }

  // 4-byte elements: stored from registers, no barrier. load_bias only points at the tile's bias
  // values, which the store reads (the fp32 path is not tuned). Arguments as ForwardTensorCoreMath's.
  const T* bias_rows = nullptr;
  const T* bias_cols = nullptr;
  __device__ __forceinline__ void load_bias(const ForwardOutput<T>& out, int64_t row0, int64_t col0, int64_t,
                                            int64_t, int, int) {
    if (out.bias == nullptr) return;
    if (out.transposed) bias_rows = out.bias + row0;
    else bias_cols = out.bias + col0;
  }
  __device__ __forceinline__ void store(const ForwardOutput<T>& out, T* y_tile, int64_t ld, int64_t rows,
                                        int64_t cols, T*, int, int) const {
    const int tr = threadIdx.x / 32, tc = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = tr * 8 + i, c = tc * 4 + j;
        if (r >= rows || c >= cols) continue;
        const float bias = bias_rows != nullptr ? float(bias_rows[r]) : bias_cols != nullptr ? float(bias_cols[c]) : 0.f;
        y_tile[out.transposed ? c * ld + r : r * ld + c] = from_float<T>(acc[i][j] + bias);
      }
  }
};

template <typename T>
using ForwardMath = std::conditional_t<ForwardConfig<T>::kTensorCores, ForwardTensorCoreMath<T>, ForwardCudaCoreMath<T>>;

// One (32-row group, 128-column) tile of y for the forward GEMM: where its packed x and column ids
// are, how many k-steps it takes, and this thread's copy slots, fixed for the whole k loop so that a
// stage's loads are a few adds per copy (32-bit positions: packed_k < 2^24, the pack grid's
// limit). A thread's shared-memory rows step by multiples of 8, so their swizzle (row % 8) is that
// of its first row. Tiles are numbered with the row groups varying fastest: the CTAs resident at
// once share a few column tiles of w, so the rows that different groups gather from w stay in L2.
template <typename T, bool kVecW>
struct ForwardTile {
  using C = ForwardConfig<T>;
  static constexpr int kAVecsPerRow = C::kBK / C::kVec, kBVecsPerRow = C::kBN / C::kVec;
  static constexpr int kALoadsPerThread = C::kBM * kAVecsPerRow / kForwardThreads;
  static constexpr int kARowsPerPass = kForwardThreads / kAVecsPerRow;
  static constexpr int kRowsPerPass = kForwardThreads / kBVecsPerRow, kIdsPerThread = C::kBK / kRowsPerPass;
  static_assert(C::kBM * kAVecsPerRow % kForwardThreads == 0, "whole copies per thread");
  static_assert(!C::kSwizzle || (kARowsPerPass % 8 == 0 && kRowsPerPass % 8 == 0),
                "each thread's copy rows share one swizzle");

  int64_t b, g, n0;
  int n_chunks, padded;  // k-steps; packed columns written by pack
  const T* a_src;
  const int32_t* ids;
  const T* a_thread_src;
  int a_thread_dst, b_thread_dst, my_row, a_col;
  int64_t n;  // this thread's first column of w
  const T* w_col;
  bool col_in_w;  // kVecW: a segment is all in w or all past its last column

  // Tile `tile`: row groups vary fastest, then column tiles.
  __device__ __forceinline__ ForwardTile(int64_t tile, const T* packed, const int32_t* column_ids,
                                         const int32_t* counts, const T* w, const KGatherShape& s) {
    const int64_t group = tile % s.all_groups();
    b = group / s.groups;
    g = group % s.groups;
    n0 = (tile / s.all_groups()) * C::kBN;
    const int64_t len = s.group_length(counts, b, g);
    n_chunks = int(ceil_div(len, C::kBK));
    padded = int(ceil_div(len, kPackAlign) * kPackAlign);
    a_src = packed + group * kGroupRows * s.packed_k;
    ids = column_ids + group * s.packed_k;
    const int a_row = threadIdx.x / kAVecsPerRow;
    a_col = (threadIdx.x % kAVecsPerRow) * C::kVec;
    a_thread_src = a_src + a_row * s.packed_k + a_col;
    a_thread_dst = C::at(a_row, a_col, C::kAStride);
    my_row = threadIdx.x / kBVecsPerRow;
    const int my_col = (threadIdx.x % kBVecsPerRow) * C::kVec;
    b_thread_dst = C::at(my_row, my_col, C::kBStride);
    n = n0 + my_col;
    w_col = w + n;
    col_in_w = n < s.n;
  }

  // Column ids of this thread's w rows for one chunk; fetched an iteration ahead so that the
  // SRead's dependent loads never wait on them.
  __device__ __forceinline__ void fetch_ids(int chunk, int32_t (&out)[kIdsPerThread]) const {
#pragma unroll
    for (int j = 0; j < kIdsPerThread; ++j) {
      const int p = chunk * C::kBK + my_row + j * kRowsPerPass;
      out[j] = (chunk < n_chunks && p < padded) ? ids[p] : -1;
    }
  }

  // Chunk `chunk` of packed x and the w rows named by `k_ids` into the ring slot at `as`.
  __device__ __forceinline__ void load_stage(T* as, int chunk, const int32_t (&k_ids)[kIdsPerThread], const T* w,
                                             const KGatherShape& s) const {
    T* bs = as + C::kBM * C::kAStride;
    const int p0 = chunk * C::kBK;
    const bool a_ok = p0 + a_col < padded;  // packed rows: always aligned
#pragma unroll
    for (int it = 0; it < kALoadsPerThread; ++it)
      cp_async_16(as + a_thread_dst + it * kARowsPerPass * C::kAStride,
                  a_ok ? a_thread_src + it * kARowsPerPass * s.packed_k + p0 : a_src, a_ok ? 16 : 0);
#pragma unroll
    for (int j = 0; j < kIdsPerThread; ++j) {  // SRead: the w rows named by the ids
      const int64_t k = k_ids[j];
      T* dst = bs + b_thread_dst + j * kRowsPerPass * C::kBStride;
      if constexpr (kVecW) {
        const bool ok = k >= 0 && col_in_w;
        cp_async_16(dst, ok ? w_col + k * s.n : w, ok ? 16 : 0);
      } else {
        const int64_t valid = k < 0 ? 0 : (s.n - n < C::kVec ? s.n - n : C::kVec);
        load_segment<T, kVecW>(dst, w_col + k * s.n, valid, w);
      }
    }
  }

  __device__ __forceinline__ void load_bias(ForwardMath<T>& math, const ForwardOutput<T>& out, const KGatherShape& s,
                                            int warp, int lane) const {
    const int64_t row0 = g * kGroupRows;
    math.load_bias(out, row0, n0, s.rows - row0, s.n - n0, warp, lane);
  }

  __device__ __forceinline__ void store(const ForwardMath<T>& math, const ForwardOutput<T>& out,
                                        const KGatherShape& s, T* staging, int warp, int lane) const {
    const int64_t row0 = g * kGroupRows;
    T* y_tile = out.transposed ? out.y + (b * s.n + n0) * s.rows + row0 : out.y + (b * s.rows + row0) * s.n + n0;
    math.store(out, y_tile, out.transposed ? s.rows : s.n, s.rows - row0, s.n - n0, staging, warp, lane);
  }
};

// One CTA per tile.
template <typename T, bool kVecW>
__global__ void __launch_bounds__(kForwardThreads) pit_kgather_forward_kernel(const T* __restrict__ packed,
                                                                       const int32_t* __restrict__ column_ids,
                                                                       const int32_t* __restrict__ counts,
                                                                       const T* __restrict__ w,
                                                                       ForwardOutput<T> out, KGatherShape s) {
  using C = ForwardConfig<T>;
  using Tile = ForwardTile<T, kVecW>;
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  T* smem = reinterpret_cast<T*>(smem_bytes);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  wait_for_previous_grid();  // pack's output (and whatever wrote w, which pack waited for)
  allow_dependent_launch();
  const Tile tile(blockIdx.x, packed, column_ids, counts, w, s);

  ForwardMath<T> math;
  tile.load_bias(math, out, s, warp, lane);
  int32_t k_ids[Tile::kIdsPerThread];
#pragma unroll
  for (int st = 0; st < C::kStages - 1; ++st) {
    tile.fetch_ids(st, k_ids);
    if (st < tile.n_chunks) tile.load_stage(smem + st * C::kStageElems, st, k_ids, w, s);
    cp_async_commit();
  }
  tile.fetch_ids(C::kStages - 1, k_ids);
  for (int chunk = 0; chunk < tile.n_chunks; ++chunk) {
    cp_async_wait<C::kStages - 2>();
    __syncthreads();  // stage `chunk` is visible; stage `chunk - 1` is free for reuse
    const int next = chunk + C::kStages - 1;
    if (next < tile.n_chunks) tile.load_stage(smem + (next % C::kStages) * C::kStageElems, next, k_ids, w, s);
    cp_async_commit();
    tile.fetch_ids(next + 1, k_ids);
    const T* as = smem + (chunk % C::kStages) * C::kStageElems;
    math.step(as, as + C::kBM * C::kAStride, warp, lane);
  }
  if constexpr (C::kTensorCores) {  // (fp32 stores from registers)
    cp_async_wait<0>();
    __syncthreads();  // every warp is done with the ring: it may stage the output tile
  }
  tile.store(math, out, s, smem, warp, lane);
}

// ---- dW step 1: column masks per (row group, 64-column tile) -----------------------------------

constexpr int kMaskWordsPerPass = 1024;

__global__ void __launch_bounds__(256) pit_kgather_colmask_kernel(const int32_t* __restrict__ counts,
                                                                  const int32_t* __restrict__ indices,
                                                                  uint64_t* __restrict__ masks, KGatherShape s) {
  __shared__ unsigned long long words[kMaskWordsPerPass];
  const int64_t rb_all = blockIdx.x;  // b * nb_m + rb
  const int64_t b = rb_all / s.nb_m, rb = rb_all % s.nb_m;
  const int64_t count = s.listed_count(counts, rb_all);
  const int32_t* blocks = indices + rb_all * s.nb_k;
  const int64_t tiles = s.mask_tiles();
  const int64_t g_first = rb * s.tile_m / kGroupRows;
  const int64_t g_end = min(s.groups, (rb + 1) * s.tile_m / kGroupRows);
  for (int64_t t0 = 0; t0 < tiles; t0 += kMaskWordsPerPass) {
    for (int i = threadIdx.x; i < kMaskWordsPerPass; i += blockDim.x) words[i] = 0;
    __syncthreads();
    const int64_t pass_lo = t0 * kMaskCols, pass_hi = min(s.k, (t0 + kMaskWordsPerPass) * kMaskCols);
    for (int64_t j = threadIdx.x; j < count; j += blockDim.x) {
      if (blocks[j] < 0 || blocks[j] >= s.nb_k) continue;  // a caller's bad id: skipped
      int64_t c = max(int64_t(blocks[j]) * s.tile_k, pass_lo);
      const int64_t c_end = min(int64_t(blocks[j]) * s.tile_k + s.tile_k, pass_hi);
      while (c < c_end) {
        const int64_t t = c / kMaskCols, t_end = min(c_end, (t + 1) * kMaskCols);
        atomicOr(&words[t - t0], (unsigned long long)bit_range(int(c - t * kMaskCols), int(t_end - t * kMaskCols)));
        c = t_end;
      }
    }
    __syncthreads();
    const int64_t n_words = min(int64_t(kMaskWordsPerPass), tiles - t0);
    for (int64_t g = g_first; g < g_end; ++g)
      for (int64_t i = threadIdx.x; i < n_words; i += blockDim.x)
        masks[(t0 + i) * s.all_groups() + b * s.groups + g] = words[i];  // [tile][group]: coalesced reads later
    __syncthreads();
  }
}

// ---- dW step 2: xᵀ dy over the row groups with nonzero columns ---------------------------------

template <typename T, bool kVecX, bool kVecDy>
__global__ void __launch_bounds__(TnConfig<T>::kThreads) pit_kgather_tn_kernel(
    const T* __restrict__ x, const T* __restrict__ dy, const uint64_t* __restrict__ masks, T* __restrict__ dw,
    KGatherShape s, int64_t n_tiles, const int32_t* __restrict__ products_total, int64_t products_cap) {
  using C = TnConfig<T>;
  // the products path (kgather_dw_products.cuh) wrote dw when the index's total fits its scratch
  if (products_total != nullptr && *products_total <= products_cap) return;
  using Scan = cub::BlockScan<int, C::kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  T* smem = reinterpret_cast<T*>(smem_bytes);
  uint64_t* list_mask = reinterpret_cast<uint64_t*>(smem_bytes + C::kStages * C::kStageElems * sizeof(T));
  int32_t* list_group = reinterpret_cast<int32_t*>(list_mask + C::kWords * C::kListCap);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n_tile = blockIdx.x % n_tiles, k_tile = blockIdx.x / n_tiles;
  const int64_t n0 = n_tile * C::kBN, k0 = k_tile * C::kBM;
  const int64_t all_groups = s.all_groups();
  const int64_t first_word = k_tile * C::kWords;
  constexpr int kPerThread = C::kListCap / C::kThreads;
  TnMath<T> math;

  for (int64_t base = 0; base < all_groups; base += C::kListCap) {
    // The row groups of this pass with a listed column in this tile, compacted in a fixed order.
    uint64_t m[kPerThread][C::kWords];
    int mine = 0;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t grp = base + j * C::kThreads + threadIdx.x;
      bool any = false;
#pragma unroll
      for (int wd = 0; wd < C::kWords; ++wd) {
        const bool ok = grp < all_groups && first_word + wd < s.mask_tiles();
        m[j][wd] = ok ? masks[(first_word + wd) * all_groups + grp] : 0;
        any |= m[j][wd] != 0;
      }
      mine += any;
    }
    int pos, active;
    Scan(scan_storage).ExclusiveSum(mine, pos, active);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j)
      if (m[j][0] | m[j][1]) {  // kWords == 2
#pragma unroll
        for (int wd = 0; wd < C::kWords; ++wd) list_mask[pos * C::kWords + wd] = m[j][wd];
        list_group[pos] = int32_t(j * C::kThreads + threadIdx.x);
        ++pos;
      }
    __syncthreads();

    auto load_stage = [&](int e, int stage) {
      T* xs = smem + stage * C::kStageElems;
      T* ds = xs + C::kBR * C::kXStride;
      constexpr int kXVecsPerRow = C::kBM / C::kVec, kDVecsPerRow = C::kBN / C::kVec;
      const int grp = int(base) + list_group[e];  // all_groups < 2^31: 32-bit division
      const int64_t b = grp / int(s.groups), row0 = int64_t(grp % int(s.groups)) * kGroupRows;
      for (int i = threadIdx.x; i < C::kBR * kXVecsPerRow; i += C::kThreads) {
        const int r = i / kXVecsPerRow, c = (i % kXVecsPerRow) * C::kVec;
        const int64_t row = row0 + r, col = k0 + c;
        const int64_t valid = row >= s.rows ? 0 : (s.k - col < C::kVec ? s.k - col : C::kVec);
        load_segment<T, kVecX>(xs + r * C::kXStride + c, x + (b * s.rows + row) * s.k + col, valid, x);
      }
      for (int i = threadIdx.x; i < C::kBR * kDVecsPerRow; i += C::kThreads) {
        const int r = i / kDVecsPerRow, c = (i % kDVecsPerRow) * C::kVec;
        const int64_t row = row0 + r, col = n0 + c;
        const int64_t valid = row >= s.rows ? 0 : (s.n - col < C::kVec ? s.n - col : C::kVec);
        load_segment<T, kVecDy>(ds + r * C::kDStride + c, dy + (b * s.rows + row) * s.n + col, valid, dy);
      }
    };

    pipelined_mainloop<C::kStages>(active, load_stage, [&](int e, int stage) {
      const T* xs = smem + stage * C::kStageElems;
      uint64_t masks_e[C::kWords];
#pragma unroll
      for (int wd = 0; wd < C::kWords; ++wd) masks_e[wd] = list_mask[e * C::kWords + wd];
      math.step(xs, xs + C::kBR * C::kXStride, masks_e, warp, lane);
    });
    __syncthreads();  // the list and the stages are rewritten by the next pass
  }
  math.store(dw + k0 * s.n + n0, s.n, s.k - k0, s.n - n0, warp, lane);
}

// ---- launchers ---------------------------------------------------------------------------------

// Whether the fused path's kernels (detect+pack, then the GEMM) take dependent launches:
// PIT_KGATHER_PDL=0 turns them off (an A/B switch, read per launch).
inline bool forward_dependent_launch() { return dependent_launch_setting("PIT_KGATHER_PDL") != 0; }

// The gathered GEMM over a packed x (step 2); `counts` per 32-row group's tile row block. `epilogue`
// says where y goes and what is added (ForwardOutput; its `vec` is set here).
template <typename T>
cudaError_t launch_gemm(cudaStream_t stream, const KGatherShape& s, const T* packed, const int32_t* column_ids,
                        const int32_t* counts, const void* w, ForwardOutput<T> epilogue, bool dependent) {
  using C = ForwardConfig<T>;
  const int64_t n_tiles = ceil_div(s.n, C::kBN);
  const unsigned grid = unsigned(s.all_groups() * n_tiles);
  const bool vec_w = rows_copy_by_16_bytes<T>(w, s.n);
  auto kernel = vec_w ? pit_kgather_forward_kernel<T, true> : pit_kgather_forward_kernel<T, false>;
  epilogue.vec = rows_copy_by_16_bytes<T>(epilogue.y, epilogue.transposed ? s.rows : s.n);
  cudaError_t err = allow_dynamic_smem(kernel, C::kSmemBytes);
  if (err != cudaSuccess) return err;
  err = launch_dependent(kernel, dim3(grid), dim3(kForwardThreads), C::kSmemBytes, stream, dependent,
                         packed, column_ids, counts, static_cast<const T*>(w), epilogue, s);
  return err != cudaSuccess ? err : cudaGetLastError();
}

// Pack (step 1): each 32-row group's listed columns of x, densely, with their column ids. With
// `gate_total`, it returns at once when *gate_total > gate_cap.
template <typename T>
void launch_pack(cudaStream_t stream, const KGatherShape& s, const void* x, const int32_t* counts,
                 const int32_t* indices, T* packed, int32_t* column_ids, const int32_t* gate_total = nullptr,
                 int64_t gate_cap = 0, bool x_transposed = false) {
  const dim3 grid(unsigned(s.all_groups()), unsigned(ceil_div(s.packed_k, kPackThreads)));
  auto kernel = x_transposed ? pit_kgather_pack_kernel<T, true> : pit_kgather_pack_kernel<T, false>;
  kernel<<<grid, kPackThreads, 0, stream>>>(static_cast<const T*>(x), counts, indices, packed, column_ids, s,
                                            gate_total, gate_cap);
}

// The forward's output and its epilogue as the handlers receive them (bias: null for none).
template <typename T>
ForwardOutput<T> forward_output(void* y, const void* bias, bool y_transposed) {
  return ForwardOutput<T>{static_cast<T*>(y), static_cast<const T*>(bias), y_transposed, false};
}

// x_transposed: the buffer holds xᵀ (only pack reads x).
template <typename T>
cudaError_t launch_forward(cudaStream_t stream, const KGatherShape& s, const void* x, const void* w,
                           const int32_t* counts, const int32_t* indices, void* y, const void* bias,
                           bool y_transposed, uint8_t* workspace, bool x_transposed) {
  if (s.all_groups() == 0 || s.n == 0) return cudaSuccess;
  T* packed = reinterpret_cast<T*>(workspace);
  int32_t* column_ids = reinterpret_cast<int32_t*>(workspace + s.packed_x_bytes(sizeof(T)));
  launch_pack<T>(stream, s, x, counts, indices, packed, column_ids, nullptr, 0, x_transposed);
  return launch_gemm<T>(stream, s, packed, column_ids, counts, w, forward_output<T>(y, bias, y_transposed),
                        /*dependent=*/false);
}

// Detection fused with pack (32x1 tiles, x's rows in 16-byte vectors), then the GEMM. Scratch:
// the forward's (packed x, column ids) then one count per group.
template <typename T, int kThreads, cub::BlockScanAlgorithm kScanAlgorithm>
cudaError_t launch_detect_pack_with(cudaStream_t stream, const KGatherShape& s, const void* x, int32_t* counts,
                                    T* packed, int32_t* column_ids) {
  using C = DetectPackConfig<kThreads>;
  auto kernel = pit_kgather_detect_pack_kernel<T, kThreads, kScanAlgorithm>;
  cudaError_t err = allow_dynamic_smem(kernel, C::kSmemBytes);
  if (err != cudaSuccess) return err;
  err = launch_dependent(kernel, dim3(unsigned(s.all_groups())), dim3(kThreads), C::kSmemBytes, stream,
                         forward_dependent_launch(), static_cast<const T*>(x), counts, packed, column_ids, s);
  return err != cudaSuccess ? err : cudaGetLastError();
}

// The block scan of each chunk's column counts, CUB's algorithm: memoize (raking with the
// partials kept in registers between its two passes; the default), raking or warp (warp scans,
// then one pass over the warp totals), picked by PIT_KGATHER_FUSED_SCAN per launch (an A/B
// switch). The kernel is bound by its per-chunk work; on OPT fc2 at 99% sparsity a call took
// 0.107 ms with memoize, 0.109 with warp and 0.114 with raking (H200, one process, session 14).
template <typename T, int kThreads>
cudaError_t launch_detect_pack(cudaStream_t stream, const KGatherShape& s, const void* x, int32_t* counts, T* packed,
                               int32_t* column_ids) {
  const char* env = std::getenv("PIT_KGATHER_FUSED_SCAN");
  const std::string scan = env == nullptr ? "memoize" : env;
  if (scan == "warp")
    return launch_detect_pack_with<T, kThreads, cub::BLOCK_SCAN_WARP_SCANS>(stream, s, x, counts, packed, column_ids);
  if (scan == "raking")
    return launch_detect_pack_with<T, kThreads, cub::BLOCK_SCAN_RAKING>(stream, s, x, counts, packed, column_ids);
  return launch_detect_pack_with<T, kThreads, cub::BLOCK_SCAN_RAKING_MEMOIZE>(stream, s, x, counts, packed,
                                                                              column_ids);
}

// Whether the current device gives a block the 512-thread ring's shared memory (a static device
// property, read once per device; PIT_KGATHER_FUSED_THREADS=256 forces the smaller ring, for tests).
inline bool large_detect_pack_ring_fits() {
  if (const char* env = std::getenv("PIT_KGATHER_FUSED_THREADS")) return std::atoi(env) != 256;
  constexpr int kMaxDevices = 64;
  static int optin[kMaxDevices] = {};  // 0: not read yet
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device >= kMaxDevices) return false;
  if (optin[device] == 0 &&
      cudaDeviceGetAttribute(&optin[device], cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    return false;
  return optin[device] >= DetectPackConfig<512>::kSmemBytes + 4096;  // + the kernel's static shared memory
}

template <typename T>
cudaError_t launch_forward_detecting(cudaStream_t stream, const KGatherShape& s, const void* x, const void* w,
                                     void* y, const void* bias, bool y_transposed, uint8_t* workspace) {
  if (s.all_groups() == 0 || s.n == 0) return cudaSuccess;
  T* packed = reinterpret_cast<T*>(workspace);
  int32_t* column_ids = reinterpret_cast<int32_t*>(workspace + s.packed_x_bytes(sizeof(T)));
  int32_t* counts = reinterpret_cast<int32_t*>(workspace + s.forward_workspace_bytes(sizeof(T)));
  const cudaError_t err = large_detect_pack_ring_fits()
                              ? launch_detect_pack<T, 512>(stream, s, x, counts, packed, column_ids)
                              : launch_detect_pack<T, 256>(stream, s, x, counts, packed, column_ids);
  if (err != cudaSuccess) return err;
  return launch_gemm<T>(stream, s, packed, column_ids, counts, w, forward_output<T>(y, bias, y_transposed),
                        forward_dependent_launch());
}

// The masked dW kernel; with `products_total`, it returns at once when *products_total <= products_cap
// (the products path ran).
template <typename T>
cudaError_t launch_tn(cudaStream_t stream, const KGatherShape& s, const void* x, const void* dy,
                      const int32_t* counts, const int32_t* indices, void* dw, uint8_t* workspace,
                      const int32_t* products_total = nullptr, int64_t products_cap = 0) {
  using C = TnConfig<T>;
  if (s.k == 0 || s.n == 0) return cudaSuccess;
  if (s.all_groups() == 0) return cudaMemsetAsync(dw, 0, s.k * s.n * sizeof(T), stream);
  uint64_t* masks = reinterpret_cast<uint64_t*>(workspace);
  pit_kgather_colmask_kernel<<<unsigned(s.batch * s.nb_m), 256, 0, stream>>>(counts, indices, masks, s);
  const int64_t n_tiles = ceil_div(s.n, C::kBN);
  const unsigned grid = unsigned(ceil_div(s.k, C::kBM) * n_tiles);
  const bool vec_x = rows_copy_by_16_bytes<T>(x, s.k), vec_dy = rows_copy_by_16_bytes<T>(dy, s.n);
  auto kernel = vec_x ? (vec_dy ? pit_kgather_tn_kernel<T, true, true> : pit_kgather_tn_kernel<T, true, false>)
                      : (vec_dy ? pit_kgather_tn_kernel<T, false, true> : pit_kgather_tn_kernel<T, false, false>);
  cudaError_t err = allow_dynamic_smem(kernel, C::kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(static_cast<const T*>(x), static_cast<const T*>(dy), masks,
                                                     static_cast<T*>(dw), s, n_tiles, products_total, products_cap);
  return cudaGetLastError();
}

// The products path's scratch sections (products_workspace_bytes' layout; the masked kernel's
// masks come first).
template <typename T>
struct ProductsSections {
  T* packed;
  int32_t *column_ids, *offsets, *table;
  float* scratch;
  ProductsSections(const KGatherShape& s, uint8_t* workspace) {
    uint8_t* ws = workspace + pad256(s.tn_workspace_bytes());
    packed = reinterpret_cast<T*>(ws);
    column_ids = reinterpret_cast<int32_t*>(ws + s.packed_x_bytes(sizeof(T)));
    offsets = reinterpret_cast<int32_t*>(ws + pad256(s.forward_workspace_bytes(sizeof(T))));
    table = reinterpret_cast<int32_t*>(reinterpret_cast<uint8_t*>(offsets) + products_offsets_bytes(s));
    scratch = reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(table) + products_table_bytes(s));
  }
  const int32_t* total(const KGatherShape& s) const { return offsets + s.all_groups(); }
};

// The products path after pack and the offsets: the table, then per slab the products and the row
// sums. Each kernel returns at once when the total is over cap_rows.
template <typename T>
cudaError_t launch_products_passes(cudaStream_t stream, const KGatherShape& s, const ProductsSections<T>& p,
                                   const void* dy, void* dw, int64_t cap_rows, int64_t n_slab) {
  const int64_t table_vecs = s.k * s.all_groups() / 4;  // int4 stores of -1 (not listed); the rest one by one
  pit_kgather_products_table_clear_kernel<<<unsigned(std::min<int64_t>(std::max<int64_t>(ceil_div(table_vecs, 256), 1), 4096)),
                                            256, 0, stream>>>(p.offsets, p.table, s, cap_rows);
  pit_kgather_products_table_kernel<<<unsigned(s.all_groups()), 256, 0, stream>>>(p.column_ids, p.offsets, p.table, s,
                                                                                cap_rows);
  const bool vec_dy = rows_copy_by_16_bytes<T>(dy, s.n);
  const bool vec_dw = s.n % 4 == 0 && reinterpret_cast<uintptr_t>(dw) % 8 == 0;
  // the row sums keep one table entry per 32 groups per lane in registers: as few rounds as the groups need
  const int64_t rounds = ceil_div(s.all_groups(), int64_t(32));
  auto reduce = rounds <= 4 ? pit_kgather_tn_reduce_kernel<T, 4>
                : rounds <= 8 ? pit_kgather_tn_reduce_kernel<T, 8>
                : rounds <= 16 ? pit_kgather_tn_reduce_kernel<T, 16>
                : pit_kgather_tn_reduce_kernel<T, kReduceMaxRounds>;
  for (int64_t n0 = 0; n0 < s.n; n0 += n_slab) {
    const int64_t width = std::min(n_slab, s.n - n0);
    pit_kgather_tn_products_kernel<T><<<dim3(unsigned(s.all_groups()), unsigned(ceil_div(width, int64_t(kProductsN)))),
                                        kProductsThreads, 0, stream>>>(
        p.packed, p.offsets, static_cast<const T*>(dy), p.scratch, s, n0, n_slab, width, cap_rows, vec_dy);
    reduce<<<unsigned(ceil_div(s.k, int64_t(kReduceRowsPerCta))), 32 * kReduceRowsPerCta, 0, stream>>>(
        p.table, p.offsets, p.scratch, static_cast<T*>(dw), s, n0, n_slab, width, cap_rows, vec_dw);
  }
  return cudaGetLastError();
}

// dW through the products path (kgather_dw_products.cuh) when the index's listed columns fit
// `cap_rows`, else through the masked kernel (masked_fallback) or through nothing: dw is then left
// for pit_dense_tn_gated (kgather_dw_dense_sm90.cu), which reads the same total. The kernels of
// both paths are launched and the device picks (bf16/fp16).
template <typename T>
cudaError_t launch_tn_products(cudaStream_t stream, const KGatherShape& s, const void* x, const void* dy,
                               const int32_t* counts, const int32_t* indices, void* dw, uint8_t* workspace,
                               int64_t cap_rows, int64_t n_slab, bool masked_fallback) {
  if (s.k == 0 || s.n == 0) return cudaSuccess;
  if (s.all_groups() == 0) return cudaMemsetAsync(dw, 0, s.k * s.n * sizeof(T), stream);
  const ProductsSections<T> p(s, workspace);
  // the total first: every later kernel of the path returns at once when it is over the cap
  pit_kgather_group_offsets_kernel<<<1, kOffsetsThreads, 0, stream>>>(counts, p.offsets, s);
  launch_pack<T>(stream, s, x, counts, indices, p.packed, p.column_ids, p.total(s), cap_rows);
  const cudaError_t err = launch_products_passes<T>(stream, s, p, dy, dw, cap_rows, n_slab);
  if (err != cudaSuccess || !masked_fallback) return err;
  return launch_tn<T>(stream, s, x, dy, counts, indices, dw, workspace, p.total(s), cap_rows);
}

// The same on x alone, for an index sparse_dense detected from x itself with 32x1 tiles (x's rows
// whole 16-byte vectors): the forward's fused detect+pack kernel writes the groups' counts (a
// last scratch section), packed columns and ids in one read of x, so neither the separate
// detection nor pack runs. No masked fallback (PIT_KGATHER_DW=device: the gated GEMM is).
template <typename T>
cudaError_t launch_tn_products_detecting(cudaStream_t stream, const KGatherShape& s, const void* x, const void* dy,
                                         void* dw, uint8_t* workspace, int64_t cap_rows, int64_t n_slab) {
  if (s.k == 0 || s.n == 0) return cudaSuccess;
  if (s.all_groups() == 0) return cudaMemsetAsync(dw, 0, s.k * s.n * sizeof(T), stream);
  const ProductsSections<T> p(s, workspace);
  int32_t* counts = reinterpret_cast<int32_t*>(workspace + products_workspace_bytes(s, sizeof(T), cap_rows, n_slab));
  cudaError_t err = large_detect_pack_ring_fits()
                        ? launch_detect_pack<T, 512>(stream, s, x, counts, p.packed, p.column_ids)
                        : launch_detect_pack<T, 256>(stream, s, x, counts, p.packed, p.column_ids);
  if (err != cudaSuccess) return err;
  pit_kgather_group_offsets_kernel<<<1, kOffsetsThreads, 0, stream>>>(counts, p.offsets, s);
  return launch_products_passes<T>(stream, s, p, dy, dw, cap_rows, n_slab);
}

// ---- FFI handlers ------------------------------------------------------------------------------

bool same_dims(ffi::AnyBuffer::Dimensions a, std::initializer_list<int64_t> b) {
  if (a.size() != b.size()) return false;
  size_t i = 0;
  for (int64_t d : b)
    if (a[i++] != d) return false;
  return true;
}

// Checks x [..., M, K], the second operand [rows2, N] (w: [K, N]; dy: [..., M, N]) and the row
// index [..., nb_m] / [..., nb_m, nb_k]; fills the shape. Returns an error message or "".
std::string check_kgather(const char* op, ffi::AnyBuffer x, ffi::AnyBuffer::Dimensions counts,
                          ffi::AnyBuffer::Dimensions indices, int64_t n, int64_t tile_m, int64_t tile_k,
                          KGatherShape* s, bool x_transposed = false) {
  MatrixView xv;
  if (!matrix_view(x.dimensions(), &xv)) return std::string(op) + ": x must have rank >= 2";
  if (x_transposed) std::swap(xv.rows, xv.cols);  // the buffer holds xᵀ [..., K, M]
  if (tile_m <= 0 || tile_k <= 0 || tile_m % kGroupRows != 0)
    return std::string(op) + ": tile_m must be a positive multiple of 32 and tile_k positive";
  *s = make_kgather_shape(xv.batch, xv.rows, xv.cols, n, tile_m, tile_k);
  const size_t lead = x.dimensions().size() - 2;
  if (counts.size() != lead + 1 || indices.size() != lead + 2 || counts[lead] != s->nb_m ||
      indices[lead] != s->nb_m || indices[lead + 1] != s->nb_k)
    return std::string(op) + ": the index does not match x's shape and tile";
  for (size_t i = 0; i < lead; ++i)
    if (counts[i] != x.dimensions()[i] || indices[i] != x.dimensions()[i])
      return std::string(op) + ": the index's batch dims do not match x's";
  return "";
}

// Grids are 1-D (x < 2^31) except the pack kernel's column dimension (y < 65536).
bool fits_launch_limits(const KGatherShape& s, int64_t tile_n) {
  constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1;
  const int64_t n_tiles = ceil_div(s.n, tile_n);
  return s.all_groups() * n_tiles <= kMaxGridX && s.batch * s.nb_m <= kMaxGridX &&
         ceil_div(s.k, int64_t(TnConfig<float>::kBM)) * n_tiles <= kMaxGridX &&
         ceil_div(s.packed_k, kPackThreads) <= 65535 && s.all_groups() < (int64_t(1) << 31);
}


// The fused detect+pack kernel streams x's rows as whole 16-byte vectors.
bool rows_are_16_byte_vectors(ffi::AnyBuffer x, const KGatherShape& s) {
  const int64_t elem = ffi::ByteWidth(x.element_type());
  return elem != 0 && (s.k * elem) % 16 == 0 && reinterpret_cast<uintptr_t>(x.untyped_data()) % 16 == 0;
}

// The forward's operands beside x (whose shape made `s`): w [K, N], one dtype for x, w, bias and y,
// y [..., M, N] ([..., N, M] when y_transposed), bias empty (none) or [y's last dim]. Returns an
// error message or "".
std::string check_forward_operands(const char* op, const KGatherShape& s, ffi::AnyBuffer x, ffi::AnyBuffer w,
                                   ffi::AnyBuffer bias, ffi::AnyBuffer y, bool y_transposed) {
  if (w.dimensions()[0] != s.k) return std::string(op) + ": w's rows must equal x's columns";
  if (w.element_type() != x.element_type() || y.element_type() != x.element_type())
    return std::string(op) + ": x, w and y must share one dtype";
  const auto yd = y.dimensions();
  const int64_t last = y_transposed ? s.rows : s.n, second = y_transposed ? s.n : s.rows;
  if (element_count(yd) != s.batch * s.rows * s.n || yd.size() < 2 || yd[yd.size() - 1] != last ||
      yd[yd.size() - 2] != second)
    return std::string(op) + (y_transposed ? ": y must be [..., N, M]" : ": y must be [..., M, N]");
  if (element_count(bias.dimensions()) != 0 &&
      (bias.element_type() != x.element_type() || !same_dims(bias.dimensions(), {last})))
    return std::string(op) + ": bias must be empty or [y's last dim] in x's dtype";
  return "";
}

// The bias buffer's data, or null when it is empty (no bias).
const void* bias_or_null(ffi::AnyBuffer bias) {
  return element_count(bias.dimensions()) == 0 ? nullptr : bias.untyped_data();
}

// y = x @ w on x's row index; x_transposed: the buffer holds xᵀ [..., K, M] (dense_sparse's weight),
// which pack reads in place.
ffi::Error SparseDenseCuda(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::S32> counts,
                           ffi::Buffer<ffi::S32> indices, ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y,
                           ffi::Result<ffi::Buffer<ffi::U8>> workspace, int64_t tile_m, int64_t tile_k,
                           bool x_transposed, bool y_transposed) {
  const auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("pit_sparse_dense: w must be a matrix [K, N]");
  KGatherShape s;
  const std::string msg = check_kgather("pit_sparse_dense", x, counts.dimensions(), indices.dimensions(), wd[1],
                                        tile_m, tile_k, &s, x_transposed);
  if (!msg.empty()) return ffi::Error::InvalidArgument(msg);
  if (!fits_launch_limits(s, ForwardConfig<float>::kBN))
    return ffi::Error::InvalidArgument("pit_sparse_dense: x and w are too large for one launch (more than 2^31 - 1 "
                                       "CTAs or 65535 * 256 packed columns); split the batch");
  const std::string operands = check_forward_operands("pit_sparse_dense", s, x, w, bias, *y, y_transposed);
  if (!operands.empty()) return ffi::Error::InvalidArgument(operands);
  if (element_count(workspace->dimensions()) != s.forward_workspace_bytes(ffi::ByteWidth(x.element_type())))
    return ffi::Error::InvalidArgument("pit_sparse_dense: workspace size does not match the shapes");
  poison_device_outputs(stream, y);
  bool known;
  const cudaError_t err = dispatch_dtype(x.element_type(), [&](auto tag) {
    return launch_forward<decltype(tag)>(stream, s, x.untyped_data(), w.untyped_data(), counts.typed_data(),
                                         indices.typed_data(), y->untyped_data(), bias_or_null(bias), y_transposed,
                                         workspace->typed_data(), x_transposed);
  }, &known);
  return dispatch_outcome("pit_sparse_dense", known, err);
}

// y = x @ w with x's 32x1 micro-tiles detected inside (no index operand): the lowering's choice
// when sparse_dense detects its own index (pit_jax/kgather_cuda.py says when).
ffi::Error SparseDenseDetectCuda(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer bias,
                                 ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::Buffer<ffi::U8>> workspace,
                                 bool y_transposed) {
  const auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("pit_sparse_dense_detect: w must be a matrix [K, N]");
  MatrixView xv;
  if (!matrix_view(x.dimensions(), &xv)) return ffi::Error::InvalidArgument("pit_sparse_dense_detect: x must have rank >= 2");
  const KGatherShape s = make_kgather_shape(xv.batch, xv.rows, xv.cols, wd[1], kGroupRows, 1);
  if (!fits_launch_limits(s, ForwardConfig<float>::kBN))
    return ffi::Error::InvalidArgument("pit_sparse_dense_detect: x and w are too large for one launch; split the batch");
  const std::string operands = check_forward_operands("pit_sparse_dense_detect", s, x, w, bias, *y, y_transposed);
  if (!operands.empty()) return ffi::Error::InvalidArgument(operands);
  const int64_t elem = ffi::ByteWidth(x.element_type());
  if (!rows_are_16_byte_vectors(x, s))
    return ffi::Error::InvalidArgument("pit_sparse_dense_detect: x's rows must be whole 16-byte vectors");
  if (element_count(workspace->dimensions()) != s.forward_workspace_bytes(elem) + s.all_groups() * 4)
    return ffi::Error::InvalidArgument("pit_sparse_dense_detect: workspace size does not match the shapes");
  poison_device_outputs(stream, y, workspace);
  bool known;
  const cudaError_t err = dispatch_dtype(x.element_type(), [&](auto tag) {
    return launch_forward_detecting<decltype(tag)>(stream, s, x.untyped_data(), w.untyped_data(), y->untyped_data(),
                                                   bias_or_null(bias), y_transposed, workspace->typed_data());
  }, &known);
  return dispatch_outcome("pit_sparse_dense_detect", known, err);
}

// dW's operands: x [..., M, K] with its index, dy [..., M, N] with x's leading dims, dw [K, N],
// one dtype. Fills the shape; returns an error message or "".
// dW's operands beside x and its index (`s` made from x's shape and dy's N): dy [..., M, N] with
// x's leading dims, dw [K, N], one dtype, sizes within one launch. Returns an error message or "".
std::string check_tn_dy_and_dw(const char* op, ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer dw,
                               const KGatherShape& s) {
  if (!fits_launch_limits(s, TnConfig<float>::kBN))
    return std::string(op) + ": x and dy are too large for one launch; split the batch";
  const auto dyd = dy.dimensions();
  for (size_t i = 0; i + 1 < dyd.size(); ++i)
    if (dyd[i] != x.dimensions()[i]) return std::string(op) + ": dy's leading dims and M must match x's";
  if (dy.element_type() != x.element_type() || dw.element_type() != x.element_type())
    return std::string(op) + ": x, dy and dw must share one dtype";
  if (!same_dims(dw.dimensions(), {s.k, s.n})) return std::string(op) + ": dw must be [K, N]";
  return "";
}

// dy's rank against x's (whose shape then gives `s`).
bool dy_rank_matches(ffi::AnyBuffer x, ffi::AnyBuffer dy) {
  return dy.dimensions().size() == x.dimensions().size() && dy.dimensions().size() >= 2;
}

std::string check_tn_operands(const char* op, ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer::Dimensions counts,
                              ffi::AnyBuffer::Dimensions indices, ffi::AnyBuffer dw, int64_t tile_m, int64_t tile_k,
                              KGatherShape* s) {
  if (!dy_rank_matches(x, dy)) return std::string(op) + ": dy must be [..., M, N] with x's leading dims";
  const auto dyd = dy.dimensions();
  const std::string msg = check_kgather(op, x, counts, indices, dyd[dyd.size() - 1], tile_m, tile_k, s);
  if (!msg.empty()) return msg;
  return check_tn_dy_and_dw(op, x, dy, dw, *s);
}

// The products path's limits (kgather_dw_products.cuh): row groups, the scratch's row cap and slab width.
std::string check_products_plan(const char* op, const KGatherShape& s, int64_t cap_rows, int64_t n_slab) {
  if (s.all_groups() > kProductsMaxGroups)
    return std::string(op) + ": more row groups than the products path takes; use pit_sparse_tn";
  if (cap_rows < 0 || n_slab <= 0 || n_slab % kProductsN != 0 || cap_rows * n_slab > (int64_t(1) << 40))
    return std::string(op) + ": cap_rows must be >= 0 and n_slab a positive multiple of 128";
  return "";
}

ffi::Error SparseTnCuda(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Buffer<ffi::S32> counts,
                        ffi::Buffer<ffi::S32> indices, ffi::Result<ffi::AnyBuffer> dw,
                        ffi::Result<ffi::Buffer<ffi::U8>> workspace, int64_t tile_m, int64_t tile_k) {
  KGatherShape s;
  const std::string msg = check_tn_operands("pit_sparse_tn", x, dy, counts.dimensions(), indices.dimensions(), *dw,
                                            tile_m, tile_k, &s);
  if (!msg.empty()) return ffi::Error::InvalidArgument(msg);
  if (element_count(workspace->dimensions()) != s.tn_workspace_bytes())
    return ffi::Error::InvalidArgument("pit_sparse_tn: workspace size does not match the shapes");
  poison_device_outputs(stream, dw, workspace);
  bool known;
  const cudaError_t err = dispatch_dtype(x.element_type(), [&](auto tag) {
    return launch_tn<decltype(tag)>(stream, s, x.untyped_data(), dy.untyped_data(), counts.typed_data(),
                                    indices.typed_data(), dw->untyped_data(), workspace->typed_data());
  }, &known);
  return dispatch_outcome("pit_sparse_tn", known, err);
}

// dW with the products path for very sparse x (bf16/fp16): pit_sparse_tn's operands, and the
// scratch's row cap and slab width (pit_jax/kgather_cuda.py picks both from the shapes).
ffi::Error SparseTnProductsCuda(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                                ffi::Buffer<ffi::S32> counts, ffi::Buffer<ffi::S32> indices,
                                ffi::Result<ffi::AnyBuffer> dw, ffi::Result<ffi::Buffer<ffi::U8>> workspace,
                                int64_t tile_m, int64_t tile_k, int64_t cap_rows, int64_t n_slab,
                                bool masked_fallback) {
  constexpr const char* op = "pit_sparse_tn_products";
  KGatherShape s;
  const std::string msg = check_tn_operands(op, x, dy, counts.dimensions(), indices.dimensions(), *dw, tile_m, tile_k,
                                            &s);
  if (!msg.empty()) return ffi::Error::InvalidArgument(msg);
  const std::string plan = check_products_plan(op, s, cap_rows, n_slab);
  if (!plan.empty()) return ffi::Error::InvalidArgument(plan);
  const int64_t elem = ffi::ByteWidth(x.element_type());
  if (element_count(workspace->dimensions()) != products_workspace_bytes(s, elem, cap_rows, n_slab))
    return ffi::Error::InvalidArgument(std::string(op) + ": workspace size does not match the shapes");
  poison_device_outputs(stream, dw, workspace);
  bool known;
  const cudaError_t err = dispatch_16bit_dtype(x.element_type(), [&](auto tag) {  // fp32: the lowering calls pit_sparse_tn
    return launch_tn_products<decltype(tag)>(stream, s, x.untyped_data(), dy.untyped_data(), counts.typed_data(),
                                             indices.typed_data(), dw->untyped_data(), workspace->typed_data(), cap_rows,
                                             n_slab, masked_fallback);
  }, &known);
  return dispatch_outcome(op, known, err);
}

// dW with the products path for an index detected from x inside (32x1 tiles; PIT_KGATHER_DW=device
// when sparse_dense detected its own index): x and dy only. The scratch is pit_sparse_tn_products'
// then one count per group.
ffi::Error SparseTnProductsDetectCuda(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                                      ffi::Result<ffi::AnyBuffer> dw, ffi::Result<ffi::Buffer<ffi::U8>> workspace,
                                      int64_t cap_rows, int64_t n_slab) {
  constexpr const char* op = "pit_sparse_tn_products_detect";
  MatrixView xv;
  if (!matrix_view(x.dimensions(), &xv)) return ffi::Error::InvalidArgument(std::string(op) + ": x must have rank >= 2");
  if (!dy_rank_matches(x, dy))
    return ffi::Error::InvalidArgument(std::string(op) + ": dy must be [..., M, N] with x's leading dims");
  const auto dyd = dy.dimensions();
  const KGatherShape s = make_kgather_shape(xv.batch, xv.rows, xv.cols, dyd[dyd.size() - 1], kGroupRows, 1);
  std::string msg = check_tn_dy_and_dw(op, x, dy, *dw, s);
  if (msg.empty()) msg = check_products_plan(op, s, cap_rows, n_slab);
  if (!msg.empty()) return ffi::Error::InvalidArgument(msg);
  if (!rows_are_16_byte_vectors(x, s))
    return ffi::Error::InvalidArgument(std::string(op) + ": x's rows must be whole 16-byte vectors");
  const int64_t elem = ffi::ByteWidth(x.element_type());
  if (element_count(workspace->dimensions()) != products_workspace_bytes(s, elem, cap_rows, n_slab) + s.all_groups() * 4)
    return ffi::Error::InvalidArgument(std::string(op) + ": workspace size does not match the shapes");
  poison_device_outputs(stream, dw, workspace);
  bool known;
  const cudaError_t err = dispatch_16bit_dtype(x.element_type(), [&](auto tag) {  // fp32: not called with it
    return launch_tn_products_detecting<decltype(tag)>(stream, s, x.untyped_data(), dy.untyped_data(),
                                                       dw->untyped_data(), workspace->typed_data(), cap_rows, n_slab);
  }, &known);
  return dispatch_outcome(op, known, err);
}

// x's masked cotangent (dense_sparse's weight gradient, kgather_nt.cuh): dy [..., M, N], w [K, N]
// and x's index give out [..., M, K] = dy @ wᵀ on the listed tiles, zero elsewhere.
ffi::Error SparseNtCuda(cudaStream_t stream, ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Buffer<ffi::S32> counts,
                        ffi::Buffer<ffi::S32> indices, ffi::Result<ffi::AnyBuffer> out, int64_t tile_m, int64_t tile_k) {
  constexpr const char* op = "pit_sparse_nt";
  const auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument(std::string(op) + ": w must be a matrix [K, N]");
  KGatherShape s;  // out has x's shape [..., M, K]
  const std::string msg = check_kgather(op, *out, counts.dimensions(), indices.dimensions(), wd[1], tile_m, tile_k, &s);
  if (!msg.empty()) return ffi::Error::InvalidArgument(msg);
  if (wd[0] != s.k) return ffi::Error::InvalidArgument(std::string(op) + ": w's rows must equal out's columns (K)");
  const auto dyd = dy.dimensions(), od = out->dimensions();
  bool dy_ok = dyd.size() == od.size() && dyd[dyd.size() - 1] == s.n;
  for (size_t i = 0; dy_ok && i + 1 < dyd.size(); ++i) dy_ok = dyd[i] == od[i];
  if (!dy_ok) return ffi::Error::InvalidArgument(std::string(op) + ": dy must be [..., M, N] with out's leading dims and M");
  if (dy.element_type() != w.element_type() || out->element_type() != w.element_type())
    return ffi::Error::InvalidArgument(std::string(op) + ": dy, w and out must share one dtype");
  if (s.all_groups() >= (int64_t(1) << 31) || ceil_div(s.nb_k * s.tile_k, int64_t(NtConfig<float>::kBL)) > 65535)
    return ffi::Error::InvalidArgument(std::string(op) + ": too many row groups or columns for one launch; split the batch");
  poison_device_outputs(stream, out);
  bool known;
  const cudaError_t err = dispatch_dtype(w.element_type(), [&](auto tag) {
    return launch_nt<decltype(tag)>(stream, s, dy.untyped_data(), w.untyped_data(), counts.typed_data(),
                                    indices.typed_data(), out->untyped_data());
  }, &known);
  return dispatch_outcome(op, known, err);
}

}  // namespace
}  // namespace pit

// Launch shapes depend only on static shapes, so XLA may capture these handlers in CUDA graphs.
// The stream and two operands (x and w, or x and dy): every target's first arguments.
#define PIT_KGATHER_TWO_OPERANDS                                            \
  xla::ffi::Ffi::Bind()                                                     \
      .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()                        \
      .Arg<xla::ffi::AnyBuffer>()                                           \
      .Arg<xla::ffi::AnyBuffer>()
// ... then the sparse operand's index (counts, indices).
#define PIT_KGATHER_INDEXED_OPERANDS                                        \
  PIT_KGATHER_TWO_OPERANDS                                                  \
      .Arg<xla::ffi::Buffer<xla::ffi::S32>>()                               \
      .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
// An output and its workspace.
#define PIT_KGATHER_RESULT_AND_WORKSPACE                                    \
  .Ret<xla::ffi::AnyBuffer>().Ret<xla::ffi::Buffer<xla::ffi::U8>>()
#define PIT_KGATHER_TILE_ATTRS .Attr<int64_t>("tile_m").Attr<int64_t>("tile_k")
#define PIT_KGATHER_BINDING PIT_KGATHER_INDEXED_OPERANDS PIT_KGATHER_RESULT_AND_WORKSPACE PIT_KGATHER_TILE_ATTRS

// The forward: x, w, its index, then the bias (an empty buffer for none).
XLA_FFI_DEFINE_HANDLER_SYMBOL(PitSparseDenseCuda, pit::SparseDenseCuda,
                              PIT_KGATHER_INDEXED_OPERANDS.Arg<xla::ffi::AnyBuffer>()
                                  PIT_KGATHER_RESULT_AND_WORKSPACE PIT_KGATHER_TILE_ATTRS
                                  .Attr<bool>("x_transposed")
                                  .Attr<bool>("y_transposed"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(PitSparseTnCuda, pit::SparseTnCuda, PIT_KGATHER_BINDING,
                              {xla::ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(PitSparseTnProductsCuda, pit::SparseTnProductsCuda,
                              PIT_KGATHER_BINDING.Attr<int64_t>("cap_rows").Attr<int64_t>("n_slab").Attr<bool>("masked_fallback"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
// The targets that detect x's 32x1 tiles themselves: x and w (forward) or dy (dW), no index.
XLA_FFI_DEFINE_HANDLER_SYMBOL(PitSparseTnProductsDetectCuda, pit::SparseTnProductsDetectCuda,
                              PIT_KGATHER_TWO_OPERANDS PIT_KGATHER_RESULT_AND_WORKSPACE
                                  .Attr<int64_t>("cap_rows").Attr<int64_t>("n_slab"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
// ... the forward's with the bias (an empty buffer for none) after w.
XLA_FFI_DEFINE_HANDLER_SYMBOL(PitSparseDenseDetectCuda, pit::SparseDenseDetectCuda,
                              PIT_KGATHER_TWO_OPERANDS.Arg<xla::ffi::AnyBuffer>()
                                  PIT_KGATHER_RESULT_AND_WORKSPACE
                                  .Attr<bool>("y_transposed"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
// x's masked cotangent: no workspace.
XLA_FFI_DEFINE_HANDLER_SYMBOL(PitSparseNtCuda, pit::SparseNtCuda,
                              PIT_KGATHER_INDEXED_OPERANDS.Ret<xla::ffi::AnyBuffer>() PIT_KGATHER_TILE_ATTRS,
                              {xla::ffi::Traits::kCmdBufferCompatible});
