// Issue 3's one uncosted design (docs/kgather.md, "Why the targets are missed"): a cluster of CTAs,
// each on its own 32-row group, loading each gathered row of w once from L2 and sharing it through
// distributed shared memory. Whether that can pay depends on two rates this standalone probe
// measures (not part of the package):
//   1. gather: the forward's data movement without its MMA — each CTA (one 32-row group, 128 columns
//      of w) copies the rows of w its group lists (density d of K, sorted random ids) into a
//      2-stage shared-memory ring by 16-byte cp.async, and its threads read every staged byte back;
//      reported as gathered bytes per second from L2 (w is 32 MB: L2-resident after the first pass).
//   2. dsmem: each CTA of a cluster of C fills 64 KB of its shared memory, then every thread reads
//      the other C-1 CTAs' buffers through distributed shared memory, again and again; reported as
//      remote bytes per second over the whole GPU, next to the same loop on the CTA's own buffer.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a gather_dsmem.cu -o gather_dsmem
//   ./gather_dsmem
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "probe_check.cuh"

namespace cg = cooperative_groups;

constexpr int kK = 4096, kN = 4096;      // w [K, N] bf16
constexpr int kTileN = 128;              // columns of w per CTA: 256 bytes of each gathered row
constexpr int kRowsPerStage = 64;        // gathered rows per ring stage (16 KB)
constexpr int kThreads = 128;            // 4 warps, as the k-gather forward
constexpr int kStageBytes = kRowsPerStage * kTileN * 2;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const uint32_t s = uint32_t(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}

