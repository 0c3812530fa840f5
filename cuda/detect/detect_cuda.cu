// Micro-tile detection, CUDA kernels and FFI handler.
//
// No host synchronisation and no atomics on any output, so the index order is fixed
// (ascending). Every path but the one-pass path runs two passes, the compaction chosen from the
// shape alone:
//  mask (the first pass): the only read of x, 16-byte coalesced loads with 8 or 16 in flight per
//     lane; per 32-row slab of each row block, a bitmask of the columns holding a nonzero
//     (1/(16*32) of x's bytes for bf16 with tile_m >= 32).
//  per-row path (enough outer blocks, or few chunks each): one CTA per outer block ORs the
//     mask bits under each micro-tile, block-scans the flags chunk by chunk, writes ids, -1
//     padding and the count; the last CTA of each batch element scans the counts into offsets.
//  chunked path (few outer blocks with very many inner blocks, e.g. rows of a long sequence):
//     count per chunk -> scan of chunk counts per batch element -> scatter per chunk, so every
//     pass stays parallel whatever the aspect ratio.
//  row-bits path (column layout, tiles spanning whole warp column spans, e.g. 1 x K): the mask
//     pass ORs each row block over its warp's columns into one bit, so the compaction reads
//     1/4096 of x's bytes: segments of 256 row blocks, a CTA each, that count the blocks before
//     them from all the words (one column block, short row blocks, small masks), else one CTA
//     per column block.
//  one-pass path, instead of the mask pass and a compaction (row layout, 32-row blocks, tile_k
//     dividing 32, at least 512 row blocks over the batch, a block's mask words at most
//     kOnePassMaxWords = 11264): one CTA per row block reads it (the same folding as the mask
//     pass), keeps its mask words in shared memory and compacts them at once; a dependent kernel
//     scans the counts into offsets.
#include <cuda_runtime.h>

#include <cstdlib>
#include <utility>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "../common/ffi_common.h"
#include "../common/pdl.cuh"
#include "../common/poison_outputs.cuh"
#include "detect_layout.h"

// Rows loaded per lane before the first is used in the mask pass: 16 when the pass has more warps
// than an H100/H200 holds at once (16384² bf16 32x1: 184 vs 193 us on an H200), else 8 (4096²:
// 8 as fast or faster in an A/B run); PIT_DETECT_IN_FLIGHT=8 or 16 forces one (read per launch).
constexpr int64_t kManyMaskWarps = 132 * 64;

