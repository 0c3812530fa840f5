// How fast can one 4096² bf16 array (32 MB) be read on this card, and in which pattern?
// Standalone probe for issue 2 (not part of the package). Each pattern folds x into the same
// kind of output the mask pass writes (32-column words per row block or slab), so only the read's
// shape differs. Every timing cycles over 16 distinct arrays (512 MB, far past L2), back to back,
// timed with events; a vectorised copy (read + write) is measured the same way.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a read_patterns.cu -o read_patterns
//   ./read_patterns [rows cols]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "probe_check.cuh"

constexpr int kArrays = 16;

enum Load { kStreaming = 0, kReadOnly = 1, kPrefetch256 = 2, kPlain = 3 };

template <int kLoad>
__device__ __forceinline__ uint4 load16(const uint4* p) {
  if constexpr (kLoad == kStreaming) return __ldcs(p);
  if constexpr (kLoad == kReadOnly) return __ldg(p);
  if constexpr (kLoad == kPlain) return *p;
  uint4 v;  // read-only path, L2 fetches 256-byte sectors groups
  asm volatile("ld.global.nc.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t nz8(uint4 v) {  // one bit per bf16 element: |x| != 0
  uint32_t b = 0;
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    b |= uint32_t((w[i] & 0x7fffu) != 0) << (2 * i);
    b |= uint32_t((w[i] & 0x7fff0000u) != 0) << (2 * i + 1);
  }
  return b;
}

// The mask pass's pattern: one warp per (slab of 32 rows, 256 columns), kInFlight rows per load
// round, 8 warps per CTA over adjacent column chunks. Writes one byte of bits per lane.
template <int kInFlight, int kLoad, int kSlabRows>
__global__ void __launch_bounds__(256) mask_pattern(const uint16_t* __restrict__ x, uint8_t* __restrict__ out,
                                                    int rows, int cols) {
  const int lane = threadIdx.x & 31;
  const int chunks = cols / 256;
  const int task = blockIdx.x * 8 + (threadIdx.x >> 5);
  const int slab = task / chunks, chunk = task % chunks;
  if (slab * kSlabRows >= rows) return;
  const uint16_t* base = x + size_t(slab) * kSlabRows * cols + chunk * 256 + lane * 8;
  uint32_t bits = 0;
#pragma unroll 1
  for (int r = 0; r < kSlabRows; r += kInFlight) {
    uint4 v[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) v[u] = load16<kLoad>(reinterpret_cast<const uint4*>(base + size_t(r + u) * cols));
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) bits |= nz8(v[u]);
  }
  out[size_t(slab) * (cols / 8) + chunk * 32 + lane] = uint8_t(bits);
}

// Row-contiguous: one warp per (kRows rows, 4 KB of each row = 2048 columns); a load round is one
// row's 4 KB (8 loads per lane), so each round reads whole DRAM pages in order.
template <int kRows, int kLoad>
__global__ void __launch_bounds__(256) row_pattern(const uint16_t* __restrict__ x, uint8_t* __restrict__ out,
                                                   int rows, int cols) {
  const int lane = threadIdx.x & 31;
  const int halves = cols / 2048;
  const int task = blockIdx.x * 8 + (threadIdx.x >> 5);
  const int group = task / halves, half = task % halves;
  if (group * kRows >= rows) return;
  const uint16_t* base = x + size_t(group) * kRows * cols + half * 2048 + lane * 8;
  uint32_t bits[8] = {};
#pragma unroll 1
  for (int r = 0; r < kRows; ++r) {
    uint4 v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = load16<kLoad>(reinterpret_cast<const uint4*>(base + size_t(r) * cols + j * 256));
#pragma unroll
    for (int j = 0; j < 8; ++j) bits[j] |= nz8(v[j]);
  }
  uint8_t* o = out + size_t(group) * (cols / 8) + half * 256 + lane;
#pragma unroll
  for (int j = 0; j < 8; ++j) o[j * 32] = uint8_t(bits[j]);
}

