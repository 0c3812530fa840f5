// MoE grouped GEMMs on Hopper tensor cores (wgmma), for bf16 / fp16 with d and f multiples of 8
// (16-byte rows):
//
//   forward  out[a] = x[a / r] @ w[e(a)]      (w [E, d, f]: B is MN-major in shared memory)
//            out[a] = x[a / r] @ w[e(a)]ᵀ     (w [E, f, d], the dx pass: B is K-major, no copy)
//   dW       dw[e]  = Σ_{a in group e} x[a / r]ᵀ dy[a]   (A and B both MN-major gathered rows)
//
// Both kernels are warp-specialised, one CTA of three warpgroups per 128 x 256 output tile:
// a producer warpgroup gathers each stage's rows with cp.async (and, in the forward, has the
// copy engine bring the weight tile: TMA) into a 4-stage ring of 128-byte swizzled tiles, whose
// copies complete a "full" mbarrier; two consumer warpgroups each multiply
// 64 rows by the 256 columns with wgmma.m64n256k16 (fp32 accumulators in registers), keep a
// step in flight while the next is issued, and hand stages back on an "empty" mbarrier. The
// forward gathers its A rows (SRead) by `order` and scatters output rows (SWrite) to their
// assignment positions; the dW kernel gathers the K dimension — the expert's rows of x and
// dy — by `order` and writes a dense tile of dw[e]. Rows already in routing order (MoeShape's
// x_sorted / out_sorted: a layer's hidden activations) are contiguous per expert and come by TMA.
#pragma once

#include <cuda_runtime.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "../common/device_query.cuh"
#include "../common/mma_sm80.cuh"
#include "../common/pdl.cuh"
#include "../common/tile_copy.cuh"
#include "../common/wgmma_sm90.cuh"
#include "moe_tiles.cuh"

namespace pit {

struct MoeSm90Config {
  static constexpr int kBM = kMoeRouteTileRows, kBN = 256, kBK = 64, kStages = 4;
  static constexpr int kProducers = 128, kConsumers = 256, kThreads = kProducers + kConsumers;
  static constexpr int kProducerRegisters = 96, kConsumerRegisters = 200;  // within the 384 x 168 allotted at launch
  static constexpr int kRowBytes = kBK * 2;                   // one 128-byte swizzle row
  static constexpr int kABytes = kBM * kRowBytes, kBBytes = kBN * kRowBytes;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kAtomBytes = kBK * 128;                // MN-major operand: 64 columns x 64 K rows
  static constexpr int kCStride = kBN + 8;                    // epilogue row, padded: no bank conflicts
  static constexpr int kRingBytes = kStages * kStageBytes;
  // ring + alignment slack + barriers + the forward's destination and source row ids
  static constexpr int kSmemBytes = kRingBytes + 1024 + 2 * kStages * 8 + 2 * kBM * 4;
  static_assert(kBM * kCStride * 2 <= kRingBytes, "epilogue staging must fit the ring");
  static_assert(kProducerRegisters * kProducers + kConsumerRegisters * kConsumers <= 65536, "register file");
};

constexpr int64_t kMoeSm90ColBand = 1;  // the forward raster band with many tiles per expert (moe_tiles.cuh)

#if PIT_HAS_WGMMA
struct MoeSm90Smem {  // views into the dynamic shared memory
  unsigned char* ring;
  uint64_t* full;   // [kStages]: the producer's copies of the stage landed
  uint64_t* empty;  // [kStages]: both consumers finished reading the stage
  int32_t* rows;    // [2 * kBM], free for the kernel

  // Lays out the 1024-byte-aligned ring (swizzle atoms must be aligned) and initialises the
  // barriers (full_arrivals per phase of a full barrier); all threads call it, then __syncthreads.
  __device__ __forceinline__ MoeSm90Smem(unsigned char* raw, uint32_t full_arrivals) {
    using C = MoeSm90Config;
    ring = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t(1023));
    full = reinterpret_cast<uint64_t*>(ring + C::kRingBytes);
    empty = full + C::kStages;
    rows = reinterpret_cast<int32_t*>(empty + C::kStages);
    if (threadIdx.x == 0) {
      for (int st = 0; st < C::kStages; ++st) {
        mbarrier_init(&full[st], full_arrivals);
        mbarrier_init(&empty[st], C::kConsumers);
      }
      mbarrier_init_fence();
    }
  }
};

// Producer warpgroup: issues load_stage(chunk, stage) (this thread's cp.async copies) for each
// chunk into the ring, waiting for the consumers to free a stage before refilling it. Each
// thread's copies arrive on the stage's full barrier by themselves once they land
// (cp.async.mbarrier.arrive.noinc), so the producer never waits for its copies: all stages of
// the ring can be in flight, and a stage's release does not wait for later stages' issue.
// it0: ring steps already taken by earlier tiles of a persistent CTA (stages and barrier phases
// continue from there).
template <typename LoadStage>
__device__ __forceinline__ void produce_stages(const MoeSm90Smem& sm, int n_chunks, LoadStage&& load_stage,
                                               int64_t it0 = 0) {
  using C = MoeSm90Config;
  for (int i = 0; i < n_chunks; ++i) {
    const int64_t g = it0 + i;
    const int stage = int(g % C::kStages);
    if (g >= C::kStages) mbarrier_wait(&sm.empty[stage], uint32_t((g / C::kStages) + 1) & 1);
    load_stage(i, stage);
    cp_async_mbarrier_arrive_noinc(&sm.full[stage]);
  }
}

