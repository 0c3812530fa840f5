// MoE routing index on CUDA: a stable counting sort of assignments by expert.
//
//   ids [A] int32 -> order [A]        assignment ids grouped by expert, token order kept inside
//                    group_starts [E+2] offsets of groups 0..E (group E: ids outside [0, E))
//                    tile_starts [E+2]  prefix sum of each group's row tiles (tile_rows each)
//
// count -> scan -> scatter, no atomics on global memory:
//   1. one warp per chunk of kChunk assignments counts its bins in shared memory and writes
//      them bin-major ([bin][chunk]), so that
//   2. one exclusive scan (a single CTA, CUB) of that array gives each (bin, chunk) its first
//      output position; the same CTA writes group_starts and tile_starts;
//   3. each warp walks its chunk again, 32 assignments at a time in order, ranking equal bins
//      with __match_any_sync: order[position] = assignment. Stable, hence deterministic.
// Small problems (at most kRankMaxCounts (bin, chunk) counts, at most 1023 experts) run steps 2
// and 3 as one launch (pit_moe_route_rank_kernel): every CTA reads the whole count array
// (35 KB at most, from L2) and does its own share of the scan instead of waiting for a one-CTA
// scan kernel. PIT_MOE_ROUTE_TWO_LAUNCH=0 (read per launch) keeps the three launches. (Session 22
// measured a one-launch variant, each CTA counting every id itself, slower: shared-memory
// atomics; benchmarks/results/2026-11-27_session22/.)
// The three launches and the forward that follows are programmatic dependent launches on Hopper
// (common/pdl.cuh): each kernel is scheduled while the previous one runs and waits for it before
// touching memory, which hides the launch gaps of these small kernels. PIT_MOE_PDL (read per
// launch): 0 off, 2 the routing only (the forward launched plainly), unset or 1 both.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include <cub/block/block_scan.cuh>

#include "../common/ffi_common.h"
#include "../common/pdl.cuh"
#include "../common/poison_outputs.cuh"