namespace pit {
namespace {

constexpr int kMaskWarps = 8;         // warps per CTA in the mask pass
constexpr int kMaskRows = 32;         // rows one warp folds in the mask pass (a "slab")
constexpr int kThreads = 256;         // threads per CTA in the compaction passes
constexpr int kItems = 16;            // narrow tiles per thread per chunk (4096 per chunk)
constexpr int kWideItems = 4;         // wide tiles per warp per chunk (32 per chunk)
constexpr int kScanThreads = 1024;    // threads of the per-batch chunk scan
constexpr int64_t kWideWords = 8;     // tiles spanning this many mask words (slabs x words) are
                                      // tested by a whole warp, lanes over the words
constexpr int64_t kWarpRowsNarrow = 32;  // rows of at most this many narrow tiles: a warp per row
constexpr int64_t kWarpRowsWide = 4;     // ... or this many wide tiles
// Word rows of one slab (tile_m <= 32) whose batch element has at most this many mask words
// (4096² bf16 at 32x1) write their CSR offsets without a last-CTA scan: each CTA sums the counts
// of the row blocks before it from their mask words (at most 64 KB of L2 reads per CTA).
constexpr int64_t kPrefixMaxWords = 16384;
// Row-bits compaction: one CTA per (batch, column block) loops over its row blocks, kThreads *
// kItems per step; at most this many steps, else the chunked path (which stays parallel).
constexpr int64_t kRowBitsMaxSteps = 16;
// ... or, with one column block of row blocks of at most 32 rows whose row-bits words number at most
// this many per batch element (4096² at 1 x 4096: 2048), kThreads row blocks per CTA: each CTA
// counts the nonzero blocks before its segment from all the words (<= 64 KB of L2 reads).
constexpr int64_t kSegmentMaxWords = 16384;

// Scratch layout (32-bit words), shared with Python's workspace size (detect.py):
//   slab_mask    [B, nb_m, n_slabs, n_words]  bit c of word w: column 32w+c of that slab of row
//                                             block i holds a nonzero (slab = 32 rows)
//   chunk_prefix [B, n_outer, n_chunks]       chunked path: tiles per chunk, then their scan
//   done         [B]                          per-row path: CTAs finished, for the offsets scan
// or, on the row-bits path, in place of slab_mask (it is never larger):
//   row_bits     [B, n_row_tasks, n_col_chunks] bit q: the q-th row block of that mask task
//                                             (tile_m >= 32: its slab) has a nonzero in the
//                                             task's 32*V columns
// One-pass word rows (Plan::one_pass): a CTA's mask words, in shared memory, at most this many
// (44 KB: with the static shared memory, under the 48 KB a launch may take without opting in);
// by default only for 32-row blocks and at least this many CTAs (one per row block). In an A/B on
// an H200 (session 28) 16384² at 32x1 (512 CTAs) took 166 / 181 us against the two passes' 171 /
// 188 (90% sparse / dense), but 4096² (128 CTAs: one per SM reads slower than the mask pass's 256)
// 18.2 against 17.7, and 1x1 tiles (32 row blocks compacted in turn per CTA) 90 against 55.
constexpr int64_t kOnePassMaxWords = 11264;
constexpr int64_t kOnePassMinCtas = 512;
// Word rows: a warp writes its ids word by word (coalesced) when some lane has more ids than this.
constexpr unsigned kWarpIdsMinBits = 16;

struct Plan {
  int64_t batch, rows, cols, tile_m, tile_k, layout;
  int64_t nb_m, nb_k, n_outer, n_inner, n_words, n_slabs, chunk, n_chunks;
  bool row_bits;         // column layout whose tiles cover whole mask tasks: the row-bits path
  bool row_bit_segments; // row_bits, compacted by segments of kThreads row blocks (many CTAs per column block)
  bool wide;
  bool word_rows;     // row layout with tile_k dividing 32: compact whole mask words at a time
  uint32_t tile_starts;  // bits 0, tile_k, 2*tile_k, ... (for word_rows)
  bool prefix_offsets;   // word_rows, small mask: offsets from each CTA's own prefix count
  bool serial_prefix = false;  // prefix_offsets: sum the prefix before the compaction (A/Bs only)
  bool warp_ids = true;        // word rows: dense warps write ids a word per step (0: each thread its own word's)
  // The row-bits fields are small and the task counts derived (below), so that the struct stays at
  // 128 bytes: with three more 8-byte fields ptxas spilled 12 bytes in the narrow rows kernel.
  uint16_t chunk_cols;   // columns one mask warp covers: 32 lanes x 16 bytes
  bool one_pass;         // word rows of one slab: read and compacted by one kernel (see below)
  Plan(const DetectShape& s, int64_t layout_, int64_t elem_bytes)
      : batch(s.batch), rows(s.rows), cols(s.cols), tile_m(s.tile_m), tile_k(s.tile_k), layout(layout_) {
    nb_m = s.nb_m();
    nb_k = s.nb_k();
    n_outer = s.n_outer(layout);
    n_inner = s.n_inner(layout);
    n_words = ceil_div(cols, 32);
    n_slabs = ceil_div(tile_m, kMaskRows);
    // mask words under one tile: slabs x the 32-column words its span touches (at most)
    const int64_t tile_words = tile_k % 32 == 0 ? tile_k / 32 : ceil_div(tile_k - 1, 32) + 1;
    wide = n_slabs * tile_words >= kWideWords;
    word_rows = layout == kRowMajor && 32 % tile_k == 0;
    tile_starts = 0;
    for (int64_t bit = 0; bit < 32; bit += tile_k) tile_starts |= 1u << bit;
    prefix_offsets = word_rows && n_slabs == 1 && n_words % 4 == 0 && n_outer * n_words <= kPrefixMaxWords;
    // Narrow tiles of 2 or 4 whole mask words (tile_k 64 or 128) of at most 64 rows (e.g. 64x64), in rows of one step:
    // the same per-CTA prefix count, over the slab-ORed words of the row blocks before.
    const int64_t group = tile_k / 32;
    prefix_offsets = prefix_offsets ||
                     (layout == kRowMajor && tile_k % 32 == 0 && (group == 2 || group == 4) && !wide &&
                      n_slabs <= 2 && n_inner <= kThreads && n_words % 4 == 0 &&
                      n_outer * n_slabs * n_words <= kPrefixMaxWords);
    chunk = wide ? (kThreads / 32) * kWideItems : kThreads * kItems;
    n_chunks = ceil_div(n_inner, chunk);
    chunk_cols = uint16_t(32 * (16 / elem_bytes));
    // Each tile must cover whole mask tasks' columns (one tile column, or widths that are a
    // multiple of a task's), and one CTA per column block must have few steps or many peers.
    row_bits = layout == kColMajor && (nb_k == 1 || tile_k % chunk_cols == 0) &&
               (ceil_div(nb_m, int64_t(kThreads) * kItems) <= kRowBitsMaxSteps || batch * nb_k >= 1024);
    row_bit_segments = row_bits && nb_k == 1 && n_slabs == 1 && nb_m > kThreads &&
                       n_row_tasks() * n_col_chunks() <= kSegmentMaxWords;
    one_pass = one_pass_fits() && tile_m == kMaskRows && batch * n_row_tasks() >= kOnePassMinCtas;
  }
  // The one-pass kernel applies to word rows of one slab whose mask words fit in shared memory.
  bool one_pass_fits() const {
    return word_rows && n_slabs == 1 && blocks_per_task() * n_words <= kOnePassMaxWords;
  }
  // A mask task covers 32 // tile_m row blocks (tile_m < 32), or one slab of a row block.
  PIT_HOST_DEVICE int64_t blocks_per_task() const { return tile_m >= kMaskRows ? 1 : kMaskRows / tile_m; }
  PIT_HOST_DEVICE int64_t tasks_per_block() const { return tile_m >= kMaskRows ? n_slabs : 1; }
  PIT_HOST_DEVICE int64_t n_row_tasks() const { return ceil_div(nb_m, blocks_per_task()) * tasks_per_block(); }
  PIT_HOST_DEVICE int64_t n_col_chunks() const { return ceil_div(cols, int64_t(chunk_cols)); }  // ... across the columns
  PIT_HOST_DEVICE int64_t n_segments() const { return ceil_div(nb_m, int64_t(kThreads)); }
  int64_t mask_words() const { return batch * nb_m * n_slabs * n_words; }
  int64_t chunk_words() const { return batch * n_outer * n_chunks; }
  int64_t workspace_words() const { return mask_words() + chunk_words() + batch; }
  // One CTA per outer block (a loop over its chunks) when that gives enough CTAs or few steps;
  // otherwise count -> scan -> scatter over chunks, which stays parallel for one huge outer block.
  bool per_row() const { return n_chunks <= 8 || batch * n_outer >= 1024; }
  // Short rows (a few tiles): one warp per outer block instead of one CTA.
  bool warp_rows() const { return !word_rows && n_inner <= (wide ? kWarpRowsWide : kWarpRowsNarrow); }
};

static_assert(sizeof(Plan) <= 128, "see Plan's row-bits fields");

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

// One lane's 16 bytes at column c0 of rows [r0, r1) of `base`, folded into one bit per element:
// every `step` rows (the last group may be shorter) emit(bits) gets the OR of the group's rows.
// kInFlight rows are loaded before the first is used (streaming loads); rows that are not 16-byte
// aligned, and tail rows, take scalar loads. Shared by the mask pass and the one-pass kernel.
template <typename Bits, int kInFlight, typename Emit>
__device__ __forceinline__ void fold_rows(const Bits* __restrict__ base, int64_t cols, int64_t c0, bool in_cols,
                                          bool vectorized, int64_t r0, int64_t r1, int64_t step, Emit&& emit) {
  constexpr int V = 16 / sizeof(Bits);
  constexpr Bits kMag = static_cast<Bits>(~(Bits(1) << (sizeof(Bits) * 8 - 1)));
  int64_t end_row = min(r1, r0 + step);
  uint32_t bits = 0;
  for (int64_t r = r0; r < r1; r += kInFlight) {
    uint32_t row_bits[kInFlight];
    if (vectorized && r + kInFlight <= r1) {  // fast path: kInFlight unconditional 16-byte loads in flight
      uint4 v[kInFlight];
      if (in_cols) {
#pragma unroll
        for (int u = 0; u < kInFlight; ++u) v[u] = __ldcs(reinterpret_cast<const uint4*>(base + (r + u) * cols + c0));
      } else {
#pragma unroll
        for (int u = 0; u < kInFlight; ++u) v[u] = make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) row_bits[u] = nonzero_bits<Bits>(v[u]);
    } else {  // tail rows, or rows that are not 16-byte aligned: scalar loads
      const int64_t n = in_cols ? min(int64_t(V), cols - c0) : 0;
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        row_bits[u] = 0;
        if (r + u < r1)
          for (int e = 0; e < n; ++e) row_bits[u] |= uint32_t((base[(r + u) * cols + c0 + e] & kMag) != 0) << e;
      }
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      if (r + u >= r1) break;  // uniform per warp
      bits |= row_bits[u];
      if (r + u + 1 == end_row) {  // uniform per warp
        emit(bits);
        bits = 0;
        end_row = min(r1, end_row + step);
      }
    }
  }
}

// The 32-column mask word holding this lane's V element bits, assembled over the 32 / V lanes
// that share it (every one of them gets the word; the first of them stores it).
template <typename Bits>
__device__ __forceinline__ uint32_t lane_word(uint32_t bits, int lane) {
  constexpr int V = 16 / sizeof(Bits);
  uint32_t word = bits << ((lane * V) & 31);
#pragma unroll
  for (int off = 1; off < 32 / V; off <<= 1) word |= __shfl_xor_sync(0xffffffffu, word, off);
  return word;
}

// Programmatic dependent launch (common/pdl.cuh): both passes may be scheduled before the
// previous kernel on the stream ends; the mask pass lets the compaction's CTAs launch as soon as
// all of its own are running.

// Pass 1, the only read of x. One warp per (batch, slab of up to 32 rows, 32*V columns); each
// lane owns V columns and loads 16 bytes per row with 8 rows in flight; at the end of each row
// block (tile_m < 32: a slab holds 32/tile_m whole row blocks) or slab (tile_m >= 32: a row block
// holds several slabs) the warp assembles 32-column words and stores them. Every mask word is
// written, so no zeroing pass is needed. Block 0 also zeroes the per-batch `done` counters used
// by the per-row compaction, which runs after this kernel.
// kRowBits (Plan::row_bits): instead of 32-column words, the warp ORs each row block (or slab)
// over all its columns into bit q of one word per task, written by lane 0 at the end.
template <typename Bits, int kInFlight, bool kRowBits>
__global__ void __launch_bounds__(kMaskWarps * 32)
    pit_detect_mask_kernel(const Bits* __restrict__ x, uint32_t* __restrict__ slab_mask,
                           uint32_t* __restrict__ done, int64_t batch, int64_t rows, int64_t cols,
                           int64_t tile_m, int64_t nb_m, int64_t n_slabs, int64_t n_words,
                           int64_t n_row_tasks, int64_t n_col_chunks, bool vectorized) {
  constexpr int V = 16 / sizeof(Bits);
  const int lane = threadIdx.x & 31;
  wait_for_previous_grid();  // whatever wrote x (and last used this workspace)
  allow_dependent_launch();
  if (blockIdx.x == 0)
    for (int64_t t = threadIdx.x; t < batch; t += blockDim.x) done[t] = 0;
  const int64_t task = int64_t(blockIdx.x) * kMaskWarps + (threadIdx.x >> 5);
  if (task >= batch * n_row_tasks * n_col_chunks) return;  // uniform per warp
  const int64_t col_chunk = task % n_col_chunks;
  const int64_t row_task = task / n_col_chunks;
  const int64_t b = row_task / n_row_tasks, rt = row_task % n_row_tasks;
  int64_t r0, r1, out_row;  // rows [r0, r1); out_row: slab-mask row of the first output
  if (tile_m >= kMaskRows) {
    const int64_t i = rt / n_slabs, sl = rt % n_slabs;
    r0 = i * tile_m + sl * kMaskRows;
    r1 = min(min(rows, (i + 1) * tile_m), r0 + kMaskRows);
    out_row = (b * nb_m + i) * n_slabs + sl;
  } else {
    const int64_t blocks_per_task = kMaskRows / tile_m;
    r0 = rt * blocks_per_task * tile_m;
    r1 = min(rows, r0 + blocks_per_task * tile_m);
    out_row = b * nb_m + rt * blocks_per_task;  // n_slabs == 1
  }
  const int64_t c0 = col_chunk * 32 * V + int64_t(lane) * V;
  const bool in_cols = c0 < cols;
  const Bits* base = x + b * rows * cols;
  const int64_t w = (col_chunk * 32 * V + int64_t(lane) * V) >> 5;
  const bool writer = lane % (32 / V) == 0 && w < n_words;

  uint32_t row_word = 0;  // kRowBits: bit q = the q-th emitted block has a nonzero
  int q = 0;
  // Emit the word of the block (or slab) that ends at `end_row`, then move to the next one.
  auto emit = [&](uint32_t bits) {
    if constexpr (kRowBits) {
      row_word |= uint32_t(__any_sync(0xffffffffu, bits != 0)) << q++;
    } else {
      const uint32_t word = lane_word<Bits>(bits, lane);
      if (writer) slab_mask[out_row * n_words + w] = word;
      ++out_row;
    }
  };
  auto store_row_word = [&] {
    if (kRowBits && lane == 0) slab_mask[row_task * n_col_chunks + col_chunk] = row_word;
  };
  if (r0 >= r1) {  // a slab past the end of a short last row block: its word is still written
    emit(0);
    store_row_word();
    return;
  }
  const int64_t step = tile_m >= kMaskRows ? r1 - r0 : tile_m;  // rows per emitted word
  fold_rows<Bits, kInFlight>(base, cols, c0, in_cols, vectorized, r0, r1, step, emit);
  store_row_word();
}

// Mask of the bits of word w that fall in columns [lo, hi).
__device__ __forceinline__ uint32_t span_bits(int64_t w, int64_t lo, int64_t hi) {
  uint32_t m = ~0u;
  if (w == (lo >> 5)) m &= ~0u << (lo & 31);
  if (w == ((hi - 1) >> 5)) {
    const int last = int((hi - 1) & 31) + 1;
    m &= last == 32 ? ~0u : ((1u << last) - 1u);
  }
  return m;
}

// Flags of the tiles in one chunk of one outer block, in blocked order (thread t holds items
// t*kItems..). Narrow tiles: one thread per tile. Wide tiles: one warp per tile, lanes over
// words, results on lane 0 (other lanes hold 0, which keeps the scan order).
// Whether tile (i, j) has a nonzero: OR of the slab-mask bits under it. One thread. kAll: read
// every word (no early exit, so the loads overlap: a thread with one tile); otherwise stop at the
// first nonzero word (fewer registers: a thread with many tiles).
template <bool kAll = false>
__device__ __forceinline__ bool tile_nonzero(const Plan& p, const uint32_t* __restrict__ slab_mask,
                                             int64_t b, int64_t i, int64_t j) {
  const uint32_t* m = slab_mask + (b * p.nb_m + i) * p.n_slabs * p.n_words;
  const int64_t lo = j * p.tile_k, hi = min(p.cols, lo + p.tile_k);
  uint32_t any = 0;
  for (int64_t s = 0; s < p.n_slabs; ++s, m += p.n_words)
    for (int64_t w = lo >> 5; w <= ((hi - 1) >> 5); ++w) {
      any |= m[w] & span_bits(w, lo, hi);
      if (!kAll && any) return true;
    }
  return any != 0;
}

// The same for a wide tile, by a whole warp (lanes over its slabs x words, so a tall tile's
// slabs are read in parallel too); the result is warp-uniform.
__device__ __forceinline__ bool wide_tile_nonzero(const Plan& p, const uint32_t* __restrict__ slab_mask,
                                                  int64_t b, int64_t i, int64_t j, int lane) {
  const uint32_t* m = slab_mask + (b * p.nb_m + i) * p.n_slabs * p.n_words;
  const int64_t lo = j * p.tile_k, hi = min(p.cols, lo + p.tile_k);
  const int64_t w_lo = lo >> 5;
  const int n_w = int(((hi - 1) >> 5) - w_lo + 1), n = int(p.n_slabs) * n_w;  // < 2^31: the mask's size
  uint32_t any = 0;
  for (int t = lane; t < n; t += 32) {
    const int64_t w = w_lo + t % n_w;
    any |= m[int64_t(t / n_w) * p.n_words + w] & span_bits(w, lo, hi);
  }
  return __any_sync(0xffffffffu, any != 0);
}

// Inner-block id of item k of this thread in chunk c (blocked order, so scans keep it sorted).
template <bool kWide>
__device__ __forceinline__ int64_t item_id(const Plan& p, int64_t c, int k) {
  return kWide ? c * p.chunk + int64_t(threadIdx.x >> 5) * kWideItems + k
               : c * p.chunk + int64_t(threadIdx.x) * kItems + k;
}

template <bool kWide>
__device__ __forceinline__ void chunk_flags(const Plan& p, const uint32_t* __restrict__ slab_mask,
                                            int64_t b, int64_t o, int64_t c, int (&flags)[kItems]) {
  const bool row_major = p.layout == kRowMajor;
  if (!kWide) {
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t inner = item_id<false>(p, c, k);
      flags[k] = inner < p.n_inner &&
                 tile_nonzero(p, slab_mask, b, row_major ? o : inner, row_major ? inner : o);
    }
  } else {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int k = 0; k < kItems; ++k) flags[k] = 0;
#pragma unroll
    for (int k = 0; k < kWideItems; ++k) {
      const int64_t inner = item_id<true>(p, c, k);
      const bool nz = inner < p.n_inner &&  // uniform per warp
                      wide_tile_nonzero(p, slab_mask, b, row_major ? o : inner, row_major ? inner : o, lane);
      flags[k] = nz && lane == 0;
    }
  }
}