// Flat read: each thread kInFlight 16-byte loads strided by the grid, then grid-strides on.
template <int kInFlight>
__global__ void __launch_bounds__(256) flat_read(const uint4* __restrict__ x, uint32_t* __restrict__ out, size_t n) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  uint32_t bits = 0;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride * kInFlight) {
    uint4 v[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) v[u] = i + u * stride < n ? __ldcs(x + i + u * stride) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) bits |= nz8(v[u]);
  }
  if (bits & 0x80u) out[threadIdx.x] = bits;  // keeps the loads (a few stores of the same words)
}

__global__ void __launch_bounds__(256) copy_kernel(const uint4* __restrict__ x, uint4* __restrict__ y, size_t n) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride * 4) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = i + u * stride < n ? __ldcs(x + i + u * stride) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (i + u * stride < n) __stcs(y + i + u * stride, v[u]);
  }
}

// TMA bulk copies: one CTA per slab of kSlabRows rows (contiguous in memory), a ring of kStages
// stages of kStageBytes filled by cp.async.bulk, consumed by all threads (OR per column).
template <int kSlabRows, int kStages, int kStageBytes>
__global__ void __launch_bounds__(256) tma_slab(const uint16_t* __restrict__ x, uint8_t* __restrict__ out, int rows,
                                                int cols) {
  extern __shared__ __align__(128) uint8_t ring[];
  __shared__ __align__(8) uint64_t full[kStages];
  const int slab = blockIdx.x;
  if (slab * kSlabRows >= rows) return;
  const size_t slab_bytes = size_t(kSlabRows) * cols * 2;
  const int n_stages_total = int(slab_bytes / kStageBytes);
  const uint8_t* src = reinterpret_cast<const uint8_t*>(x + size_t(slab) * kSlabRows * cols);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      uint32_t a = uint32_t(__cvta_generic_to_shared(&full[s]));
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(a));
    }
    asm volatile("fence.mbarrier_init.release.cluster;");
  }
  __syncthreads();
  auto issue = [&](int t) {
    const int s = t % kStages;
    uint32_t bar = uint32_t(__cvta_generic_to_shared(&full[s]));
    uint32_t dst = uint32_t(__cvta_generic_to_shared(ring + size_t(s) * kStageBytes));
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(kStageBytes));
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
        "l"(src + size_t(t) * kStageBytes), "r"(kStageBytes), "r"(bar)
        : "memory");
  };
  if (threadIdx.x == 0)
    for (int t = 0; t < kStages && t < n_stages_total; ++t) issue(t);
  // Stages hold whole 8 KB rows (cols == 4096, checked by the caller): thread t owns 16-byte
  // column groups t and t + 256 of every row.
  uint32_t bits0 = 0, bits1 = 0;
  for (int t = 0; t < n_stages_total; ++t) {
    const int s = t % kStages;
    const uint32_t parity = (t / kStages) & 1;
    uint32_t bar = uint32_t(__cvta_generic_to_shared(&full[s]));
    asm volatile(
        "{\n .reg .pred p;\n WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra WAIT_%=;\n}\n" ::"r"(
            bar),
        "r"(parity)
        : "memory");
    const uint4* stage = reinterpret_cast<const uint4*>(ring + size_t(s) * kStageBytes);
#pragma unroll
    for (int i = threadIdx.x; i < kStageBytes / 16; i += 512) {
      bits0 |= nz8(stage[i]);
      bits1 |= nz8(stage[i + 256]);
    }
    __syncthreads();  // every thread done with stage s before it is refilled
    if (threadIdx.x == 0 && t + kStages < n_stages_total) issue(t + kStages);
  }
  out[size_t(slab) * 512 + threadIdx.x] = uint8_t(bits0);
  out[size_t(slab) * 512 + threadIdx.x + 256] = uint8_t(bits1);
}