namespace pit {
namespace {

constexpr int kChunk = 256;           // assignments per warp
constexpr int kScanThreads = 1024;
constexpr int64_t kMaxBins = 8192;    // experts + 1, held in shared memory per warp

__device__ __forceinline__ int bin_of(int32_t id, int64_t experts) {
  return (id >= 0 && id < experts) ? id : int(experts);
}

// kPrefetch: each lane loads all of its chunk's ids (kIdsPerLane) before the first use, so the
// warp waits for one load latency instead of one per 32 assignments (these one-warp CTAs are
// latency-bound). PIT_MOE_ROUTE_PREFETCH=0 (read per launch) selects the loop without it.
constexpr int kIdsPerLane = kChunk / 32;

__device__ __forceinline__ void load_chunk_bins(const int32_t* __restrict__ ids, int64_t first, int64_t last,
                                                int64_t experts, int (&bins)[kIdsPerLane]) {
#pragma unroll
  for (int j = 0; j < kIdsPerLane; ++j) {
    const int64_t a = first + j * 32 + (threadIdx.x & 31);
    bins[j] = a < last ? bin_of(ids[a], experts) : -1;
  }
}

// One 32-assignment step of step 3: lane's assignment a (bin < 0: none) goes to its bin's next
// position plus the number of earlier lanes with the same bin; the first of those lanes advances
// the bin. Stable, hence deterministic.
__device__ __forceinline__ void rank_step(int bin, int64_t a, int32_t* next_pos, int32_t* __restrict__ order) {
  const int lane = threadIdx.x & 31;
  const unsigned peers = __match_any_sync(0xffffffffu, bin);
  const int rank = __popc(peers & ((1u << lane) - 1));  // earlier lanes with the same bin
  if (bin >= 0) order[next_pos[bin] + rank] = int32_t(a);
  __syncwarp();
  if (bin >= 0 && rank == 0) next_pos[bin] += __popc(peers);
  __syncwarp();
}

template <bool kPrefetch>
__global__ void __launch_bounds__(32) pit_moe_route_count_kernel(const int32_t* __restrict__ ids, int64_t n,
                                                                 int64_t experts, int64_t n_chunks,
                                                                 int32_t* __restrict__ counts) {
  extern __shared__ int32_t bins[];
  wait_for_previous_grid();  // whatever wrote ids (and last used counts)
  allow_dependent_launch();
  const int64_t chunk = blockIdx.x;
  const int64_t first = chunk * kChunk, last = min(n, first + kChunk);
  int lane_bins[kIdsPerLane];
  if constexpr (kPrefetch) load_chunk_bins(ids, first, last, experts, lane_bins);
  for (int64_t b = threadIdx.x; b <= experts; b += 32) bins[b] = 0;
  __syncwarp();
  if constexpr (kPrefetch) {
#pragma unroll
    for (int j = 0; j < kIdsPerLane; ++j)
      if (lane_bins[j] >= 0) atomicAdd(&bins[lane_bins[j]], 1);
  } else {
    for (int64_t a = first + threadIdx.x; a < last; a += 32) atomicAdd(&bins[bin_of(ids[a], experts)], 1);
  }
  __syncwarp();
  for (int64_t b = threadIdx.x; b <= experts; b += 32) counts[b * n_chunks + chunk] = bins[b];
}

__global__ void __launch_bounds__(kScanThreads) pit_moe_route_scan_kernel(int32_t* __restrict__ counts,
                                                                          int64_t n_chunks, int64_t experts,
                                                                          int64_t tile_rows,
                                                                          int32_t* __restrict__ group_starts,
                                                                          int32_t* __restrict__ tile_starts) {
  using Scan = cub::BlockScan<int32_t, kScanThreads>;
  __shared__ typename Scan::TempStorage storage;
  __shared__ int32_t carry;
  const int64_t total = (experts + 1) * n_chunks;
  wait_for_previous_grid();  // the counts
  allow_dependent_launch();
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < total; base += kScanThreads) {  // counts -> first positions, in place
    const int64_t i = base + threadIdx.x;
    const int32_t v = i < total ? counts[i] : 0;
    int32_t excl, sum;
    Scan(storage).ExclusiveSum(v, excl, sum);
    if (i < total) counts[i] = carry + excl;
    __syncthreads();
    if (threadIdx.x == 0) carry += sum;
    __syncthreads();
  }
  for (int64_t b = threadIdx.x; b <= experts; b += kScanThreads) group_starts[b] = n_chunks > 0 ? counts[b * n_chunks] : 0;
  if (threadIdx.x == 0) group_starts[experts + 1] = carry;
  __syncthreads();
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base <= experts; base += kScanThreads) {  // tiles per group -> tile_starts
    const int64_t b = base + threadIdx.x;
    const int32_t tiles = b <= experts ? int32_t((group_starts[b + 1] - group_starts[b] + tile_rows - 1) / tile_rows) : 0;
    int32_t excl, sum;
    Scan(storage).ExclusiveSum(tiles, excl, sum);
    if (b <= experts) tile_starts[b] = carry + excl;
    __syncthreads();
    if (threadIdx.x == 0) carry += sum;
    __syncthreads();
  }
  if (threadIdx.x == 0) tile_starts[experts + 1] = carry;
}

template <bool kPrefetch>
__global__ void __launch_bounds__(32) pit_moe_route_scatter_kernel(const int32_t* __restrict__ ids, int64_t n,
                                                                   int64_t experts, int64_t n_chunks,
                                                                   const int32_t* __restrict__ positions,
                                                                   int32_t* __restrict__ order) {
  extern __shared__ int32_t next_pos[];
  wait_for_previous_grid();  // the scanned positions
  allow_dependent_launch();
  const int64_t chunk = blockIdx.x;
  const int lane = threadIdx.x;
  const int64_t first = chunk * kChunk, last = min(n, first + kChunk);
  int lane_bins[kIdsPerLane];
  if constexpr (kPrefetch) load_chunk_bins(ids, first, last, experts, lane_bins);
#pragma unroll 4
  for (int64_t b = lane; b <= experts; b += 32) next_pos[b] = positions[b * n_chunks + chunk];
  __syncwarp();
#pragma unroll
  for (int j = 0; j < kIdsPerLane; ++j) {
    const int64_t a0 = first + j * 32;
    if (a0 >= last) break;
    const int64_t a = a0 + lane;
    int bin;  // -1 past the chunk's end
    if constexpr (kPrefetch) bin = lane_bins[j];
    else bin = a < last ? bin_of(ids[a], experts) : -1;
    rank_step(bin, a, next_pos, order);
  }
}