// Consumer warpgroup: acc = its 64 x 256 share of the tile over n_chunks stages (zero if none). desc_a0 /
// desc_b0 describe its operands in stage 0; a stage or a K step of 16 moves only their start
// addresses. With kOverlap, step i - 1's wgmmas finish while step i's are issued, then its
// stage is freed. Without (the dW kernel: there ptxas serialises the wgmmas when a step stays
// in flight across the loop's back edge, C7514), steps overlap within groups of kStages and
// the last step of each group is waited for.
// it0 (persistent CTAs): ring steps taken by earlier tiles; the last stage is then released too.
// idle: this warpgroup's 64 rows all lie past the tile's rows (a group's last, partial tile), so
// it issues no wgmma and only keeps the barriers' count; the other warpgroup has the tensor
// cores to itself (acc stays zero).
template <int kTransposeA, int kTransposeB, int kAStepBytes, int kBStepBytes, bool kOverlap, typename T>
__device__ __forceinline__ void consume_stages(float (&acc)[128], const MoeSm90Smem& sm, int n_chunks,
                                               uint64_t desc_a0, uint64_t desc_b0, int64_t it0 = -1,
                                               bool idle = false) {
  using C = MoeSm90Config;
  const bool persistent = it0 >= 0;
  const int64_t base = persistent ? it0 : 0;
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
  if (idle) {  // the same waits and releases as below, without the MMAs
    const bool release_last = persistent || !kOverlap;
    for (int i = 0; i < n_chunks; ++i) {
      const int stage = int((base + i) % C::kStages);
      mbarrier_wait(&sm.full[stage], uint32_t((base + i) / C::kStages) & 1);
      if (i + 1 < n_chunks || release_last) mbarrier_arrive(&sm.empty[stage]);
    }
    return;
  }
  auto issue = [&](int i) {
    const int stage = int((base + i) % C::kStages);
    mbarrier_wait(&sm.full[stage], uint32_t((base + i) / C::kStages) & 1);
    fence_proxy_async_shared();  // the stage's cp.async (generic proxy) writes, before wgmma reads them
    const uint64_t stage_offset = uint64_t(stage * C::kStageBytes) >> 4;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < C::kBK / 16; ++kk)
      wgmma_m64n256k16<kTransposeA, kTransposeB>(acc, desc_a0 + stage_offset + ((kk * kAStepBytes) >> 4),
                                                 desc_b0 + stage_offset + ((kk * kBStepBytes) >> 4), 1, T{});
    wgmma_commit();
  };
  if constexpr (kOverlap) {
    for (int i = 0; i < n_chunks; ++i) {
      issue(i);
      wgmma_wait<1>();
      if (i > 0) mbarrier_arrive(&sm.empty[int((base + i - 1) % C::kStages)]);
    }
    if (persistent && n_chunks > 0) {  // the next tile's loads reuse the last stage
      wgmma_wait<0>();
      mbarrier_arrive(&sm.empty[int((base + n_chunks - 1) % C::kStages)]);
    }
  } else {
    int i = 0;
    for (; i + C::kStages <= n_chunks; i += C::kStages) {
      issue(i);
#pragma unroll
      for (int g = 1; g < C::kStages; ++g) {
        issue(i + g);
        wgmma_wait<1>();
        mbarrier_arrive(&sm.empty[(i + g - 1) % C::kStages]);
      }
      wgmma_wait<0>();
      mbarrier_arrive(&sm.empty[(i + C::kStages - 1) % C::kStages]);
    }
    for (; i < n_chunks; ++i) {
      issue(i);
      wgmma_wait<0>();
      mbarrier_arrive(&sm.empty[i % C::kStages]);
    }
  }
  wgmma_wait<0>();
  pin_registers(acc);
}

// The first of the two tile rows (row, row + 8) whose accumulators consumer thread ctid
// (0..255) holds: wgmma's m64 fragment layout, 64 rows per consumer warpgroup.
__device__ __forceinline__ int consumer_row(int ctid) {
  return (ctid / 128) * 64 + ((ctid % 128) / 32) * 16 + (ctid % 32) / 4;
}