// Pass 2: nonzero tiles per (batch, outer block, chunk).
template <bool kWide>
__global__ void __launch_bounds__(kThreads)
    pit_detect_count_kernel(Plan p, const uint32_t* __restrict__ slab_mask, int32_t* __restrict__ chunk_counts) {
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  const int64_t flat = blockIdx.x;  // (b * n_outer + o) * n_chunks + c
  const int64_t c = flat % p.n_chunks, bo = flat / p.n_chunks;
  int flags[kItems];
  chunk_flags<kWide>(p, slab_mask, bo / p.n_outer, bo % p.n_outer, c, flags);
  const int total = Reduce(storage).Sum(flags);
  if (threadIdx.x == 0) chunk_counts[flat] = total;
}

// Pass 3, one CTA per batch element: exclusive scan of its chunk counts in place (so each chunk
// knows where its tiles go), then counts and CSR offsets per outer block.
__global__ void __launch_bounds__(kScanThreads)
    pit_detect_scan_kernel(Plan p, int32_t* __restrict__ chunk_prefix, int32_t* __restrict__ counts,
                           int32_t* __restrict__ offsets) {
  using Scan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename Scan::TempStorage storage;
  const int64_t b = blockIdx.x;
  const int64_t n = p.n_outer * p.n_chunks;
  int32_t* v = chunk_prefix + b * n;
  const int64_t run = (n + kScanThreads - 1) / kScanThreads;  // each thread scans one contiguous run
  const int64_t lo = min(n, int64_t(threadIdx.x) * run), hi = min(n, lo + run);
  int sum = 0;
  for (int64_t t = lo; t < hi; ++t) sum += v[t];
  int prefix, total;
  Scan(storage).ExclusiveSum(sum, prefix, total);
  for (int64_t t = lo; t < hi; ++t) {
    const int x = v[t];
    v[t] = prefix;
    prefix += x;
  }
  __syncthreads();  // the block's global writes are visible to the block after the barrier
  int32_t* cnt = counts + b * p.n_outer;
  int32_t* off = offsets + b * (p.n_outer + 1);
  for (int64_t o = threadIdx.x; o < p.n_outer; o += kScanThreads) {
    const int start = v[o * p.n_chunks];
    const int end = o + 1 < p.n_outer ? v[(o + 1) * p.n_chunks] : total;
    off[o] = start;
    cnt[o] = end - start;
  }
  if (threadIdx.x == 0) off[p.n_outer] = total;
}