constexpr int kRankThreads = 1024;
constexpr int kRankWarps = kRankThreads / 32;
constexpr int64_t kRankMaxBins = kRankThreads;  // experts + 1: one bin per thread in the scans
constexpr int64_t kRankMaxCounts = 8960;        // (experts + 1) * chunks in shared memory (35 KB; 48 KB static in all)

// Steps 2 and 3 in one launch for small problems: each CTA loads the whole [bin][chunk] count
// array into shared memory, sums each bin over all chunks and over the chunks before its own (a
// warp per bin), scans the bins and ranks its own chunk. CTA 0 writes group_starts and tile_starts.
__global__ void __launch_bounds__(kRankThreads) pit_moe_route_rank_kernel(
    const int32_t* __restrict__ ids, int64_t n, int64_t experts, int64_t n_chunks, int64_t tile_rows,
    const int32_t* __restrict__ counts, int32_t* __restrict__ group_starts, int32_t* __restrict__ tile_starts,
    int32_t* __restrict__ order) {
  using Scan = cub::BlockScan<int32_t, kRankThreads>;
  __shared__ typename Scan::TempStorage storage;
  __shared__ int32_t chunk_counts[kRankMaxCounts];
  __shared__ int32_t in_bin_all[kRankMaxBins];
  __shared__ int32_t next_pos[kRankMaxBins];  // in the chunks before this one, then this chunk's first position
  const int bins = int(experts + 1);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t own = blockIdx.x;
  const bool ranks = warp == own % kRankWarps;  // the warp that ranks this CTA's chunk
  wait_for_previous_grid();  // the counts (and, before them, ids)
  allow_dependent_launch();
  for (int64_t i = threadIdx.x; i < bins * n_chunks; i += kRankThreads) chunk_counts[i] = counts[i];
  int own_bins[kIdsPerLane];
  if (ranks) load_chunk_bins(ids, own * kChunk, min(n, (own + 1) * kChunk), experts, own_bins);
  __syncthreads();
  for (int bin = warp; bin < bins; bin += kRankWarps) {
    int32_t all = 0, before = 0;
    for (int64_t c = lane; c < n_chunks; c += 32) {
      const int32_t v = chunk_counts[bin * n_chunks + c];
      all += v;
      before += c < own ? v : 0;
    }
    all = __reduce_add_sync(0xffffffffu, all);
    before = __reduce_add_sync(0xffffffffu, before);
    if (lane == 0) in_bin_all[bin] = all, next_pos[bin] = before;
  }
  __syncthreads();
  const int b = threadIdx.x;  // one bin per thread
  const int32_t in_bin = b < bins ? in_bin_all[b] : 0;
  int32_t bin_start, total;
  Scan(storage).ExclusiveSum(in_bin, bin_start, total);
  if (b < bins) next_pos[b] += bin_start;
  if (blockIdx.x == 0) {
    if (b < bins) group_starts[b] = bin_start;
    if (b == 0) group_starts[bins] = total;
    const int32_t tiles = b < bins ? int32_t((in_bin + tile_rows - 1) / tile_rows) : 0;
    int32_t tile_start, all_tiles;
    __syncthreads();  // storage is reused
    Scan(storage).ExclusiveSum(tiles, tile_start, all_tiles);
    if (b < bins) tile_starts[b] = tile_start;
    if (b == 0) tile_starts[bins] = all_tiles;
  }
  __syncthreads();
  if (!ranks) return;
  const int64_t first = own * kChunk;  // step 3 on this chunk
#pragma unroll
  for (int j = 0; j < kIdsPerLane; ++j) rank_step(own_bins[j], first + j * 32 + lane, next_pos, order);
}

