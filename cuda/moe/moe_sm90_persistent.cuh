// Persistent variant of the Hopper MoE forward (opt-in, PIT_MOE_PERSISTENT=1: correct on H100 and
// H200 GPUs, not faster than the tiled kernel — docs/moe.md). One CTA per SM walks the (row tile,
// column tile) list with a grid stride; the producer warpgroup loads the next tile's stages while
// the consumers run the previous tile's epilogue, so the epilogue's loads, the per-tile prologue
// (row pointers, barrier setup) and the CTA launch leave the tensor cores' critical path. The
// ring's stages and barrier phases continue across tiles (it0). The ring, which the non-persistent
// kernel stages its epilogue through, is being refilled, so each consumer warp stages its rows in
// 2.3 KB of its own, 18 KB for the 8 warps (a first version stored straight from registers, 4 bytes
// per thread: 7% slower than the tiled kernel on an H200). Each consumer thread looks its two rows'
// destinations up before the main loop. Tiles are enumerated over the routing's actual tile count
// (tile_starts[E + 1]), column tiles outermost (every CTA of a wave reads one expert's weight
// column tile).
#pragma once

#include "moe_sm90.cuh"

namespace pit {

// PIT_MOE_PERSISTENT=1 picks the persistent forward (read per launch; for A/B runs while it is
// work in progress).
inline bool moe_persistent_requested() {
  const char* on = std::getenv("PIT_MOE_PERSISTENT");
  return on != nullptr && on[0] == '1';
}

// Each consumer warp's epilogue staging: its 16 rows x 64 columns of 2-byte values, rows padded
// by 16 bytes so the 8 rows a fragment store touches fall on different banks. It follows the
// shared memory the tiled kernel uses (MoeSm90Smem's row ids, unused here).
constexpr int kStagePitch = 64 * 2 + 16;
constexpr int kPersistentStagingWarpBytes = 16 * kStagePitch;
constexpr int kPersistentSmemBytes =
    MoeSm90Config::kSmemBytes + (MoeSm90Config::kConsumers / 32) * kPersistentStagingWarpBytes;
static_assert(kPersistentSmemBytes <= 227 * 1024, "persistent forward's shared memory");

#if PIT_HAS_WGMMA
__device__ __forceinline__ unsigned char* persistent_staging(const MoeSm90Smem& sm) {
  return reinterpret_cast<unsigned char*>(sm.rows + 2 * MoeSm90Config::kBM);  // 16-byte aligned
}

#endif

template <typename T, bool kWTransposed, bool kXTma, int kEpi>
__global__ void __launch_bounds__(MoeSm90Config::kThreads, 1)
    pit_moe_forward_persistent_sm90_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                           const int32_t* __restrict__ order, const int32_t* __restrict__ group_starts,
                                           const int32_t* __restrict__ tile_starts, T* __restrict__ out, MoeShape s,
                                           const __grid_constant__ CUtensorMap w_map,
                                           const __grid_constant__ CUtensorMap x_map,
                                           const __grid_constant__ CUtensorMap up_map,
                                           const float* __restrict__ row_scale) {
#if PIT_HAS_WGMMA
  using C = MoeSm90Config;
  constexpr bool kSwiGLU = kEpi == kEpiSwiGLU;
  static_assert(kEpi == kEpiNone || !kWTransposed, "the fused epilogues read w as [E, d, f]");
  constexpr int kOutCols = kSwiGLU ? C::kBN / 2 : C::kBN;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const MoeSm90Smem sm(smem_raw, C::kProducers + 1);
  __syncthreads();
  const int tid = threadIdx.x;
  const int64_t row_tiles = tile_starts[s.experts + 1];  // this routing's tiles (all groups, E included)
  const int64_t col_tiles = ceil_div(s.f, int64_t(kOutCols));
  const int64_t n_tiles = row_tiles * col_tiles;
  const int n_chunks = int(ceil_div(s.d, C::kBK));
  auto tile_of = [&](int64_t idx, MoeRouteTile* tile, int64_t* n0) {
    find_route_tile(tile_starts, group_starts, s.experts, idx % row_tiles, tile);
    *n0 = (idx / row_tiles) * kOutCols;
  };

  if (tid < C::kProducers) {
    setmaxnreg_dec<C::kProducerRegisters>();
    const int row0 = tid / 8, chunk = tid % 8;
    const int dst0 = row0 * C::kRowBytes + swizzle128(row0, chunk) * 16;
    int64_t it = 0;  // ring steps so far
    for (int64_t idx = blockIdx.x; idx < n_tiles; idx += gridDim.x) {
      MoeRouteTile tile;
      int64_t n0;
      tile_of(idx, &tile, &n0);
      if (tile.group == s.experts) continue;  // invalid ids: the consumers write zeros, no stages
      const T* a_src[C::kBM / 16];
      uint32_t a_live = 0;
      if constexpr (!kXTma) {
#pragma unroll
        for (int j = 0; j < C::kBM / 16; ++j) {
          const int r = row0 + 16 * j;
          const int32_t a = r < tile.rows ? order[tile.first + r] : 0;
          a_src[j] = x + int64_t(s.x_sorted ? tile.first + r : a / s.rows_per_source) * s.d + chunk * 8;
          a_live |= uint32_t(r < tile.rows) << j;
        }
      }
      auto load_stage = [&](int i, int stage) {
        unsigned char* a_s = sm.ring + stage * C::kStageBytes;
        unsigned char* b_s = a_s + C::kABytes;
        const int64_t k0 = int64_t(i) * C::kBK;
        if (tid == 0) {
          mbarrier_arrive_expect_tx(&sm.full[stage], kXTma ? C::kABytes + C::kBBytes : C::kBBytes);
          if constexpr (kXTma) tma_load_3d(a_s, &x_map, int(k0), int(tile.first), 0, &sm.full[stage]);
          if constexpr (kWTransposed) {
            tma_load_3d(b_s, &w_map, int(k0), int(n0), tile.group, &sm.full[stage]);
          } else {
#pragma unroll
            for (int atom = 0; atom < C::kBN / 64; ++atom) {
              const bool up = kSwiGLU && atom >= 2;
              tma_load_3d(b_s + atom * C::kAtomBytes, up ? &up_map : &w_map, int(n0) + 64 * (up ? atom - 2 : atom),
                          int(k0), tile.group, &sm.full[stage]);
            }
          }
        }
        if constexpr (kXTma) return;
        const bool k_live = k0 + chunk * 8 < s.d;
#pragma unroll
        for (int j = 0; j < C::kBM / 16; ++j) {
          const bool ok = ((a_live >> j) & 1) && k_live;
          cp_async_16(a_s + dst0 + j * 16 * C::kRowBytes, ok ? a_src[j] + k0 : x, ok ? 16 : 0);
        }
      };
      produce_stages(sm, n_chunks, load_stage, it);
      it += n_chunks;
    }
  } else {
    setmaxnreg_inc<C::kConsumerRegisters>();
    const int ctid = tid - C::kProducers, warpgroup = ctid / 128, lane = ctid % 32;
    const int row = consumer_row(ctid);
    unsigned char* staging = persistent_staging(sm) + (ctid / 32) * kPersistentStagingWarpBytes;
    const uint64_t desc_a0 = smem_descriptor_sw128(sm.ring + warpgroup * 64 * C::kRowBytes, 16, 1024);
    const uint64_t desc_b0 = kWTransposed ? smem_descriptor_sw128(sm.ring + C::kABytes, 16, 1024)
                                          : smem_descriptor_sw128(sm.ring + C::kABytes, C::kAtomBytes, 1024);
    int64_t it = 0;
    float acc[128];
    for (int64_t idx = blockIdx.x; idx < n_tiles; idx += gridDim.x) {
      MoeRouteTile tile;
      int64_t n0;
      tile_of(idx, &tile, &n0);
      const int64_t cols = s.f - n0 < kOutCols ? s.f - n0 : kOutCols;
      int64_t dst[2] = {-1, -1};  // output rows of this thread's two tile rows (-1: past the tile)
      float scale[2] = {1.0f, 1.0f};
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // issued before the main loop: the loads' latency hides
        const int r = row + 8 * h;
        if (r < tile.rows) {
          const int32_t a = order[tile.first + r];
          dst[h] = s.out_sorted ? tile.first + r : a;
          if constexpr (kEpi == kEpiScale) scale[h] = row_scale[a];
        }
      }
      if (tile.group == s.experts) {  // assignments with an invalid expert id: zero rows
#pragma unroll
        for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
      } else {
        consume_stages<0, kWTransposed ? 0 : 1, 32, kWTransposed ? 32 : 16 * C::kRowBytes, true, T>(
            acc, sm, n_chunks, desc_a0, desc_b0, it);
        it += n_chunks;
      }
      // Epilogue through this warp's own staging rows (no CTA barrier: the ring is being
      // refilled): 64 columns at a time, each thread writes its fragment, then each lane stores
      // 16-byte chunks, so a warp's store covers four full 128-byte row segments.
      constexpr int kGroups = kSwiGLU ? 16 : 32;  // 8-column groups per thread
      int64_t chunk_dst[4];  // output row of the staged row each lane stores in round q
#pragma unroll
      for (int q = 0; q < 4; ++q) chunk_dst[q] = __shfl_sync(0xffffffffu, dst[q / 2], ((4 * q + lane / 8) % 8) * 4);
#pragma unroll
      for (int p = 0; p < kGroups / 8; ++p) {
        if (64 * p >= cols) break;  // the same for the whole CTA
#pragma unroll
        for (int jj = 0; jj < 8; ++jj) {
          const int j = 8 * p + jj;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            T pair[2] = {from_float<T>(epilogue_value<kEpi>(acc, 4 * j + 2 * h, scale)),
                         from_float<T>(epilogue_value<kEpi>(acc, 4 * j + 2 * h + 1, scale))};
            *reinterpret_cast<uint32_t*>(staging + (lane / 4 + 8 * h) * kStagePitch + (8 * jj + 2 * (lane % 4)) * 2) =
                *reinterpret_cast<const uint32_t*>(pair);
          }
        }
        __syncwarp();
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int r = 4 * q + lane / 8, c = 64 * p + 8 * (lane % 8);
          if (chunk_dst[q] >= 0 && c < cols)
            *reinterpret_cast<uint4*>(out + chunk_dst[q] * s.f + n0 + c) =
                *reinterpret_cast<const uint4*>(staging + r * kStagePitch + 16 * (lane % 8));
        }
        __syncwarp();
      }
    }
  }