// One CTA per (row group g, column tile j): rows ids[offsets[g] .. offsets[g+1]) of w[:, j*128 ..].
__global__ void __launch_bounds__(kThreads) gather_rows(const uint16_t* __restrict__ w, const int* __restrict__ ids,
                                                        const int* __restrict__ offsets, int n_groups,
                                                        uint32_t* __restrict__ sink) {
  __shared__ __align__(16) uint8_t ring[2][kStageBytes];
  const int g = blockIdx.x % n_groups, j = blockIdx.x / n_groups;  // groups fastest, as the forward
  const int lo = offsets[g], hi = offsets[g + 1];
  const int n_stages = (hi - lo + kRowsPerStage - 1) / kRowsPerStage;
  auto issue = [&](int s) {
    // 64 rows x 16 chunks of 16 bytes = 1024 copies, 8 per thread
    for (int c = threadIdx.x; c < kRowsPerStage * 16; c += kThreads) {
      const int r = lo + s * kRowsPerStage + c / 16;
      if (r < hi) cp_async16(&ring[s & 1][c * 16], w + size_t(ids[r]) * kN + j * kTileN + (c % 16) * 8);
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
  };
  uint32_t acc = 0;
  if (n_stages > 0) issue(0);
  for (int s = 0; s < n_stages; ++s) {
    if (s + 1 < n_stages) {
      issue(s + 1);
      asm volatile("cp.async.wait_group 1;" ::: "memory");
    } else {
      asm volatile("cp.async.wait_group 0;" ::: "memory");
    }
    __syncthreads();
    const uint4* stage = reinterpret_cast<const uint4*>(ring[s & 1]);
    for (int i = threadIdx.x; i < kStageBytes / 16; i += kThreads) {  // every byte read back, as ldmatrix would
      const uint4 v = stage[i];
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    __syncthreads();  // stage s is refilled at s + 2
  }
  if (acc == 0x9e3779b9u) sink[threadIdx.x] = acc;  // keeps the reads
}

// Cluster of C CTAs: fill 64 KB each, then read peers' (or, kLocal, one's own) buffers kRounds times.
constexpr int kBufBytes = 64 * 1024;
template <bool kLocal>
__global__ void __launch_bounds__(256) dsmem_read(const uint4* __restrict__ src, int rounds, uint32_t* __restrict__ sink) {
  extern __shared__ __align__(16) uint4 buf[];
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = int(cluster.block_rank()), size = int(cluster.num_blocks());
  for (int i = threadIdx.x; i < kBufBytes / 16; i += blockDim.x) buf[i] = src[(size_t(blockIdx.x) * kBufBytes / 16 + i) % 65536];
  cluster.sync();
  uint32_t acc = 0;
  for (int round = 0; round < rounds; ++round) {
    for (int p = 1; p < (kLocal ? 2 : size); ++p) {
      const uint4* peer = kLocal ? buf : cluster.map_shared_rank(buf, (rank + p) % size);
#pragma unroll 8  // several loads in flight per thread: the rate, not one load's latency
      for (int i = threadIdx.x; i < kBufBytes / 16; i += blockDim.x) {
        const uint4 v = peer[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
      }
    }
  }
  cluster.sync();  // no CTA leaves while a peer may still read its buffer
  if (acc == 0x9e3779b9u) sink[threadIdx.x] = acc;
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("card %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  uint16_t* w;
  CHECK(cudaMalloc(&w, size_t(kK) * kN * 2));
  CHECK(cudaMemset(w, 0x3c, size_t(kK) * kN * 2));
  uint32_t* sink;
  CHECK(cudaMalloc(&sink, 4096));

  std::printf("\n| gather (4096³ forward's w traffic, no MMA) | density | gathered GB | ms | TB/s from L2 |\n|---|---|---|---|---|\n");
  const int n_groups = 4096 / 32, n_tiles = kN / kTileN;
  std::mt19937 rng(7);
  for (double density : {0.05, 0.1, 0.5, 1.0}) {
    std::vector<int> ids, offsets = {0};
    for (int g = 0; g < n_groups; ++g) {
      for (int k = 0; k < kK; ++k)
        if (std::uniform_real_distribution<double>(0, 1)(rng) < density) ids.push_back(k);
      offsets.push_back(int(ids.size()));
    }
    int *d_ids, *d_off;
    CHECK(cudaMalloc(&d_ids, std::max<size_t>(1, ids.size()) * 4));
    CHECK(cudaMalloc(&d_off, offsets.size() * 4));
    CHECK(cudaMemcpy(d_ids, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(d_off, offsets.data(), offsets.size() * 4, cudaMemcpyHostToDevice));
    const float ms = time_ms([&] { gather_rows<<<n_groups * n_tiles, kThreads>>>(w, d_ids, d_off, n_groups, sink); }, 20);
    const double bytes = double(ids.size()) * n_tiles * kTileN * 2;
    std::printf("| cp.async 16 B, 2 x 16 KB ring | %.2f | %.2f | %.3f | %.2f |\n", density, bytes / 1e9, ms,
                bytes / (ms * 1e-3) / 1e12);
    CHECK(cudaFree(d_ids));
    CHECK(cudaFree(d_off));
  }

  std::printf("\n| distributed shared memory, 256 threads, 64 KB per CTA | cluster | CTAs | bytes read | ms | TB/s |\n|---|---|---|---|---|---|\n");
  CHECK(cudaFuncSetAttribute(dsmem_read<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, kBufBytes));
  CHECK(cudaFuncSetAttribute(dsmem_read<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, kBufBytes));
  CHECK(cudaFuncSetAttribute(dsmem_read<false>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  const int rounds = 64;
  for (int cluster : {2, 4, 8, 16}) {
    for (bool local : {false, true}) {
      if (local && cluster != 2) continue;  // one local reference row
      const int ctas = (prop.multiProcessorCount * 2 / cluster) * cluster;
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(ctas);
      cfg.blockDim = dim3(256);
      cfg.dynamicSmemBytes = kBufBytes;
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeClusterDimension;
      attr[0].val.clusterDim.x = cluster;
      attr[0].val.clusterDim.y = 1;
      attr[0].val.clusterDim.z = 1;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
      auto kernel = local ? dsmem_read<true> : dsmem_read<false>;
      int max_clusters = 0;
      if (cudaOccupancyMaxActiveClusters(&max_clusters, kernel, &cfg) != cudaSuccess || max_clusters == 0) {
        cudaGetLastError();
        std::printf("| %s | %d | — | — | — | cluster not schedulable |\n", local ? "local" : "remote", cluster);
        continue;
      }
      const float ms = time_ms([&] {
        CHECK(cudaLaunchKernelEx(&cfg, kernel, reinterpret_cast<const uint4*>(w), rounds, sink));
      }, 10);
      const double bytes = double(ctas) * rounds * (local ? 1 : cluster - 1) * kBufBytes;
      std::printf("| %s | %d | %d (≤ %d clusters at once) | %.2f GB | %.3f | %.2f |\n", local ? "local" : "remote",
                  cluster, ctas, max_clusters, bytes / 1e9, ms, bytes / (ms * 1e-3) / 1e12);
    }
  }
  return 0;
}