// Whether steps 2 and 3 run as the one rank launch (PIT_MOE_ROUTE_TWO_LAUNCH=0, read per launch, keeps three).
bool route_in_two_launches(int64_t n_chunks, int64_t experts) {
  const char* env = std::getenv("PIT_MOE_ROUTE_TWO_LAUNCH");
  return (env == nullptr || env[0] != '0') && experts + 1 <= kRankMaxBins && (experts + 1) * n_chunks <= kRankMaxCounts;
}

ffi::Error MoeRouteCuda(cudaStream_t stream, ffi::Buffer<ffi::S32> ids, ffi::Result<ffi::Buffer<ffi::S32>> order,
                        ffi::Result<ffi::Buffer<ffi::S32>> group_starts, ffi::Result<ffi::Buffer<ffi::S32>> tile_starts,
                        ffi::Result<ffi::Buffer<ffi::S32>> workspace, int64_t num_experts, int64_t tile_rows) {
  const int64_t n = element_count(ids.dimensions());
  const int64_t n_chunks = ceil_div(n, kChunk);
  if (num_experts <= 0 || num_experts + 1 > kMaxBins || tile_rows <= 0)
    return ffi::Error::InvalidArgument("pit_moe_route: num_experts must be in [1, 8191] and tile_rows positive");
  if (element_count(order->dimensions()) != n || element_count(group_starts->dimensions()) != num_experts + 2 ||
      element_count(tile_starts->dimensions()) != num_experts + 2 ||
      element_count(workspace->dimensions()) != (num_experts + 1) * n_chunks)
    return ffi::Error::InvalidArgument("pit_moe_route: output shapes do not match ids and num_experts");
  if (n >= (int64_t(1) << 31)) return ffi::Error::InvalidArgument("pit_moe_route: more than 2^31 - 1 assignments");
  poison_device_outputs(stream, order, group_starts, tile_starts);
  const size_t bin_bytes = size_t(num_experts + 1) * sizeof(int32_t);
  int32_t* counts = workspace->typed_data();
  const bool pdl = dependent_launch_setting("PIT_MOE_PDL") != 0;
  const char* prefetch_env = std::getenv("PIT_MOE_ROUTE_PREFETCH");
  const bool prefetch = prefetch_env == nullptr || prefetch_env[0] != '0';
  cudaError_t err = cudaSuccess;
  if (n_chunks > 0)
    err = launch_dependent(prefetch ? pit_moe_route_count_kernel<true> : pit_moe_route_count_kernel<false>,
                           unsigned(n_chunks), 32, bin_bytes, stream, pdl, ids.typed_data(), n, num_experts, n_chunks,
                           counts);
  if (err == cudaSuccess && route_in_two_launches(n_chunks, num_experts)) {
    err = launch_dependent(pit_moe_route_rank_kernel, unsigned(std::max<int64_t>(n_chunks, 1)), kRankThreads, 0, stream,
                           pdl, ids.typed_data(), n, num_experts, n_chunks, tile_rows,
                           static_cast<const int32_t*>(counts), group_starts->typed_data(), tile_starts->typed_data(),
                           order->typed_data());
  } else {
    if (err == cudaSuccess)
      err = launch_dependent(pit_moe_route_scan_kernel, 1, kScanThreads, 0, stream, pdl, counts, n_chunks, num_experts,
                             tile_rows, group_starts->typed_data(), tile_starts->typed_data());
    if (err == cudaSuccess && n_chunks > 0)
      err = launch_dependent(prefetch ? pit_moe_route_scatter_kernel<true> : pit_moe_route_scatter_kernel<false>,
                             unsigned(n_chunks), 32, bin_bytes, stream, pdl,
                             ids.typed_data(), n, num_experts, n_chunks, static_cast<const int32_t*>(counts),
                             order->typed_data());
  }
  if (err == cudaSuccess) err = cudaGetLastError();
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("pit_moe_route: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace pit

XLA_FFI_DEFINE_HANDLER_SYMBOL(PitMoeRouteCuda, pit::MoeRouteCuda,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("tile_rows"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