// -1 into out[lo, hi) by the whole CTA: 16-byte stores over the aligned middle, scalars at the ends.
__device__ __forceinline__ void fill_unused_slots(int32_t* __restrict__ out, int64_t lo, int64_t hi) {
  if (lo >= hi) return;
  const uintptr_t a_lo = reinterpret_cast<uintptr_t>(out + lo), a_hi = reinterpret_cast<uintptr_t>(out + hi);
  const uintptr_t v_lo = min(a_hi, (a_lo + 15) & ~uintptr_t(15)), v_hi = max(v_lo, a_hi & ~uintptr_t(15));
  int4* vec = reinterpret_cast<int4*>(v_lo);
  const int64_t n_vec = int64_t(v_hi - v_lo) / 16;
  for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) vec[i] = make_int4(-1, -1, -1, -1);
  const int64_t head = int64_t(v_lo - a_lo) / 4, tail = int64_t(a_hi - v_hi) / 4;  // each < 4
  if (threadIdx.x < head) out[lo + threadIdx.x] = -1;
  else if (threadIdx.x >= 4 && threadIdx.x < 4 + tail) out[hi - tail + (threadIdx.x - 4)] = -1;
}

// Pass 4: every chunk writes its nonzero tile ids in order at its scanned position, and -1 into
// the padding slots [count, n_inner) that fall in its own slot range, so each index element is
// written exactly once, by one CTA, without atomics.
template <bool kWide>
__global__ void __launch_bounds__(kThreads)
    pit_detect_scatter_kernel(Plan p, const uint32_t* __restrict__ slab_mask,
                              const int32_t* __restrict__ chunk_prefix, const int32_t* __restrict__ counts,
                              const int32_t* __restrict__ offsets, int32_t* __restrict__ indices) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage storage;
  const int64_t flat = blockIdx.x;
  const int64_t c = flat % p.n_chunks, bo = flat / p.n_chunks;
  const int64_t b = bo / p.n_outer, o = bo % p.n_outer;
  int flags[kItems], pos[kItems];
  chunk_flags<kWide>(p, slab_mask, b, o, c, flags);
  Scan(storage).ExclusiveSum(flags, pos);
  int32_t* out = indices + bo * p.n_inner;
  const int64_t base = chunk_prefix[flat] - offsets[b * (p.n_outer + 1) + o];
#pragma unroll
  for (int k = 0; k < kItems; ++k)
    if (flags[k]) out[base + pos[k]] = int32_t(item_id<kWide>(p, c, k));
  const int64_t slot_lo = max(int64_t(counts[bo]), c * p.chunk);
  const int64_t slot_hi = min(p.n_inner, (c + 1) * p.chunk);
  fill_unused_slots(out, slot_lo, slot_hi);
}

// Word rows: a mask word folded to one bit per tile — bit g*tile_k set when any column of tile g
// is nonzero, every other bit clear.
__device__ __forceinline__ uint32_t tile_start_bits(const Plan& p, uint32_t bits) {
  for (int sh = 1; sh < p.tile_k; sh <<= 1) bits |= bits >> sh;  // bit g*tk = OR of its group
  return bits & p.tile_starts;
}

// Per-row path, one CTA per (batch, outer block): loops over its chunks with a running total,
// writes ids, -1 padding and the count. The last CTA of a batch element to finish (a counter
// in scratch, zeroed by the mask pass) scans that element's counts into CSR offsets.
// Row layout, tile_k dividing 32: each thread takes one mask word (OR of the block's slabs,
// coalesced across threads), folds each tile_k-bit group onto its first bit, and writes the ids
// of the set bits at its block-scanned position. Returns the row's nonzero count.
__device__ __forceinline__ int compact_row_words(const Plan& p, const uint32_t* __restrict__ m,
                                                 int32_t* __restrict__ out) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage storage;
  int running = 0;
  for (int64_t w0 = 0; w0 < p.n_words; w0 += kThreads) {
    const int64_t w = w0 + threadIdx.x;
    uint32_t bits = 0;
    if (w < p.n_words)
      for (int64_t s = 0; s < p.n_slabs; ++s) bits |= m[s * p.n_words + w];
    bits = tile_start_bits(p, bits);
    int pos, step_total;
    Scan(storage).ExclusiveSum(__popc(bits), pos, step_total);
    // Dense words (some lane of the warp with more than kWarpIdsMinBits ids): the warp's nonzero
    // words in turn (broadcast), lane l writing the id of the word's bit l, so one store covers
    // consecutive slots. A thread writing its own word's ids strides the warp's stores by the lanes'
    // counts (32 sectors per store when dense: 4096² 1x1 took 383 us dense against 71 this way, 159
    // against 80 at half), but sparse words are faster so (60 vs 78 us at 90% sparse): fewer steps.
    if (p.warp_ids && __reduce_max_sync(0xffffffffu, unsigned(__popc(bits))) > kWarpIdsMinBits) {
      const int lane = threadIdx.x & 31;
      const uint32_t below = (1u << lane) - 1u;
      int32_t* row_out = out + running;
      for (uint32_t live = __ballot_sync(0xffffffffu, bits != 0); live; live &= live - 1) {
        const int i = __ffs(live) - 1;
        const uint32_t word = __shfl_sync(0xffffffffu, bits, i);
        const int at = __shfl_sync(0xffffffffu, pos, i);
        if ((word >> lane) & 1u) row_out[at + __popc(word & below)] = int32_t(((w - lane + i) * 32 + lane) / p.tile_k);
      }
    } else {
      int32_t* dst = out + running + pos;
      while (bits) {
        const int bit = __ffs(bits) - 1;
        *dst++ = int32_t((w * 32 + bit) / p.tile_k);
        bits &= bits - 1;
      }
    }
    running += step_total;
    __syncthreads();  // storage is reused by the next step
  }
  return running;
}