#endif  // PIT_HAS_WGMMA
}

// Launch of the persistent forward: one CTA per SM (or fewer when there are fewer tiles), same
// operands as launch_moe_forward_sm90.
template <typename T>
cudaError_t launch_moe_forward_persistent_sm90(cudaStream_t stream, const MoeShape& s, const void* x, const void* w,
                                               const int32_t* order, const int32_t* group_starts,
                                               const int32_t* tile_starts, void* out, int epilogue = kEpiNone,
                                               const void* w_up = nullptr, const float* row_scale = nullptr) {
  using C = MoeSm90Config;
  const bool swiglu = epilogue == kEpiSwiGLU;
  if ((epilogue != kEpiNone && s.w_transposed) || (swiglu && w_up == nullptr) ||
      (epilogue == kEpiScale && row_scale == nullptr))
    return cudaErrorInvalidValue;
  auto pick = [&](auto x_tma) {
    constexpr bool kX = decltype(x_tma)::value;
    if (s.w_transposed) return pit_moe_forward_persistent_sm90_kernel<T, true, kX, kEpiNone>;
    switch (epilogue) {
      case kEpiReLU: return pit_moe_forward_persistent_sm90_kernel<T, false, kX, kEpiReLU>;
      case kEpiGELU: return pit_moe_forward_persistent_sm90_kernel<T, false, kX, kEpiGELU>;
      case kEpiSwiGLU: return pit_moe_forward_persistent_sm90_kernel<T, false, kX, kEpiSwiGLU>;
      case kEpiScale: return pit_moe_forward_persistent_sm90_kernel<T, false, kX, kEpiScale>;
      default: return pit_moe_forward_persistent_sm90_kernel<T, false, kX, kEpiNone>;
    }
  };
  auto kernel = s.x_sorted ? pick(std::true_type{}) : pick(std::false_type{});
  cudaError_t err = allow_dynamic_smem(kernel, kPersistentSmemBytes);
  if (err != cudaSuccess) return err;
  int sms = 0;
  err = current_device_attribute(cudaDevAttrMultiProcessorCount, &sms);
  if (err != cudaSuccess) return err;
  CUtensorMap w_map, x_map = {}, up_map = {};
  err = encode_moe_weight_map<T>(s, w, &w_map);
  if (err == cudaSuccess && s.x_sorted) err = encode_moe_rows_map<T>(s.assignments, s.d, x, C::kBM, &x_map);
  if (err == cudaSuccess && swiglu) err = encode_moe_weight_map<T>(s, w_up, &up_map);
  if (err != cudaSuccess) return err;
  const int64_t col_tiles = ceil_div(s.f, int64_t(swiglu ? C::kBN / 2 : C::kBN));
  const int64_t max_tiles = s.max_row_tiles * col_tiles;  // the tile count is known on device only
  const unsigned grid = unsigned(max_tiles < sms ? max_tiles : sms);
  kernel<<<grid, C::kThreads, kPersistentSmemBytes, stream>>>(static_cast<const T*>(x), static_cast<const T*>(w), order,
                                                       group_starts, tile_starts, static_cast<T*>(out), s, w_map,
                                                       x_map, up_map, row_scale);
  return cudaGetLastError();
}

}  // namespace pit
