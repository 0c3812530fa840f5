// Where the k-gather forward GEMM's time goes (issue 3). gather_dsmem.cu measured its w-row gather
// alone at 8.2 TB/s from L2 at density 0.1 (H200, session 30), about twice what the forward draws
// at 90% sparsity. This probe runs the package's forward kernel (the .cu is included, so it is the
// same code) next to a ladder of copies of its structure with parts switched off, on identical
// synthetic inputs (4096³ and OPT fc2, random sorted column ids per 32-row group), so the part
// that costs the time shows as a step in the ladder:
//   full      packed-x loads + w-row gather + ldmatrix/mma.sync + staged store (= the forward)
//   no_mma    the same with the math replaced by a read-back of every staged byte
//   no_x      full without the packed-x loads (x stage left as it was)
//   no_loads  math and store only: the tensor-core time over the same k-steps
//   gather    w rows only, read back (gather_dsmem's gather inside this kernel's skeleton)
// plus the full ladder at other ring depths / k-steps (occupancy changes with them). Session 30's
// runs: the first table found the padded shared-memory rows; the rows prefixed "swz" repeat the ladder
// on the swizzled layout the package took from it.
//
//   J=$(python3 -c "import jax.ffi; print(jax.ffi.include_dir())")
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -isystem=$J forward_ladder.cu -o forward_ladder
//   ./forward_ladder
#include "../../cuda/kgather/kgather_cuda.cu"

#include <algorithm>
#include <random>
#include <vector>

#include "probe_check.cuh"