// Generic rows: chunks of kItems tiles per thread (narrow) or one warp per tile (wide).
template <bool kWide>
__device__ __forceinline__ int compact_row_tiles(const Plan& p, const uint32_t* __restrict__ slab_mask,
                                                 int64_t b, int64_t o, int32_t* __restrict__ out) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage storage;
  if (!kWide && p.n_inner <= kThreads) {  // a short row: one tile per thread, all in parallel
    const int64_t j = threadIdx.x;
    const bool row_major = p.layout == kRowMajor;
    const int flag = j < p.n_inner && tile_nonzero<true>(p, slab_mask, b, row_major ? o : j, row_major ? j : o);
    int pos, total;
    Scan(storage).ExclusiveSum(flag, pos, total);
    if (flag) out[pos] = int32_t(j);
    return total;
  }
  int running = 0;
  for (int64_t c = 0; c < p.n_chunks; ++c) {
    int flags[kItems], pos[kItems], step_total;
    chunk_flags<kWide>(p, slab_mask, b, o, c, flags);
    Scan(storage).ExclusiveSum(flags, pos, step_total);
#pragma unroll
    for (int k = 0; k < kItems; ++k)
      if (flags[k]) out[running + pos[k]] = int32_t(item_id<kWide>(p, c, k));
    running += step_total;
    __syncthreads();
  }
  return running;
}

// Row-bits path: task t's row bits ORed over column chunks [cc_lo, cc_hi) (one tile column) of one
// batch element's words `base` [n_row_tasks][n_col_chunks]; the loads are independent, so several fly.
__device__ __forceinline__ uint32_t row_bits_task_word(const Plan& p, const uint32_t* __restrict__ base, int64_t t,
                                                       int64_t cc_lo, int64_t cc_hi) {
  const uint32_t* words = base + t * p.n_col_chunks();
  uint32_t any = 0;
#pragma unroll 8
  for (int64_t cc = cc_lo; cc < cc_hi; ++cc) any |= words[cc];
  return any;
}

// One outer block per batch element: its count and the offsets [0, count], by one thread.
__device__ __forceinline__ void write_single_block_offsets(int32_t* __restrict__ counts, int32_t* __restrict__ offsets,
                                                          int64_t b, int count) {
  counts[b] = count;
  offsets[b * 2] = 0;
  offsets[b * 2 + 1] = count;
}

// Row-bits path (Plan::row_bits), column block j of batch element b: a row block's flag is the
// OR of its bit over the mask tasks under it (its 32-row group, or its slabs when tile_m >= 32)
// and the column chunks of tile column j. Thread t holds row blocks t*kItems.. of each step
// (blocked order, so the scan keeps ids sorted); consecutive row blocks of one task share its
// OR'd word. Returns the column block's nonzero count.
__device__ __forceinline__ int compact_row_bits(const Plan& p, const uint32_t* __restrict__ row_bits,
                                                int64_t b, int64_t j, int32_t* __restrict__ out) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage storage;
  const int64_t per_tile = p.nb_k == 1 ? p.n_col_chunks() : p.tile_k / p.chunk_cols;
  const int64_t cc_lo = j * per_tile, cc_hi = min(p.n_col_chunks(), cc_lo + per_tile);
  const uint32_t* base = row_bits + b * p.n_row_tasks() * p.n_col_chunks();
  const int64_t blocks_per_task = p.blocks_per_task(), tasks_per_block = p.tasks_per_block();
  int running = 0;
  for (int64_t i0 = 0; i0 < p.n_inner; i0 += int64_t(kThreads) * kItems) {
    int flags[kItems], pos[kItems], step_total;
    int64_t cached_task = -1;
    uint32_t cached = 0;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t i = i0 + int64_t(threadIdx.x) * kItems + k;
      flags[k] = 0;
      if (i >= p.n_inner) continue;
      const int64_t t0 = i / blocks_per_task * tasks_per_block;  // its first task; bit i % blocks_per_task
      if (t0 != cached_task) {
        cached = 0;
        for (int64_t t = t0; t < t0 + tasks_per_block; ++t) cached |= row_bits_task_word(p, base, t, cc_lo, cc_hi);
        cached_task = t0;
      }
      flags[k] = int((cached >> (i % blocks_per_task)) & 1u);
    }
    Scan(storage).ExclusiveSum(flags, pos, step_total);
#pragma unroll
    for (int k = 0; k < kItems; ++k)
      if (flags[k]) out[running + pos[k]] = int32_t(i0 + int64_t(threadIdx.x) * kItems + k);
    running += step_total;
    __syncthreads();  // storage is reused by the next step
  }
  return running;
}

enum RowMode { kRowsNarrow = 0, kRowsWide = 1, kRowsWords = 2, kRowsBits = 3 };

// Row-bits path by segments (Plan::row_bit_segments: one column block, n_slabs == 1), one CTA per
// (batch, segment of kThreads row blocks). Every CTA ORs each task's words over the columns and
// counts the nonzero row blocks before its segment and in all (a few words per thread, loads in
// flight; both sums in one block reduction of a 64-bit pair), keeping in shared memory the words of
// the tasks under its own segment, then places its own blocks (one per thread) by a block scan from
// those words, without reading them again. Slots of its segment at or past the total get -1, so
// each index element is written once without a cross-CTA scan; segment 0 writes the count and the
// offsets [0, total].
__global__ void __launch_bounds__(kThreads)
    pit_detect_row_bit_segments_kernel(Plan p, const uint32_t* __restrict__ row_bits, int32_t* __restrict__ counts,
                                       int32_t* __restrict__ offsets, int32_t* __restrict__ indices) {
  using Reduce = cub::BlockReduce<unsigned long long, kThreads>;
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } storage;
  __shared__ uint32_t segment_words[kThreads + 1];  // the tasks under [lo, hi): at most kThreads + 1
  __shared__ int shared_before, shared_total;
  wait_for_previous_grid();  // the mask pass
  const int64_t b = blockIdx.x / p.n_segments(), seg = blockIdx.x % p.n_segments();
  const int64_t lo = seg * kThreads, hi = min(p.nb_m, lo + kThreads);
  const uint32_t* words = row_bits + b * p.n_row_tasks() * p.n_col_chunks();
  const int64_t per_task = p.blocks_per_task();  // n_slabs == 1: one task per group of row blocks
  const int64_t first_task = lo / per_task, last_task = (hi - 1) / per_task;
  // Nonzero row blocks before the segment (low half) and in all (high half), this thread's tasks.
  unsigned long long parts = 0;
  for (int64_t t = threadIdx.x; t < p.n_row_tasks(); t += kThreads) {
    const uint32_t w = row_bits_task_word(p, words, t, 0, p.n_col_chunks());  // nb_k == 1
    if (t >= first_task && t <= last_task) segment_words[t - first_task] = w;
    const int64_t below = min(max(lo - t * per_task, int64_t(0)), int64_t(32));  // bit q: row block t*per_task + q
    parts += (static_cast<unsigned long long>(__popc(w)) << 32) |
             static_cast<unsigned>(__popc(w & (below == 32 ? ~0u : ((1u << below) - 1u))));
  }
  const unsigned long long sums = Reduce(storage.reduce).Sum(parts);
  if (threadIdx.x == 0) {
    shared_before = int(sums & 0xffffffffull);
    shared_total = int(sums >> 32);
  }
  __syncthreads();  // the sums, the segment's words; storage is reused by the scan
  const int64_t i = lo + threadIdx.x;
  int flag = 0;
  if (i < hi) flag = int((segment_words[i / per_task - first_task] >> (i % per_task)) & 1u);
  int pos;
  Scan(storage.scan).ExclusiveSum(flag, pos);
  int32_t* out = indices + b * p.nb_m;
  if (flag) out[shared_before + pos] = int32_t(i);
  if (i < hi && i >= shared_total) out[i] = -1;
  if (seg == 0 && threadIdx.x == 0) write_single_block_offsets(counts, offsets, b, shared_total);
}