// Accumulator i of a consumer thread after the epilogue kEpi (moe_tiles.cuh); i / 2 % 2 picks
// the thread's row (row_scale[0] or [1]). Fast exp and division: the epilogue runs after the
// main loop, exposed (4 us per tile with IEEE division on Qwen-like shapes); their error
// (~2 ulp) is far below bf16/fp16 rounding. GELU: 0.5 v (1 + tanh(z)) = v sigmoid(2z),
// z = sqrt(2/pi) (v + 0.044715 v^3): one exp, as silu.
template <int kEpi>
__device__ __forceinline__ float epilogue_value(const float (&acc)[128], int i, const float (&row_scale)[2]) {
  const float v = acc[i];
  if constexpr (kEpi == kEpiSwiGLU) return __fdividef(v, 1.0f + __expf(-v)) * acc[i + 64];
  if constexpr (kEpi == kEpiReLU) return fmaxf(v, 0.0f);
  if constexpr (kEpi == kEpiGELU) return __fdividef(v, 1.0f + __expf(-1.5957691216f * (v + 0.044715f * v * v * v)));
  if constexpr (kEpi == kEpiScale) return v * row_scale[(i / 2) % 2];
  return v;
}

// Both consumers' accumulators as T into the row-major staging tile cs [kBM][kCStride], which
// overlays the ring (ctid = consumer thread 0..255), through the epilogue kEpi (moe_tiles.cuh),
// in fp32 and rounded once. Barriers: every consumer finished reading the ring before, and the
// tile is complete after.
// kEpiSwiGLU: columns 0..127 of the accumulators are the gate, 128..255 the up projection of the
// same 128 output columns (a thread holds both of a column: acc[4j + q] and acc[4(j + 16) + q]),
// and the tile staged is silu(gate) * up, 128 columns. kEpiScale: rows consumer_row(ctid) and
// + 8 are multiplied by row_scale[0] and [1] (the top-k combine weights of their assignments).
template <typename T, int kEpi = kEpiNone>
__device__ __forceinline__ void stage_accumulators(const float (&acc)[128], T* cs, int ctid,
                                                   const float (&row_scale)[2]) {
  using C = MoeSm90Config;
  named_barrier_sync(1, C::kConsumers);
  const int lane = ctid % 32, row = consumer_row(ctid);
  constexpr int kCols = kEpi == kEpiSwiGLU ? 16 : 32;  // 8-column groups staged per thread
  auto value = [&](int i) { return epilogue_value<kEpi>(acc, i, row_scale); };
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    const int c = 8 * j + 2 * (lane % 4);
    cs[row * C::kCStride + c] = from_float<T>(value(4 * j));
    cs[row * C::kCStride + c + 1] = from_float<T>(value(4 * j + 1));
    cs[(row + 8) * C::kCStride + c] = from_float<T>(value(4 * j + 2));
    cs[(row + 8) * C::kCStride + c + 1] = from_float<T>(value(4 * j + 3));
  }
  named_barrier_sync(1, C::kConsumers);
}
#endif  // PIT_HAS_WGMMA