namespace pit {

enum Part : int { kFull = 0, kNoMma = 1, kNoX = 2, kNoLoads = 3, kGather = 4 };

// kSwz: rows unpadded, 16-byte chunks XOR-swizzled by row % 8 (the package's layout since session 30).
template <int kStages, int kBK, bool kHasA = true, bool kPadB = true, bool kSwz = false>
struct LadderConfig {
  static constexpr int kBM = 32, kBN = 128, kVec = 8;
  static constexpr int kAStride = kBK + (kSwz ? 0 : kVec), kBStride = kBN + (kPadB && !kSwz ? kVec : 0);
  __device__ __forceinline__ static int at(int row, int col, int stride) {
    if constexpr (kSwz) return row * stride + (((col / kVec) ^ (row & 7)) * kVec) + col % kVec;
    else return row * stride + col;
  }
  static constexpr int kAElems = kHasA ? kBM * kAStride : 0;
  static constexpr int kStageElems = kAElems + kBK * kBStride;
  static constexpr int kSmemBytes = kStages * kStageElems * 2 > 32 * (128 + 8) * 2 ? kStages * kStageElems * 2
                                                                                      : 32 * (128 + 8) * 2;
};

// One CTA per (32-row group, 128 columns), as pit_kgather_forward_kernel (bf16, 16-byte rows).
// kIssueFirst: each step issues the next stage's copies before waiting for its own (two barriers
// per step, as gather_dsmem's gather), instead of after (one barrier, the forward's order).
template <int kPart, int kStages, int kBK, bool kIssueFirst = false, bool kPadB = true, bool kStore = true,
          bool kSwz = false>
__global__ void __launch_bounds__(128) ladder_kernel(const __nv_bfloat16* __restrict__ packed,
                                                     const int32_t* __restrict__ column_ids,
                                                     const int32_t* __restrict__ counts,
                                                     const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ y,
                                                     int groups, int packed_k, int n, uint32_t* sink) {
  using C = LadderConfig<kStages, kBK, kPart != kGather, kPadB, kSwz>;
  using T = __nv_bfloat16;
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  T* smem = reinterpret_cast<T*>(smem_bytes);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = blockIdx.x % groups, n_tile = blockIdx.x / groups;
  const int n0 = n_tile * C::kBN;
  const int len = counts[group];
  const int n_chunks = (len + kBK - 1) / kBK;
  const int padded = (len + 31) / 32 * 32;
  const T* a_src = packed + size_t(group) * 32 * packed_k;
  const int32_t* ids = column_ids + size_t(group) * packed_k;
  constexpr int kAVecsPerRow = kBK / 8, kBVecsPerRow = C::kBN / 8;
  constexpr int kRowsPerPass = 128 / kBVecsPerRow, kIdsPerThread = kBK / kRowsPerPass;
  const int my_row = threadIdx.x / kBVecsPerRow, my_col = (threadIdx.x % kBVecsPerRow) * 8;
  constexpr bool kLoadX = kPart == kFull || kPart == kNoMma;
  constexpr bool kLoadW = kPart != kNoLoads;
  constexpr bool kMath = kPart == kFull || kPart == kNoX || kPart == kNoLoads;

  auto fetch_ids = [&](int chunk, int32_t (&out)[kIdsPerThread]) {
#pragma unroll
    for (int j = 0; j < kIdsPerThread; ++j) {
      const int p = chunk * kBK + my_row + j * kRowsPerPass;
      out[j] = (kLoadW && chunk < n_chunks && p < padded) ? ids[p] : -1;
    }
  };
  auto load_stage = [&](int chunk, int stage, const int32_t (&k_ids)[kIdsPerThread]) {
    T* as = smem + stage * C::kStageElems;
    T* bs = as + C::kAElems;
    const int p0 = chunk * kBK;
    if constexpr (kLoadX) {
      for (int i = threadIdx.x; i < C::kBM * kAVecsPerRow; i += 128) {
        const int r = i / kAVecsPerRow, c = (i % kAVecsPerRow) * 8;
        const bool ok = p0 + c < padded;
        cp_async_16(as + C::at(r, c, C::kAStride), ok ? a_src + size_t(r) * packed_k + p0 + c : a_src, ok ? 16 : 0);
      }
    }
    if constexpr (kLoadW) {
#pragma unroll
      for (int j = 0; j < kIdsPerThread; ++j) {
        const int64_t k = k_ids[j];
        cp_async_16(bs + C::at(my_row + j * kRowsPerPass, my_col, C::kBStride), k < 0 ? w : w + k * n + n0 + my_col,
                    k < 0 ? 0 : 16);
      }
    }
  };

  float acc[2][4][4] = {};
  uint32_t readback = 0;
  auto math = [&](const T* as, const T* bs) {
    if constexpr (kMath) {
#pragma unroll
      for (int ks = 0; ks < kBK / 16; ++ks) {
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
    } else {  // every staged byte of w (and x where loaded) read once, as the ldmatrix would
      const uint4* stage = reinterpret_cast<const uint4*>(kLoadX ? as : bs);
      const int vecs = (kLoadX ? C::kStageElems : kBK * C::kBStride) / 8;  // B alone: w rows only
      for (int i = threadIdx.x; i < vecs; i += 128) {
        const uint4 v = stage[i];
        readback ^= v.x ^ v.y ^ v.z ^ v.w;
      }
    }
  };

  int32_t k_ids[kIdsPerThread];
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    fetch_ids(st, k_ids);
    if (st < n_chunks) load_stage(st, st, k_ids);
    cp_async_commit();
  }
  fetch_ids(kStages - 1, k_ids);
  for (int chunk = 0; chunk < n_chunks; ++chunk) {
    const int next = chunk + kStages - 1;
    if constexpr (kIssueFirst) {  // the slot of `next` was freed by the previous step's last barrier
      if (next < n_chunks) load_stage(next, next % kStages, k_ids);
      cp_async_commit();
      fetch_ids(next + 1, k_ids);
      cp_async_wait<kStages - 1>();
      __syncthreads();
    } else {
      cp_async_wait<kStages - 2>();
      __syncthreads();
      if (next < n_chunks) load_stage(next, next % kStages, k_ids);
      cp_async_commit();
      fetch_ids(next + 1, k_ids);
    }
    const T* as = smem + (chunk % kStages) * C::kStageElems;
    math(as, as + C::kAElems);
    if constexpr (kIssueFirst) __syncthreads();
  }
  if constexpr (!kStore) {
    if (readback == 0x9e3779b9u || acc[0][0][0] == 1.2345f) sink[threadIdx.x] = readback;
    return;
  }
  // staged store, as the forward's
  cp_async_wait<0>();
  __syncthreads();
  constexpr int kCStride = C::kBN + 8;
  const int gq = lane / 4, tq = lane % 4;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = mi * 16 + gq + half * 8, c = warp * 32 + ni * 8 + 2 * tq;
        smem[r * kCStride + c] = __float2bfloat16(acc[mi][ni][2 * half]);
        smem[r * kCStride + c + 1] = __float2bfloat16(acc[mi][ni][2 * half + 1]);
      }
  __syncthreads();
  for (int i = threadIdx.x; i < 32 * 16; i += 128) {
    const int r = i / 16, c = (i % 16) * 8;
    *reinterpret_cast<uint4*>(y + size_t(group * 32 + r) * n + n0 + c) =
        *reinterpret_cast<const uint4*>(smem + r * kCStride + c);
  }
  if (readback == 0x9e3779b9u) sink[threadIdx.x] = readback;
}

}  // namespace pit