__global__ void fill(uint16_t* x, size_t n, size_t cols, uint32_t seed) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    // 90% of 32x1 tiles zero: the tile's nonzero-ness from (row block, column) alone
    const size_t r = i / cols, c = i % cols;
    uint32_t t = uint32_t(r / 32) * 40503u + uint32_t(c) * 2246822519u + seed;
    t ^= t >> 16;
    t *= 0x7feb352du;
    t ^= t >> 15;
    x[i] = (t % 10 == 0) ? uint16_t(0x3f80 | (h & 0x7f)) : 0;
  }
}

struct Timer {
  cudaEvent_t a, b;
  Timer() {
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
  }
};

template <typename F>
float time_us(F&& launch, int reps) {
  static Timer t;
  for (int i = 0; i < kArrays; ++i) launch(i);  // warm
  CHECK(cudaEventRecord(t.a));
  for (int r = 0; r < reps; ++r)
    for (int i = 0; i < kArrays; ++i) launch(i);
  CHECK(cudaEventRecord(t.b));
  CHECK(cudaEventSynchronize(t.b));
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, t.a, t.b));
  CHECK(cudaGetLastError());
  return ms * 1000.f / (reps * kArrays);
}

int main(int argc, char** argv) {
  const int rows = argc > 2 ? std::atoi(argv[1]) : 4096, cols = argc > 2 ? std::atoi(argv[2]) : 4096;
  const size_t n = size_t(rows) * cols, bytes = n * 2;
  std::vector<uint16_t*> xs(kArrays);
  for (auto& p : xs) {
    CHECK(cudaMalloc(&p, bytes));
    fill<<<1024, 256>>>(p, n, size_t(cols), uint32_t(&p - xs.data()) * 7919u + 1);
  }
  uint16_t* y[2];
  for (auto& p : y) CHECK(cudaMalloc(&p, bytes));
  uint8_t* out;
  CHECK(cudaMalloc(&out, n / 8 + 4096));
  CHECK(cudaDeviceSynchronize());
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  std::printf("card %s, %d SMs, L2 %d MB; x %d x %d bf16 (%.1f MB), %d arrays per round\n", prop.name, sms,
              prop.l2CacheSize >> 20, rows, cols, bytes / 1e6, kArrays);

  struct Row {
    const char* name;
    std::vector<float> us;
    bool is_copy;
  };
  std::vector<Row> table;
  const int reps = 20, rounds = 5;
  auto add = [&](const char* name, bool is_copy, auto&& launch) {
    Row* row = nullptr;
    for (auto& r : table)
      if (r.name == name) row = &r;
    if (!row) {
      table.push_back({name, {}, is_copy});
      row = &table.back();
    }
    row->us.push_back(time_us(launch, reps));
  };
  const size_t nv = bytes / 16;
  const unsigned mask_ctas32 = unsigned((rows / 32) * (cols / 256) / 8);
  const unsigned mask_ctas16 = unsigned((rows / 16) * (cols / 256) / 8);
  const unsigned row_ctas8 = unsigned((rows / 8) * (cols / 2048) / 8);
  const unsigned row_ctas4 = unsigned((rows / 4) * (cols / 2048) / 8);
  // Every x-reading pattern has the same signature: one table, one launch line.
  struct Pattern {
    const char* name;
    void (*kernel)(const uint16_t*, uint8_t*, int, int);
    unsigned ctas;
    int smem;  // dynamic shared memory bytes (the TMA rings)
  };
  std::vector<Pattern> patterns = {
      {"mask pattern 32 rows, 8 in flight, .cs (main)", mask_pattern<8, kStreaming, 32>, mask_ctas32, 0},
      {"mask pattern 32 rows, 16 in flight, .cs", mask_pattern<16, kStreaming, 32>, mask_ctas32, 0},
      {"mask pattern 32 rows, 8 in flight, .nc", mask_pattern<8, kReadOnly, 32>, mask_ctas32, 0},
      {"mask pattern 32 rows, 8 in flight, .nc L2::256B", mask_pattern<8, kPrefetch256, 32>, mask_ctas32, 0},
      {"mask pattern 32 rows, 8 in flight, plain", mask_pattern<8, kPlain, 32>, mask_ctas32, 0},
      {"mask pattern 16 rows, 8 in flight, .cs", mask_pattern<8, kStreaming, 16>, mask_ctas16, 0},
      {"mask pattern 16 rows, 16 in flight, .cs", mask_pattern<16, kStreaming, 16>, mask_ctas16, 0},
      {"mask pattern 16 rows, 8 in flight, L2::256B", mask_pattern<8, kPrefetch256, 16>, mask_ctas16, 0},
      {"row pattern 8 rows x 4 KB, .cs", row_pattern<8, kStreaming>, row_ctas8, 0},
      {"row pattern 4 rows x 4 KB, .cs", row_pattern<4, kStreaming>, row_ctas4, 0},
      {"row pattern 4 rows x 4 KB, L2::256B", row_pattern<4, kPrefetch256>, row_ctas4, 0},
  };
  if (cols == 4096) {  // the TMA consumer assumes 8 KB rows
    patterns.push_back({"TMA slab 32 rows, 4 x 32 KB ring", tma_slab<32, 4, 32768>, unsigned(rows / 32), 4 * 32768});
    patterns.push_back({"TMA slab 32 rows, 6 x 16 KB ring", tma_slab<32, 6, 16384>, unsigned(rows / 32), 6 * 16384});
    patterns.push_back({"TMA slab 16 rows, 4 x 16 KB ring", tma_slab<16, 4, 16384>, unsigned(rows / 16), 4 * 16384});
    patterns.push_back({"TMA slab 8 rows, 4 x 16 KB ring", tma_slab<8, 4, 16384>, unsigned(rows / 8), 4 * 16384});
  }
  for (const Pattern& pt : patterns)
    if (pt.smem > 0) CHECK(cudaFuncSetAttribute(pt.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, pt.smem));
  for (int round = 0; round < rounds; ++round) {
    add("copy (read + write), grid 4 waves of 8 CTAs/SM", true, [&](int i) {
      copy_kernel<<<sms * 8 * 4, 256>>>(reinterpret_cast<const uint4*>(xs[i]), reinterpret_cast<uint4*>(y[i & 1]), nv);
    });
    add("copy, grid = n/1024 vectors", true, [&](int i) {
      copy_kernel<<<unsigned((nv + 1023) / 1024), 256>>>(reinterpret_cast<const uint4*>(xs[i]),
                                                         reinterpret_cast<uint4*>(y[i & 1]), nv);
    });
    add("flat read, 8 in flight, 1 wave of 8 CTAs/SM", false, [&](int i) {
      flat_read<8><<<sms * 8, 256>>>(reinterpret_cast<const uint4*>(xs[i]), reinterpret_cast<uint32_t*>(out), nv);
    });
    add("flat read, 4 in flight, n/1024 vectors", false, [&](int i) {
      flat_read<4><<<unsigned((nv + 1023) / 1024), 256>>>(reinterpret_cast<const uint4*>(xs[i]),
                                                          reinterpret_cast<uint32_t*>(out), nv);
    });
    for (const Pattern& pt : patterns)
      add(pt.name, false, [&](int i) { pt.kernel<<<pt.ctas, 256, pt.smem>>>(xs[i], out, rows, cols); });
  }
  float copy_best = 1e30f;
  for (auto& r : table) {
    std::sort(r.us.begin(), r.us.end());
    if (r.is_copy) copy_best = std::min(copy_best, r.us[r.us.size() / 2]);
  }
  const double copy_bw = 2.0 * bytes / (copy_best * 1e-6);
  std::printf("\n| pattern | µs (median of %d rounds; min–max) | read GB/s | fraction of the faster copy |\n|---|---|---|---|\n",
              rounds);
  for (auto& r : table) {
    const float med = r.us[r.us.size() / 2];
    const double moved = r.is_copy ? 2.0 * bytes : double(bytes);
    std::printf("| %s | %.1f (%.1f–%.1f) | %.0f | %.2f |\n", r.name, med, r.us.front(), r.us.back(),
                moved / (med * 1e-6) / 1e9, moved / (med * 1e-6) / copy_bw);
  }
  return 0;
}