// Word rows (Plan::prefix_offsets): the nonzero tiles of row blocks 0 .. o-1 of one batch element,
// whose mask words are the first o * n_words of `m` (one slab per row block), folded by
// tile_start_bits as in compact_row_words. Each thread issues all its 16-byte loads before using
// any (at most kPrefixLoads: the mask is at most kPrefixMaxWords), so the sum costs one L2 round
// trip. Summed over the CTA, valid in thread 0.
constexpr int kPrefixLoads = int(kPrefixMaxWords / 4 / kThreads);
__device__ __forceinline__ void load_row_words_before(const Plan& p, const uint32_t* __restrict__ m, int64_t o,
                                                      uint4 (&v)[kPrefixLoads]) {
  const int64_t quads = o * p.n_words / 4;
  const uint4* q = reinterpret_cast<const uint4*>(m);
#pragma unroll
  for (int j = 0; j < kPrefixLoads; ++j) {
    const int64_t i = threadIdx.x + int64_t(j) * kThreads;
    v[j] = i < quads ? __ldcg(q + i) : make_uint4(0, 0, 0, 0);
  }
}
__device__ __forceinline__ int sum_row_words_before(const Plan& p, const uint4 (&v)[kPrefixLoads]) {
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  int sum = 0;
#pragma unroll
  for (int j = 0; j < kPrefixLoads; ++j) {
    const uint32_t words[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
#pragma unroll
    for (int e = 0; e < 4; ++e) sum += __popc(tile_start_bits(p, words[e]));
  }
  return Reduce(storage).Sum(sum);
}

// Narrow grouped tiles (Plan::prefix_offsets, not word rows; one or two slabs): the nonzero tiles
// of row blocks 0 .. o-1 of one batch element (mask words m [nb_m][n_slabs][n_words]). Load slot k
// of a thread holds slab k % n_slabs of the 4 words `unit` = threadIdx.x + (k / n_slabs) * kThreads
// (row block unit / (n_words / 4), words 4 * (unit % (n_words / 4)) ..), so a thread ORs a unit's
// slabs itself. The mask is at most kPrefixMaxWords, so kPrefixLoads slots cover it; 32-bit
// offsets (at most 4096 quads).
__device__ __forceinline__ void load_tile_words_before(const Plan& p, const uint32_t* __restrict__ m, int64_t o,
                                                       uint4 (&v)[kPrefixLoads]) {
  const int quads_per_row = int(p.n_words / 4), units = int(o) * quads_per_row;
  const int slab_shift = p.n_slabs == 2 ? 1 : 0;
  const uint4* q = reinterpret_cast<const uint4*>(m);
#pragma unroll
  for (int k = 0; k < kPrefixLoads; ++k) {
    const int unit = int(threadIdx.x) + (k >> slab_shift) * kThreads, slab = k & slab_shift;
    const int i = unit / quads_per_row, wq = unit - i * quads_per_row;
    v[k] = unit < units ? __ldcg(q + ((i << slab_shift) + slab) * quads_per_row + wq) : make_uint4(0, 0, 0, 0);
  }
}
__device__ __forceinline__ int sum_tile_words_before(const Plan& p, const uint4 (&v)[kPrefixLoads]) {
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  const bool four = p.tile_k == 128, two_slabs = p.n_slabs == 2;  // four words per tile, else two
  int sum = 0;
#pragma unroll
  for (int k = 0; k < kPrefixLoads; k += 2) {  // slots k, k + 1: two units, or one unit's two slabs
    const uint4 a = v[k], b = v[k + 1];
    if (two_slabs) {
      const uint4 u = make_uint4(a.x | b.x, a.y | b.y, a.z | b.z, a.w | b.w);
      sum += four ? int((u.x | u.y | u.z | u.w) != 0) : int((u.x | u.y) != 0) + int((u.z | u.w) != 0);
    } else {
      sum += four ? int((a.x | a.y | a.z | a.w) != 0) + int((b.x | b.y | b.z | b.w) != 0)
                  : int((a.x | a.y) != 0) + int((a.z | a.w) != 0) + int((b.x | b.y) != 0) + int((b.z | b.w) != 0);
    }
  }
  return Reduce(storage).Sum(sum);
}

// CSR offsets of batch element b from its counts (all written and fenced by other CTAs), by one
// whole CTA: each thread sums a contiguous run of counts (independent L2 loads, overlapping),
// one block scan, then each thread writes its run's offsets.
__device__ __forceinline__ void scan_counts_into_offsets(const Plan& p, const int32_t* __restrict__ counts,
                                                         int32_t* __restrict__ offsets, int64_t b,
                                                         typename cub::BlockScan<int, kThreads>::TempStorage& storage) {
  using Scan = cub::BlockScan<int, kThreads>;
  const int32_t* cnt = counts + b * p.n_outer;
  int32_t* off = offsets + b * (p.n_outer + 1);
  const int64_t run = ceil_div(p.n_outer, int64_t(kThreads));
  const int64_t lo = min(p.n_outer, int64_t(threadIdx.x) * run), hi = min(p.n_outer, lo + run);
  int sum = 0;
#pragma unroll 8
  for (int64_t t = lo; t < hi; ++t) sum += __ldcg(cnt + t);  // L2 reads: other CTAs wrote these
  int prefix, total;
  Scan(storage).ExclusiveSum(sum, prefix, total);
  for (int64_t t = lo; t < hi; ++t) {
    off[t] = prefix;
    prefix += __ldcg(cnt + t);
  }
  if (threadIdx.x == 0) off[p.n_outer] = total;
  __syncthreads();  // storage may be reused
}

// Short rows (Plan::warp_rows), one warp per (batch, outer block), kThreads / 32 per CTA: narrow
// tiles one per lane, wide tiles one after another by the whole warp; ids by ballot and
// popcount, -1 padding and the count. The warp that finishes a batch element's last row (the
// `done` counter) has its whole CTA scan that element's counts into offsets.
template <bool kWide>
__global__ void __launch_bounds__(kThreads)
    pit_detect_warp_rows_kernel(Plan p, const uint32_t* __restrict__ slab_mask, uint32_t* __restrict__ done,
                                int32_t* __restrict__ counts, int32_t* __restrict__ offsets,
                                int32_t* __restrict__ indices) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage storage;
  __shared__ int64_t finished[kThreads / 32];  // batch element whose last row this warp finished, or -1
  wait_for_previous_grid();  // the mask pass (launched before this kernel, possibly overlapping)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t bo = int64_t(blockIdx.x) * (kThreads / 32) + warp;
  int64_t last_of = -1;
  if (bo < p.batch * p.n_outer) {  // uniform per warp
    const int64_t b = bo / p.n_outer, o = bo % p.n_outer;
    const bool row_major = p.layout == kRowMajor;
    uint32_t bits = 0;
    if (kWide) {
      for (int64_t j = 0; j < p.n_inner; ++j)
        bits |= uint32_t(wide_tile_nonzero(p, slab_mask, b, row_major ? o : j, row_major ? j : o, lane)) << j;
    } else {
      const bool nz = lane < p.n_inner &&
                      tile_nonzero<true>(p, slab_mask, b, row_major ? o : int64_t(lane), row_major ? int64_t(lane) : o);
      bits = __ballot_sync(0xffffffffu, nz);
    }
    const int count = __popc(bits);
    int32_t* out = indices + bo * p.n_inner;
    if (lane < p.n_inner) {
      if ((bits >> lane) & 1u) out[__popc(bits & ((1u << lane) - 1u))] = lane;
      if (lane >= count) out[lane] = -1;
    }
    if (lane == 0) {
      counts[bo] = count;
      __threadfence();  // publish the count before announcing this row is done
      if (atomicAdd(done + b, 1u) == unsigned(p.n_outer - 1)) last_of = b;
    }
  }
  if (lane == 0) finished[warp] = last_of;
  __syncthreads();
  for (int w = 0; w < kThreads / 32; ++w) {  // uniform per CTA
    if (finished[w] < 0) continue;
    __threadfence();
    scan_counts_into_offsets(p, counts, offsets, finished[w], storage);
  }
}