using bf16 = __nv_bfloat16;

// smem_bytes > 0: launched with that much dynamic shared memory (caps the CTAs per SM)
template <int kPart, int kStages, int kBK, bool kIssueFirst = false, bool kPadB = true, bool kStore = true,
          bool kSwz = false>
float run_ladder(const bf16* packed, const int32_t* ids, const int32_t* counts, const bf16* w, bf16* y, int groups,
                 int packed_k, int n, uint32_t* sink, int* ctas_per_sm, int smem_bytes = 0) {
  using C = pit::LadderConfig<kStages, kBK, kPart != pit::kGather, kPadB, kSwz>;
  auto kernel = pit::ladder_kernel<kPart, kStages, kBK, kIssueFirst, kPadB, kStore, kSwz>;
  const int smem = std::max(smem_bytes, C::kSmemBytes);
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(ctas_per_sm, kernel, 128, smem));
  const unsigned grid = unsigned(groups * (n / 128));
  return time_ms([&] { kernel<<<grid, 128, smem>>>(packed, ids, counts, w, y, groups, packed_k, n, sink); }, 20);
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("card %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  uint32_t* sink;
  CHECK(cudaMalloc(&sink, 4096));
  struct Shape { const char* name; int m, k, n; };
  std::printf("\n| shape | density | part | stages x k-step | CTAs/SM | ms | w+x GB gathered | TB/s |\n"
              "|---|---|---|---|---|---|---|---|\n");
  for (Shape sh : {Shape{"4096³", 4096, 4096, 4096}, Shape{"fc2", 4096, 16384, 4096}}) {
    const int groups = sh.m / 32, packed_k = sh.k;
    bf16 *w, *y, *packed;
    CHECK(cudaMalloc(&w, size_t(sh.k) * sh.n * 2));
    CHECK(cudaMalloc(&y, size_t(sh.m) * sh.n * 2));
    CHECK(cudaMalloc(&packed, size_t(sh.m) * packed_k * 2));
    CHECK(cudaMemset(w, 0x3c, size_t(sh.k) * sh.n * 2));
    CHECK(cudaMemset(packed, 0x3c, size_t(sh.m) * packed_k * 2));
    int32_t *d_ids, *d_counts;
    CHECK(cudaMalloc(&d_ids, size_t(groups) * packed_k * 4));
    CHECK(cudaMalloc(&d_counts, groups * 4));
    std::mt19937 rng(11);
    for (double density : {0.01, 0.1, 0.5}) {
      std::vector<int32_t> ids(size_t(groups) * packed_k, -1), counts(groups);
      size_t listed = 0;
      for (int g = 0; g < groups; ++g) {
        int c = 0;
        for (int k = 0; k < sh.k; ++k)
          if (std::uniform_real_distribution<double>(0, 1)(rng) < density) ids[size_t(g) * packed_k + c++] = k;
        counts[g] = c;
        listed += c;
      }
      CHECK(cudaMemcpy(d_ids, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
      CHECK(cudaMemcpy(d_counts, counts.data(), groups * 4, cudaMemcpyHostToDevice));
      const double w_bytes = double(listed) * sh.n * 2, x_bytes = double(listed) * 32 * 2 * (sh.n / 128);
      // the package's kernel itself
      {
        using Cf = pit::ForwardConfig<bf16>;
        auto kernel = pit::pit_kgather_forward_kernel<bf16, true>;
        CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cf::kSmemBytes));
        int occ = 0;
        CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, 128, Cf::kSmemBytes));
        const pit::KGatherShape s = pit::make_kgather_shape(1, sh.m, sh.k, sh.n, 32, 1);
        const float ms = time_ms([&] {
          kernel<<<unsigned(groups * (sh.n / 128)), 128, Cf::kSmemBytes>>>(packed, d_ids, d_counts, w, y, s, true);
        }, 20);
        std::printf("| %s | %.2f | package forward | 2 x 64 | %d | %.4f | %.3f | %.2f |\n", sh.name, density, occ, ms,
                    (w_bytes + x_bytes) / 1e9, (w_bytes + x_bytes) / (ms * 1e-3) / 1e12);
      }
      auto row = [&](const char* part, const char* ring, int occ, float ms, double bytes) {
        std::printf("| %s | %.2f | %s | %s | %d | %.4f | %.3f | %.2f |\n", sh.name, density, part, ring, occ, ms,
                    bytes / 1e9, bytes / (ms * 1e-3) / 1e12);
      };
      int occ = 0;
      float ms;
#define ROW(label, ring, bytes, ...)                                                                     \
  ms = run_ladder<__VA_ARGS__>(packed, d_ids, d_counts, w, y, groups, packed_k, sh.n, sink, &occ);      \
  row(label, ring, occ, ms, bytes);
      const double wx = w_bytes + x_bytes;
      // session 30, second table: the swizzled layout (the package's since then), part by part
      ROW("full, padded rows (before session 30)", "2 x 64", wx, pit::kFull, 2, 64)
      ROW("swz full", "2 x 64", wx, pit::kFull, 2, 64, false, true, true, true)
      ROW("swz full, no store", "2 x 64", wx, pit::kFull, 2, 64, false, true, false, true)
      ROW("swz no_mma", "2 x 64", wx, pit::kNoMma, 2, 64, false, true, true, true)
      ROW("swz no_x", "2 x 64", w_bytes, pit::kNoX, 2, 64, false, true, true, true)
      ROW("swz no_loads", "2 x 64", wx, pit::kNoLoads, 2, 64, false, true, true, true)
      ROW("swz gather", "2 x 64", w_bytes, pit::kGather, 2, 64, false, true, true, true)
      ROW("swz full, issue first", "2 x 64", wx, pit::kFull, 2, 64, true, true, true, true)
      ROW("swz full", "3 x 64", wx, pit::kFull, 3, 64, false, true, true, true)
      ROW("swz full", "3 x 32", wx, pit::kFull, 3, 32, false, true, true, true)
      ROW("swz full", "4 x 32", wx, pit::kFull, 4, 32, false, true, true, true)
      ROW("swz full, issue first", "3 x 32", wx, pit::kFull, 3, 32, true, true, true, true)
#undef ROW
    }
    CHECK(cudaFree(w));
    CHECK(cudaFree(y));
    CHECK(cudaFree(packed));
    CHECK(cudaFree(d_ids));
    CHECK(cudaFree(d_counts));
  }
  return 0;
}