// kXTma: x's rows are in routing order (s.x_sorted), so a tile's 128 rows are contiguous and come
// by TMA as one box (rows past the tile belong to the next group or lie past the end, where the
// copy engine zero-fills: they only reach output rows that are not stored).
// kEpi (fused epilogues, w [E, d, f] only): an activation of the product (ReLU, GELU), the
// top-k combine weight of each row's assignment (kEpiScale: row_scale [A], by assignment id), or
// SwiGLU, out = silu(x @ w_gate) * (x @ w_up), where a CTA's 256 B columns are 128 columns of
// w_gate (w_map) and the same 128 of w_up (up_map).
template <typename T, bool kWTransposed, bool kXTma, int kEpi>
__global__ void __launch_bounds__(MoeSm90Config::kThreads, 1)
    pit_moe_forward_sm90_kernel(const T* __restrict__ x, const T* __restrict__ w, const int32_t* __restrict__ order,
                                const int32_t* __restrict__ group_starts, const int32_t* __restrict__ tile_starts,
                                T* __restrict__ out, MoeShape s, int64_t col_band,
                                const __grid_constant__ CUtensorMap w_map, const __grid_constant__ CUtensorMap x_map,
                                const __grid_constant__ CUtensorMap up_map, const float* __restrict__ row_scale) {
#if PIT_HAS_WGMMA
  using C = MoeSm90Config;
  constexpr bool kSwiGLU = kEpi == kEpiSwiGLU;
  static_assert(kEpi == kEpiNone || !kWTransposed, "the fused epilogues read w as [E, d, f]");
  constexpr int kOutCols = kSwiGLU ? C::kBN / 2 : C::kBN;  // output columns per CTA
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const MoeSm90Smem sm(smem_raw, C::kProducers + 1);  // + the weight tile's expect-tx arrival
  int32_t* dst_rows = sm.rows;        // output row of each tile row
  int32_t* src_rows = sm.rows + C::kBM;  // its row of x
  const int tid = threadIdx.x;
  // a dependent launch (common/pdl.cuh): the routing or whatever wrote x must have finished
  wait_for_previous_grid();
  allow_dependent_launch();
  const MoeGridTile grid_tile = forward_grid_tile(blockIdx.x, s.max_row_tiles, ceil_div(s.f, int64_t(kOutCols)), col_band);
  MoeRouteTile tile;
  if (!find_route_tile(tile_starts, group_starts, s.experts, two_ended_row_tile(s, tile_starts, grid_tile.row_tile),
                       &tile))
    return;
  const int64_t n0 = grid_tile.col_tile * kOutCols;
  const int64_t cols = s.f - n0 < kOutCols ? s.f - n0 : kOutCols;
  for (int r = tid; r < C::kBM; r += C::kThreads) {
    const int32_t a = r < tile.rows ? order[tile.first + r] : 0, p = r < tile.rows ? int32_t(tile.first + r) : 0;
    dst_rows[r] = s.out_sorted ? p : a;
    src_rows[r] = s.x_sorted ? p : int32_t(a / s.rows_per_source);
  }
  __syncthreads();

  if (tile.group == s.experts) {  // assignments with an invalid expert id: zero rows
    const uint4 zero = make_uint4(0, 0, 0, 0);
    for (int i = tid; i < tile.rows * (kOutCols / 8); i += C::kThreads) {
      const int r = i / (kOutCols / 8), c = (i % (kOutCols / 8)) * 8;
      if (c < cols) *reinterpret_cast<uint4*>(out + int64_t(dst_rows[r]) * s.f + n0 + c) = zero;
    }
    return;
  }
  const int n_chunks = int(ceil_div(s.d, C::kBK));

  if (tid < C::kProducers) {
    setmaxnreg_dec<C::kProducerRegisters>();
    // The producer's issue rate bounds the kernel: the weight tile comes by bulk tensor copies
    // (TMA, issued by thread 0, 128-byte swizzled by the copy engine), and the gathered rows
    // of x take chunk column `chunk` of rows row0 + 16j (one swizzled position for every j)
    // from row pointers computed once.
    const int row0 = tid / 8, chunk = tid % 8;
    const int dst0 = row0 * C::kRowBytes + swizzle128(row0, chunk) * 16;
    const T* a_src[C::kBM / 16];
    uint32_t a_live = 0;  // bit j: row row0 + 16j is in the tile
#pragma unroll
    for (int j = 0; j < C::kBM / 16; ++j) {
      a_src[j] = x + int64_t(src_rows[row0 + 16 * j]) * s.d + chunk * 8;
      a_live |= uint32_t(row0 + 16 * j < tile.rows) << j;
    }
    // A thread whose 8 rows are all in the tile, in a stage of whole K columns, issues plain
    // copies (no predicate, pointer select or source size): about half the producer's
    // instructions per stage, and the producer's issue rate bounds the gathered kernel.
    // s.fast_rows = false (PIT_MOE_FAST_ROWS=0, an A/B switch) keeps every copy predicated.
    const bool full_rows = s.fast_rows && a_live == (1u << (C::kBM / 16)) - 1;
    // rows 64..127 (j >= 4) feed only the second consumer warpgroup: not loaded when it is idle
    const bool upper_idle = s.skip_idle_half && tile.rows <= C::kBM / 2;
    auto load_stage = [&](int i, int stage) {
      unsigned char* a_s = sm.ring + stage * C::kStageBytes;
      unsigned char* b_s = a_s + C::kABytes;
      const int64_t k0 = int64_t(i) * C::kBK;
      if (tid == 0) {  // w[e]'s tile; the copy engine zero-fills past d and f
        mbarrier_arrive_expect_tx(&sm.full[stage], kXTma ? C::kABytes + C::kBBytes : C::kBBytes);
        if constexpr (kXTma) tma_load_3d(a_s, &x_map, int(k0), int(tile.first), 0, &sm.full[stage]);
        if constexpr (kWTransposed) {  // w[e] is [f, d]: one box of 64 k x 256 n rows (K-major)
          tma_load_3d(b_s, &w_map, int(k0), int(n0), tile.group, &sm.full[stage]);
        } else {  // w[e] is [d, f]: 4 boxes of 64 n x 64 k rows (MN-major atoms)
#pragma unroll
          for (int atom = 0; atom < C::kBN / 64; ++atom) {
            const bool up = kSwiGLU && atom >= 2;  // SwiGLU: atoms 0, 1 of w_gate, then 2, 3 of w_up
            tma_load_3d(b_s + atom * C::kAtomBytes, up ? &up_map : &w_map, int(n0) + 64 * (up ? atom - 2 : atom),
                        int(k0), tile.group, &sm.full[stage]);
          }
        }
      }
      if constexpr (kXTma) return;
      if (full_rows && k0 + C::kBK <= s.d) {
#pragma unroll
        for (int j = 0; j < C::kBM / 16; ++j) cp_async_16_full(a_s + dst0 + j * 16 * C::kRowBytes, a_src[j] + k0);
        return;
      }
      const bool k_live = k0 + chunk * 8 < s.d;
#pragma unroll
      for (int j = 0; j < C::kBM / 16; ++j) {  // SRead: 128 token rows x 8 chunks
        if (upper_idle && j >= C::kBM / 32) continue;
        const bool ok = ((a_live >> j) & 1) && k_live;
        cp_async_16(a_s + dst0 + j * 16 * C::kRowBytes, ok ? a_src[j] + k0 : x, ok ? 16 : 0);
      }
    };
    produce_stages(sm, n_chunks, load_stage);
  } else {
    setmaxnreg_inc<C::kConsumerRegisters>();
    const int ctid = tid - C::kProducers, warpgroup = ctid / 128;
    float scale[2] = {1.0f, 1.0f};
    if constexpr (kEpi == kEpiScale) {  // issued now, used after the main loop: the loads' latency hides
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = consumer_row(ctid) + 8 * h;
        scale[h] = r < tile.rows ? row_scale[order[tile.first + r]] : 0.0f;
      }
    }
    float acc[128];
    const uint64_t desc_a0 = smem_descriptor_sw128(sm.ring + warpgroup * 64 * C::kRowBytes, 16, 1024);
    const uint64_t desc_b0 = kWTransposed ? smem_descriptor_sw128(sm.ring + C::kABytes, 16, 1024)
                                          : smem_descriptor_sw128(sm.ring + C::kABytes, C::kAtomBytes, 1024);
    // a partial tile of at most 64 rows leaves the second warpgroup without rows (Qwen-like
    // shapes: 16-23% of the warpgroups' MMAs would multiply padding)
    const bool idle = s.skip_idle_half && warpgroup * (C::kBM / 2) >= tile.rows;
    consume_stages<0, kWTransposed ? 0 : 1, 32, kWTransposed ? 32 : 16 * C::kRowBytes, true, T>(
        acc, sm, n_chunks, desc_a0, desc_b0, -1, idle);
    T* cs = reinterpret_cast<T*>(sm.ring);
    stage_accumulators<T, kEpi>(acc, cs, ctid, scale);
    for (int i = ctid; i < tile.rows * (kOutCols / 8); i += C::kConsumers) {  // SWrite: 16 bytes per store
      const int r = i / (kOutCols / 8), c = (i % (kOutCols / 8)) * 8;
      if (c < cols)
        *reinterpret_cast<uint4*>(out + int64_t(dst_rows[r]) * s.f + n0 + c) =
            *reinterpret_cast<const uint4*>(cs + r * C::kCStride + c);
    }
  }