// Per-row path, one CTA per (batch, outer block): writes ids, -1 padding and the count. The
// last CTA of a batch element to finish (a counter in scratch, zeroed by the mask pass) scans
// that element's counts into CSR offsets.
// kPrefix (Plan::prefix_offsets, word rows only): offsets from the CTA's own prefix count; a
// separate instantiation, since its loads in flight take registers the other rows kernels need
// for occupancy (1x1 at 4096²: 68 vs 56 us when one kernel held both).
// kSerialPrefix: the session-12 order (prefix loads and sum, then the row's own compaction), kept
// for A/Bs (PIT_DETECT_PREFIX=serial); by default the prefix loads stay in flight during the
// compaction and are summed after it, since only the offsets need them.
template <int kMode, bool kPrefix = false, bool kSerialPrefix = false>
__global__ void __launch_bounds__(kThreads)
    pit_detect_rows_kernel(Plan p, const uint32_t* __restrict__ slab_mask, uint32_t* __restrict__ done,
                           int32_t* __restrict__ counts, int32_t* __restrict__ offsets,
                           int32_t* __restrict__ indices) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage storage;
  __shared__ bool is_last;
  wait_for_previous_grid();  // the mask pass (launched before this kernel, possibly overlapping)
  const int64_t bo = blockIdx.x;
  const int64_t b = bo / p.n_outer, o = bo % p.n_outer;
  int32_t* out = indices + bo * p.n_inner;
  int before = 0;  // prefix_offsets: tiles in the row blocks before this one
  static_assert(!kPrefix || kMode == kRowsWords || kMode == kRowsNarrow, "prefix offsets: word or narrow rows");
  constexpr bool kGroups = kMode == kRowsNarrow;  // tiles of 2 or 4 whole words, slabs ORed
  uint4 prefix_words[kPrefix ? kPrefixLoads : 1];
  auto sum_before = [&]() -> int {
    if constexpr (!kPrefix) return 0;
    else if constexpr (kGroups) return sum_tile_words_before(p, prefix_words);
    else return sum_row_words_before(p, prefix_words);
  };
  if constexpr (kPrefix) {
    const uint32_t* m = slab_mask + b * p.n_outer * p.n_slabs * p.n_words;
    if constexpr (kGroups) load_tile_words_before(p, m, o, prefix_words);
    else load_row_words_before(p, m, o, prefix_words);
    if constexpr (kSerialPrefix) before = sum_before();
  }
  int running;
  if constexpr (kMode == kRowsWords) running = compact_row_words(p, slab_mask + bo * p.n_slabs * p.n_words, out);
  else if constexpr (kMode == kRowsBits) running = compact_row_bits(p, slab_mask, b, o, out);
  else running = compact_row_tiles<kMode == kRowsWide>(p, slab_mask, b, o, out);
  fill_unused_slots(out, running, p.n_inner);
  if constexpr (kPrefix && !kSerialPrefix) before = sum_before();
  if (p.n_outer == 1) {  // the offsets are [0, count]: no counter, no last CTA
    if (threadIdx.x == 0) write_single_block_offsets(counts, offsets, b, running);
    return;
  }
  if constexpr (kPrefix) {  // no counter, no last CTA
    if (threadIdx.x == 0) {
      counts[bo] = running;
      int32_t* off = offsets + b * (p.n_outer + 1);
      off[o] = before;
      if (o == p.n_outer - 1) off[p.n_outer] = before + running;
    }
    return;
  }
  if (threadIdx.x == 0) {
    counts[bo] = running;
    __threadfence();  // publish the count before announcing this CTA is done
    is_last = atomicAdd(done + b, 1u) == unsigned(p.n_outer - 1);
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  scan_counts_into_offsets(p, counts, offsets, b, storage);
}

// One-pass word rows (Plan::one_pass: row layout, tile_k dividing 32, tile_m <= 32, a slab's mask
// words fit in shared memory), one CTA per (batch, mask task: a 32-row slab holding
// blocks_per_task whole row blocks). The warps read the slab's column chunks in turn (16 rows in
// flight per lane), keep its mask words in shared memory, and after one barrier the CTA compacts
// its row blocks from there, writing ids, -1 padding and counts. So a row block is compacted as
// soon as its own rows are read, while other CTAs still read, instead of after the whole mask
// pass; no mask word goes to memory. The offsets follow in pit_detect_offsets_kernel.
template <typename Bits, int kInFlight>
__global__ void __launch_bounds__(kThreads)
    pit_detect_one_pass_kernel(Plan p, const Bits* __restrict__ x, int32_t* __restrict__ counts,
                               int32_t* __restrict__ indices, bool vectorized) {
  constexpr int V = 16 / sizeof(Bits);
  extern __shared__ uint32_t task_words[];  // [blocks_per_task][n_words]
  wait_for_previous_grid();  // whatever wrote x (and last used these outputs)
  allow_dependent_launch();  // the offsets kernel may be scheduled; it waits for this grid to end
  const int64_t n_tasks = p.n_row_tasks();
  const int64_t b = blockIdx.x / n_tasks, rt = blockIdx.x % n_tasks;
  const int64_t i0 = rt * p.blocks_per_task();                  // its first row block
  const int64_t n_blocks = min(p.blocks_per_task(), p.nb_m - i0);  // >= 1
  const int64_t r0 = i0 * p.tile_m, r1 = min(p.rows, r0 + n_blocks * p.tile_m);
  const Bits* base = x + b * p.rows * p.cols;
  const int lane = threadIdx.x & 31;
  for (int64_t cc = threadIdx.x >> 5; cc < p.n_col_chunks(); cc += kThreads / 32) {  // uniform per warp
    const int64_t c0 = cc * 32 * V + int64_t(lane) * V;
    const int64_t w = c0 >> 5;
    const bool writer = lane % (32 / V) == 0 && w < p.n_words;
    uint32_t* out_word = task_words + w;
    fold_rows<Bits, kInFlight>(base, p.cols, c0, c0 < p.cols, vectorized, r0, r1, p.tile_m, [&](uint32_t bits) {
      const uint32_t word = lane_word<Bits>(bits, lane);
      if (writer) *out_word = word;
      out_word += p.n_words;
    });
  }
  __syncthreads();  // every mask word of the slab is in shared memory
  for (int64_t k = 0; k < n_blocks; ++k) {
    const int64_t bo = b * p.nb_m + i0 + k;
    int32_t* out = indices + bo * p.n_inner;
    const int running = compact_row_words(p, task_words + k * p.n_words, out);
    fill_unused_slots(out, running, p.n_inner);
    if (threadIdx.x == 0) counts[bo] = running;
  }
}

// After the one-pass kernel, one CTA per batch element: its counts scanned into CSR offsets.
__global__ void __launch_bounds__(kThreads)
    pit_detect_offsets_kernel(Plan p, const int32_t* __restrict__ counts, int32_t* __restrict__ offsets) {
  __shared__ typename cub::BlockScan<int, kThreads>::TempStorage storage;
  wait_for_previous_grid();  // the one-pass kernel's counts
  scan_counts_into_offsets(p, counts, offsets, blockIdx.x, storage);
}