#endif  // PIT_HAS_WGMMA
}

// dw[e] tile (m0.., n0..) = Σ over the expert's rows p of x[order[p] / r][m0..]ᵀ dy[order[p]][n0..].
// The K dimension is the expert's row list: a stage holds 64 gathered rows of x (A, MN-major:
// 128 d columns as two 64-column atoms, one per consumer) and of dy (B, MN-major, 4 atoms).
// Rows past the group's end are zero-filled; an empty expert writes a zero tile.
// kXTma / kDyTma: that operand's rows are in routing order (s.x_sorted / s.out_sorted), so a
// stage's 64 rows are contiguous: a full stage comes by TMA (boxes of one 64 x 64 MN-major atom);
// the group's last, partial stage by cp.async like the gathered rows, because past the group's end
// lie the next expert's rows, which must read as zero here.
template <typename T, bool kXTma, bool kDyTma>
__global__ void __launch_bounds__(MoeSm90Config::kThreads, 1)
    pit_moe_tn_sm90_kernel(const T* __restrict__ x, const T* __restrict__ dy, const int32_t* __restrict__ order,
                           const int32_t* __restrict__ group_starts, T* __restrict__ dw, MoeShape s, int64_t d_tiles,
                           int64_t f_tiles, const __grid_constant__ CUtensorMap x_map,
                           const __grid_constant__ CUtensorMap dy_map) {
#if PIT_HAS_WGMMA
  using C = MoeSm90Config;
  constexpr bool kAnyTma = kXTma || kDyTma;
  constexpr uint32_t kTmaBytes = (kXTma ? C::kABytes : 0) + (kDyTma ? C::kBBytes : 0);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const MoeSm90Smem sm(smem_raw, C::kProducers + (kAnyTma ? 1 : 0));  // + thread 0's expect-tx arrival
  const int tid = threadIdx.x;
  // f tiles vary fastest: CTAs in flight share the expert's x columns in L2
  const int64_t f_tile = blockIdx.x % f_tiles, d_tile = (blockIdx.x / f_tiles) % d_tiles;
  const int64_t expert = blockIdx.x / (f_tiles * d_tiles);
  const int64_t m0 = d_tile * C::kBM, n0 = f_tile * C::kBN;
  const int64_t first = group_starts[expert], end = group_starts[expert + 1];
  const int n_chunks = int(ceil_div(end - first, int64_t(C::kBK)));
  __syncthreads();  // barriers initialised

  if (tid < C::kProducers) {
    setmaxnreg_dec<C::kProducerRegisters>();
    // Each warp reads the stage's 64 row ids (two per lane) and passes them by shuffle: x gets
    // chunk column a_col of rows a_row0 + 8j, dy chunk column `lane` of rows warp + 4j.
    const int lane = tid % 32, warp = tid / 32, a_row0 = tid / 16, a_col = tid % 16;
    const int a_dst0 = (a_col / 8) * C::kAtomBytes + a_row0 * C::kRowBytes + swizzle128(a_row0, a_col % 8) * 16;
    // dy's rows land at two swizzled positions: rows warp + 8m and warp + 4 + 8m
    const int b_dst_even = (lane / 8) * C::kAtomBytes + warp * C::kRowBytes + swizzle128(warp, lane % 8) * 16;
    const int b_dst_odd = (lane / 8) * C::kAtomBytes + (warp + 4) * C::kRowBytes + swizzle128(warp + 4, lane % 8) * 16;
    const bool m_live = m0 + a_col * 8 < s.d, n_live = n0 + lane * 8 < s.f;
    const T* x_col = x + m0 + a_col * 8;
    const T* dy_col = dy + n0 + lane * 8;
    const int32_t rows_per_source = int32_t(s.rows_per_source);
    // The next stage's row ids are loaded one stage ahead, so their latency hides behind a stage.
    int32_t next_lo = 0, next_hi = 0;
    auto fetch_ids = [&](int i) {
      const int64_t p0 = first + int64_t(i) * C::kBK;
      next_lo = p0 + lane < end ? order[p0 + lane] : 0;
      next_hi = p0 + 32 + lane < end ? order[p0 + 32 + lane] : 0;
    };
    if (n_chunks > 0 && !(kXTma && kDyTma)) fetch_ids(0);
    auto load_stage = [&](int i, int stage) {
      unsigned char* a_s = sm.ring + stage * C::kStageBytes;
      unsigned char* b_s = a_s + C::kABytes;
      const int64_t p0 = first + int64_t(i) * C::kBK, left = end - p0;
      const int rows = int(left < C::kBK ? left : C::kBK);
      const bool by_tma = rows == C::kBK;  // a full stage of a sorted operand
      if (kAnyTma && tid == 0) {
        if (by_tma) {
          mbarrier_arrive_expect_tx(&sm.full[stage], kTmaBytes);
          if constexpr (kXTma)
            for (int atom = 0; atom < C::kBM / 64; ++atom)
              tma_load_3d(a_s + atom * C::kAtomBytes, &x_map, int(m0) + 64 * atom, int(p0), 0, &sm.full[stage]);
          if constexpr (kDyTma)
            for (int atom = 0; atom < C::kBN / 64; ++atom)
              tma_load_3d(b_s + atom * C::kAtomBytes, &dy_map, int(n0) + 64 * atom, int(p0), 0, &sm.full[stage]);
        } else {
          mbarrier_arrive(&sm.full[stage]);
        }
      }
      const int32_t id_lo = next_lo, id_hi = next_hi;
      if (!(kXTma && kDyTma) && i + 1 < n_chunks) fetch_ids(i + 1);
      if (!kXTma || !by_tma) {
        const int32_t src_lo = rows_per_source == 1 ? id_lo : id_lo / rows_per_source;
        const int32_t src_hi = rows_per_source == 1 ? id_hi : id_hi / rows_per_source;
#pragma unroll
        for (int j = 0; j < C::kBK / 8; ++j) {  // SRead of x: 64 rows x 16 chunks
          const int r = a_row0 + 8 * j;         // < 32 exactly when j < 4
          const int64_t src = kXTma ? p0 + r : __shfl_sync(0xffffffffu, j < 4 ? src_lo : src_hi, r % 32);
          const bool ok = r < rows && m_live;
          cp_async_16(a_s + a_dst0 + j * 8 * C::kRowBytes, ok ? x_col + src * s.d : x, ok ? 16 : 0);
        }
      }
      if (!kDyTma || !by_tma) {
#pragma unroll
        for (int j = 0; j < C::kBK / 4; ++j) {  // SRead of dy: 64 rows x 32 chunks
          const int r = warp + 4 * j;            // < 32 exactly when j < 8
          const int64_t id = kDyTma ? p0 + r : __shfl_sync(0xffffffffu, j < 8 ? id_lo : id_hi, r % 32);
          const bool ok = r < rows && n_live;
          cp_async_16(b_s + (j % 2 ? b_dst_odd : b_dst_even) + (j / 2) * 8 * C::kRowBytes,
                      ok ? dy_col + id * s.f : dy, ok ? 16 : 0);
        }
      }
    };
    produce_stages(sm, n_chunks, load_stage);
  } else {
    setmaxnreg_inc<C::kConsumerRegisters>();
    const int ctid = tid - C::kProducers, warpgroup = ctid / 128;
    float acc[128];
    const uint64_t desc_a0 = smem_descriptor_sw128(sm.ring + warpgroup * C::kAtomBytes, C::kAtomBytes, 1024);
    const uint64_t desc_b0 = smem_descriptor_sw128(sm.ring + C::kABytes, C::kAtomBytes, 1024);
    consume_stages<1, 1, 16 * C::kRowBytes, 16 * C::kRowBytes, false, T>(acc, sm, n_chunks, desc_a0, desc_b0);
    T* cs = reinterpret_cast<T*>(sm.ring);
    const float unscaled[2] = {1.0f, 1.0f};
    stage_accumulators(acc, cs, ctid, unscaled);
    const int64_t rows = s.d - m0 < C::kBM ? s.d - m0 : C::kBM, cols = s.f - n0 < C::kBN ? s.f - n0 : C::kBN;
    T* dw_tile = dw + (expert * s.d + m0) * s.f + n0;
    for (int i = ctid; i < rows * (C::kBN / 8); i += C::kConsumers) {  // 16 bytes per store
      const int r = i / (C::kBN / 8), c = (i % (C::kBN / 8)) * 8;
      if (c < cols)
        *reinterpret_cast<uint4*>(dw_tile + int64_t(r) * s.f + c) =
            *reinterpret_cast<const uint4*>(cs + r * C::kCStride + c);
    }
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
  int major = 0;
  return current_device_attribute(cudaDevAttrComputeCapabilityMajor, &major) == cudaSuccess && major == 9;
}

// A tiled tensor map (128-byte swizzle, zero fill past the edges) over a row-major array of T:
// dims and box innermost first, byte strides of dims 1 and 2. The encoder is a driver function,
// reached through the runtime (no link against libcuda).
template <typename T>
inline cudaError_t encode_tensor_map_sw128(CUtensorMap* map, const void* base, const cuuint64_t (&dims)[3],
                                           const cuuint64_t (&strides)[2], const cuuint32_t (&box)[3]) {
  using Encode = PFN_cuTensorMapEncodeTiled_v12000;
  static const Encode encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                                             &found);
    return err == cudaSuccess && found == cudaDriverEntryPointSuccess ? reinterpret_cast<Encode>(fn) : nullptr;
  }();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint32_t unit[3] = {1, 1, 1};
  const CUresult r = encode(map, std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                                 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                            3, const_cast<void*>(base), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// Tensor map of the expert weights for the forward's weight tiles: w [E, d, f] in boxes of
// 64 f x 64 d (one MN-major swizzle atom), or w [E, f, d] (w_transposed) in boxes of 64 d x
// 256 f (one K-major tile).
template <typename T>
inline cudaError_t encode_moe_weight_map(const MoeShape& s, const void* w, CUtensorMap* map) {
  const cuuint64_t inner = s.w_transposed ? s.d : s.f, outer = s.w_transposed ? s.f : s.d;
  return encode_tensor_map_sw128<T>(map, w, {inner, outer, cuuint64_t(s.experts)},
                                    {inner * sizeof(T), inner * outer * sizeof(T)},
                                    {64, s.w_transposed ? 256u : 64u, 1});
}

// Tensor map of rows in routing order, [A, cols], in boxes of 64 columns x box_rows rows.
template <typename T>
inline cudaError_t encode_moe_rows_map(int64_t rows, int64_t cols, const void* base, cuuint32_t box_rows,
                                       CUtensorMap* map) {
  return encode_tensor_map_sw128<T>(map, base, {cuuint64_t(cols), cuuint64_t(rows), 1},
                                    {cols * sizeof(T), rows * cols * sizeof(T)}, {64, box_rows, 1});
}

// The forward kernel for an epilogue and x's row layout (w_transposed: the dx pass, no epilogue).
template <typename T, bool kXTma>
inline auto moe_forward_sm90_kernel(int epilogue, bool w_transposed) {
  if (w_transposed) return pit_moe_forward_sm90_kernel<T, true, kXTma, kEpiNone>;
  switch (epilogue) {
    case kEpiReLU: return pit_moe_forward_sm90_kernel<T, false, kXTma, kEpiReLU>;
    case kEpiGELU: return pit_moe_forward_sm90_kernel<T, false, kXTma, kEpiGELU>;
    case kEpiSwiGLU: return pit_moe_forward_sm90_kernel<T, false, kXTma, kEpiSwiGLU>;
    case kEpiScale: return pit_moe_forward_sm90_kernel<T, false, kXTma, kEpiScale>;
    default: return pit_moe_forward_sm90_kernel<T, false, kXTma, kEpiNone>;
  }
}

// The forward with an epilogue (moe_tiles.cuh): w_up is SwiGLU's up weights, row_scale
// kEpiScale's per-assignment factors; the epilogues need w as [E, d, f] (not w_transposed).
template <typename T>
cudaError_t launch_moe_forward_sm90(cudaStream_t stream, const MoeShape& s, const void* x, const void* w,
                                    const int32_t* order, const int32_t* group_starts, const int32_t* tile_starts,
                                    void* out, int epilogue = kEpiNone, const void* w_up = nullptr,
                                    const float* row_scale = nullptr) {
  using C = MoeSm90Config;
  const bool swiglu = epilogue == kEpiSwiGLU;
  if ((epilogue != kEpiNone && s.w_transposed) || (swiglu && w_up == nullptr) ||
      (epilogue == kEpiScale && row_scale == nullptr))
    return cudaErrorInvalidValue;
  MoeShape shape = s;  // PIT_MOE_FAST_ROWS=0 (read per launch): the gathered rows' copies all predicated
  if (const char* env = std::getenv("PIT_MOE_FAST_ROWS")) shape.fast_rows = env[0] != '0';
  // PIT_MOE_SKIP_IDLE_HALF=0 (read per launch): both warpgroups multiply every tile (an A/B switch)
  if (const char* env = std::getenv("PIT_MOE_SKIP_IDLE_HALF")) shape.skip_idle_half = env[0] != '0';
  auto kernel = s.x_sorted ? moe_forward_sm90_kernel<T, true>(epilogue, s.w_transposed)
                           : moe_forward_sm90_kernel<T, false>(epilogue, s.w_transposed);
  cudaError_t err = allow_dynamic_smem(kernel, C::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int64_t col_tiles = ceil_div(s.f, int64_t(swiglu ? C::kBN / 2 : C::kBN));
  // Raster band: with at most two routing tiles per expert on average (Qwen3-30B-A3B-like:
  // 128 rows per expert), each weight column tile serves one or two CTAs, so the weights are
  // the traffic; a band of all column tiles has neighbouring CTAs read whole rows of an
  // expert's weights (contiguous DRAM) — measured on an H100: Qwen-like down-projection 0.258 →
  // 0.200 ms, up SwiGLU 0.364 → 0.344, projection ±2%. Many tiles per expert (Mixtral): band 1,
  // as before (wider bands 0.94–1.04×). PIT_MOE_COL_BAND=n overrides it (read per launch).
  const bool few_rows_per_expert = s.assignments <= 2 * int64_t(C::kBM) * s.experts;
  int64_t band = few_rows_per_expert ? col_tiles : kMoeSm90ColBand;
  if (const char* env = std::getenv("PIT_MOE_COL_BAND")) band = std::atoll(env);
  band = band < 1 ? 1 : (band > col_tiles ? col_tiles : band);
  // Row tiles from both ends (moe_tiles.cuh) where the weights are the traffic. On an H100's
  // Qwen-like projections (4 calls per timing step): 3-5% faster with Zipf routing whose popular
  // experts have the lowest ids, within +-1% uniform and one-hot (docs/moe.md, session 23).
  // PIT_MOE_TWO_ENDED=0 / 1 (read per launch) overrides it.
  shape.two_ended_rows = few_rows_per_expert;
  if (const char* env = std::getenv("PIT_MOE_TWO_ENDED")) shape.two_ended_rows = env[0] == '1';
  CUtensorMap w_map, x_map = {}, up_map = {};
  err = encode_moe_weight_map<T>(s, w, &w_map);
  if (err == cudaSuccess && s.x_sorted) err = encode_moe_rows_map<T>(s.assignments, s.d, x, C::kBM, &x_map);
  if (err == cudaSuccess && swiglu) err = encode_moe_weight_map<T>(s, w_up, &up_map);
  if (err != cudaSuccess) return err;
  // a dependent launch: its CTAs may be scheduled while the routing (or the previous kernel) ends
  const bool dependent = dependent_launch_setting("PIT_MOE_PDL") == 1;  // 2: the routing's launches only
  err = launch_dependent(kernel, unsigned(s.max_row_tiles * col_tiles), C::kThreads, C::kSmemBytes, stream, dependent,
                         static_cast<const T*>(x), static_cast<const T*>(w), order, group_starts, tile_starts,
                         static_cast<T*>(out), shape, band, w_map, x_map, up_map, row_scale);
  return err != cudaSuccess ? err : cudaGetLastError();
}

template <typename T>
cudaError_t launch_moe_tn_sm90(cudaStream_t stream, const MoeShape& s, const void* x, const void* dy,
                               const int32_t* order, const int32_t* group_starts, void* dw) {
  using C = MoeSm90Config;
  auto kernel = s.x_sorted ? (s.out_sorted ? pit_moe_tn_sm90_kernel<T, true, true> : pit_moe_tn_sm90_kernel<T, true, false>)
                           : (s.out_sorted ? pit_moe_tn_sm90_kernel<T, false, true> : pit_moe_tn_sm90_kernel<T, false, false>);
  cudaError_t err = allow_dynamic_smem(kernel, C::kSmemBytes);
  if (err != cudaSuccess) return err;
  CUtensorMap x_map = {}, dy_map = {};
  if (s.x_sorted) err = encode_moe_rows_map<T>(s.assignments, s.d, x, C::kBK, &x_map);
  if (err == cudaSuccess && s.out_sorted) err = encode_moe_rows_map<T>(s.assignments, s.f, dy, C::kBK, &dy_map);
  if (err != cudaSuccess) return err;
  const int64_t d_tiles = ceil_div(s.d, C::kBM), f_tiles = ceil_div(s.f, C::kBN);
  kernel<<<unsigned(s.experts * d_tiles * f_tiles), C::kThreads, C::kSmemBytes, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(dy), order, group_starts, static_cast<T*>(dw), s, d_tiles,
      f_tiles, x_map, dy_map);
  return cudaGetLastError();
}

}  // namespace pit