template <typename Bits>
cudaError_t launch_detect(cudaStream_t stream, const void* x, const Plan& p, uint32_t* workspace,
                          int32_t* counts, int32_t* offsets, int32_t* indices) {
  constexpr int V = 16 / sizeof(Bits);
  if (p.batch == 0) return cudaSuccess;
  uint32_t* slab_mask = workspace;
  int32_t* chunk_prefix = reinterpret_cast<int32_t*>(workspace + p.mask_words());
  uint32_t* done = workspace + p.mask_words() + p.chunk_words();
  if (p.chunk_cols != 32 * V) return cudaErrorInvalidValue;  // the plan was made for another element size
  const bool vectorized = p.cols % V == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  if (p.one_pass) {
    const size_t smem = size_t(p.blocks_per_task() * p.n_words) * sizeof(uint32_t);
    const char* in_flight = std::getenv("PIT_DETECT_IN_FLIGHT");  // 32: every row of a slab's chunk at once
    auto one_pass_kernel = in_flight != nullptr && std::atoi(in_flight) == 32 ? pit_detect_one_pass_kernel<Bits, 32>
                                                                              : pit_detect_one_pass_kernel<Bits, 16>;
    cudaError_t err = launch_dependent(one_pass_kernel, unsigned(p.batch * p.n_row_tasks()), kThreads,
                                       smem, stream, true, p, static_cast<const Bits*>(x), counts, indices, vectorized);
    if (err != cudaSuccess) return err;
    err = launch_dependent(pit_detect_offsets_kernel, unsigned(p.batch), kThreads, 0, stream, true, p, counts, offsets);
    return err != cudaSuccess ? err : cudaGetLastError();
  }
  const int64_t n_tasks = p.batch * p.n_row_tasks() * p.n_col_chunks();
  const char* in_flight = std::getenv("PIT_DETECT_IN_FLIGHT");
  const bool sixteen = in_flight != nullptr ? std::atoi(in_flight) == 16 : n_tasks > kManyMaskWarps;
  auto mask_kernel = p.row_bits ? (sixteen ? pit_detect_mask_kernel<Bits, 16, true> : pit_detect_mask_kernel<Bits, 8, true>)
                                : (sixteen ? pit_detect_mask_kernel<Bits, 16, false> : pit_detect_mask_kernel<Bits, 8, false>);
  cudaError_t err = launch_dependent(mask_kernel, unsigned(ceil_div(n_tasks, kMaskWarps)), kMaskWarps * 32, 0, stream,
                                     true, static_cast<const Bits*>(x), slab_mask, done, p.batch,
                                     p.rows, p.cols, p.tile_m, p.nb_m, p.n_slabs, p.n_words, p.n_row_tasks(),
                                     p.n_col_chunks(), vectorized);
  if (err != cudaSuccess) return err;
  if (p.row_bit_segments) {
    err = launch_dependent(pit_detect_row_bit_segments_kernel, unsigned(p.batch * p.n_segments()), kThreads, 0,
                           stream, true, p, slab_mask, counts, offsets, indices);
    return err != cudaSuccess ? err : cudaGetLastError();
  }
  if (p.row_bits) {
    err = launch_dependent(pit_detect_rows_kernel<kRowsBits>, unsigned(p.batch * p.n_outer), kThreads, 0, stream,
                           true, p, slab_mask, done, counts, offsets, indices);
    return err != cudaSuccess ? err : cudaGetLastError();
  }
  if (p.word_rows || p.per_row() || p.warp_rows()) {
    auto prefix_kernel = p.serial_prefix ? pit_detect_rows_kernel<kRowsWords, true, true>
                                         : pit_detect_rows_kernel<kRowsWords, true>;
    auto rows_kernel = p.word_rows   ? (p.prefix_offsets ? prefix_kernel : pit_detect_rows_kernel<kRowsWords>)
                       : p.warp_rows() ? (p.wide ? pit_detect_warp_rows_kernel<true> : pit_detect_warp_rows_kernel<false>)
                       : p.wide        ? pit_detect_rows_kernel<kRowsWide>
                       : p.prefix_offsets ? pit_detect_rows_kernel<kRowsNarrow, true>
                                       : pit_detect_rows_kernel<kRowsNarrow>;
    const int64_t rows_per_cta = p.warp_rows() ? kThreads / 32 : 1;
    const unsigned grid = unsigned(ceil_div(p.batch * p.n_outer, rows_per_cta));
    err = launch_dependent(rows_kernel, grid, kThreads, 0, stream, true, p, slab_mask, done, counts, offsets, indices);
    return err != cudaSuccess ? err : cudaGetLastError();
  }
  const unsigned grid = unsigned(p.batch * p.n_outer * p.n_chunks);
  if (p.wide) pit_detect_count_kernel<true><<<grid, kThreads, 0, stream>>>(p, slab_mask, chunk_prefix);
  else pit_detect_count_kernel<false><<<grid, kThreads, 0, stream>>>(p, slab_mask, chunk_prefix);
  pit_detect_scan_kernel<<<unsigned(p.batch), kScanThreads, 0, stream>>>(p, chunk_prefix, counts, offsets);
  if (p.wide)
    pit_detect_scatter_kernel<true><<<grid, kThreads, 0, stream>>>(p, slab_mask, chunk_prefix, counts, offsets, indices);
  else
    pit_detect_scatter_kernel<false><<<grid, kThreads, 0, stream>>>(p, slab_mask, chunk_prefix, counts, offsets, indices);
  return cudaGetLastError();
}

ffi::Error DetectCuda(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::Buffer<ffi::S32>> counts,
                      ffi::Result<ffi::Buffer<ffi::S32>> offsets,
                      ffi::Result<ffi::Buffer<ffi::S32>> indices,
                      ffi::Result<ffi::Buffer<ffi::U32>> workspace, int64_t tile_m, int64_t tile_k,
                      int64_t layout) {
  DetectShape shape;
  ffi::Error arg_err = check_detect_args(x.dimensions(), tile_m, tile_k, layout, counts->dimensions(),
                                         offsets->dimensions(), indices->dimensions(), &shape);
  if (arg_err.failure()) return arg_err;
  const bool wide_elems = x.element_type() == ffi::DataType::F32;
  Plan p(shape, layout, wide_elems ? 4 : 2);
  if (const char* env = std::getenv("PIT_DETECT_PREFIX")) {  // A/Bs, read per launch: 0 always the last-CTA
    if (env[0] == '0') p.prefix_offsets = false;               // scan, "serial" the prefix summed first
    p.serial_prefix = std::string(env) == "serial";
  }
  if (const char* env = std::getenv("PIT_DETECT_WARP_IDS"))  // A/Bs, read per launch: 0 per-thread id stores
    p.warp_ids = env[0] != '0';
  if (const char* env = std::getenv("PIT_DETECT_ROW_BITS")) {  // A/Bs, read per launch: 0 never the row-bits
    if (env[0] == '0') p.row_bits = false;                      // path, "single" never by segments
    if (env[0] == '0' || std::string(env) == "single") p.row_bit_segments = false;
  }
  if (const char* env = std::getenv("PIT_DETECT_ONE_PASS"))  // A/Bs and tests, read per launch: 0 never the
    p.one_pass = env[0] != '0' && p.one_pass_fits();          // one-pass kernel, 1 wherever it fits
  if (element_count(workspace->dimensions()) != p.workspace_words())
    return ffi::Error::InvalidArgument("pit_detect: workspace size does not match x and tile");
  poison_device_outputs(stream, counts, offsets, indices, workspace);
  cudaError_t err;
  switch (x.element_type()) {
    case ffi::DataType::BF16:
    case ffi::DataType::F16:
      err = launch_detect<uint16_t>(stream, x.untyped_data(), p, workspace->typed_data(),
                                    counts->typed_data(), offsets->typed_data(), indices->typed_data());
      break;
    case ffi::DataType::F32:
      err = launch_detect<uint32_t>(stream, x.untyped_data(), p, workspace->typed_data(),
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
