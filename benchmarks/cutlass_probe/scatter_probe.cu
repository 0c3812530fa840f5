// Probe (not part of the package): can the staged forward write its product rows straight to their
// assignments (moe_matmul's scattered output layout) from the grouped GEMM's epilogue
// (cuda/moe/moe_scatter_epilogue.cuh), instead of writing them in routing order and scattering them
// in a separate pass? Mixtral T=4096 shapes (8192 assignment rows, E = 8), rows in routing order,
// output rows a random permutation of the assignments, sizes on the device only:
//   A  TMA epilogue, output in routing order (the staged forward's GEMM today)
//   B  A, then a scatter pass (the staged forward's scattered layout today)
//   C  CUTLASS's register-direct ("no smem") epilogue, routing order (the epilogue kind alone)
//   D  the scatter epilogue, its tile staged through shared memory in 64-column chunks
//   E  the same with 128-column chunks
// (Session 21's first run stored straight from the accumulator registers instead: 1.576 ms on the
// uniform up shape against B's 1.450, so the epilogue now stages the tile.)
// Dense reference in the same device call: layer_shapes_dense.py (its "up" and "down" rows).
//
// Build (CPU box; headers from the nvidia-cutlass wheel):
//   nvcc -O3 -DNDEBUG -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//     -I$CUTLASS/include -I$CUTLASS/tools/util/include scatter_probe.cu -o scatter_probe
#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "probe_common.cuh"
#include "../../cuda/moe/moe_scatter_epilogue.cuh"

using RowA = cutlass::layout::RowMajor;
using RowB = cutlass::layout::RowMajor;
using CtaTile = Shape<_128, _256, _64>;
using Cluster = Shape<_1, _1, _1>;

using TmaGemm = GroupedGemm<CtaTile, Cluster, CoopMain, CoopEpi, RowA, RowB>;
using NoSmemGemm = GroupedGemm<CtaTile, Cluster, CoopMain, cutlass::epilogue::PtrArrayNoSmemWarpSpecialized, RowA, RowB>;

// The grouped GEMM with the scatter epilogue (same mainloop choice as the others).
template <int kChunkCols>
struct ScatterGemm {
  using CollectiveEpilogue = pit::ScatterRowsCollectiveEpilogue<Element, 128, kChunkCols>;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, RowA*, kAlign, Element, RowB*, kAlign, float,
      CtaTile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      CoopMain>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// out[order[p]] = rows[p], one warp per row, 16-byte vectors (the staged forward's scatter pass).
__global__ void scatter_rows(const uint4* __restrict__ rows, const int* __restrict__ order, uint4* out, int64_t count,
                             int64_t vecs_per_row) {
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t p = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; p < count; p += warps) {
    const uint4* src = rows + p * vecs_per_row;
    uint4* dst = out + int64_t(order[p]) * vecs_per_row;
    for (int64_t v = threadIdx.x % 32; v < vecs_per_row; v += 32) dst[v] = src[v];
  }
}

struct Case { const char* name; int experts, rows, n, k; std::vector<int> counts; };

// Poisons out, runs call once, checks 256 sampled outputs (row p of routing order lands on
// out_row(p)) against an fp64 host reference, then times call.
template <class OutRow, class Call>
double check_and_time(const Case& c, Element* out, const std::vector<int>& starts, const std::vector<Element>& hx,
                      const std::vector<Element>& hw, OutRow out_row, Call call) {
  std::vector<Element> hout;
  if (!run_poisoned(out, size_t(c.rows) * c.n, call, &hout)) return -1.0;
  std::mt19937 rng(7);
  double worst = 0;
  for (int s = 0; s < 256; ++s) {
    const int p = rng() % c.rows, col = (s % 8 == 0) ? c.n - 1 : int(rng() % c.n);
    const int e = expert_of(starts, p);
    double ref = 0;
    for (int kk = 0; kk < c.k; ++kk)
      ref += double(float(hx[size_t(p) * c.k + kk])) * double(float(hw[size_t(e) * c.k * c.n + size_t(kk) * c.n + col]));
    track_error(float(hout[size_t(out_row(p)) * c.n + col]), ref, &worst);
  }
  const double ms = time_calls(call);
  std::printf("   max rel err (256 samples) %.2e%s\n", worst, worst > 2e-2 ? "  FAILED" : "");
  return ms;
}

// The scatter epilogue takes the output through its own arguments; a setup's pointer arrays serve
// the mainloop (its d array is written but unused).
template <int kChunkCols>
void run_scatter(const Case& c, const char* label, const Element* x, const Element* w, Element* out, Element* sorted,
                 const int* d_order, const int* d_starts, const std::vector<int>& starts,
                 const std::vector<Element>& hx, const std::vector<Element>& hw, const std::vector<int>& horder) {
  using Gemm = typename ScatterGemm<kChunkCols>::Gemm;
  using StrideA = typename Gemm::GemmKernel::InternalStrideA;
  using StrideB = typename Gemm::GemmKernel::InternalStrideB;
  GroupedSetup<TmaGemm::Gemm> arrays;  // device arrays only (shapes, a, b, d and strides)
  if (!init_forward(arrays, c.experts, c.n, c.k)) return;
  StrideA* sa;
  StrideB* sb;
  std::vector<StrideA> hsa(c.experts, cutlass::make_cute_packed_stride(StrideA{}, {1, c.k, 1}));
  std::vector<StrideB> hsb(c.experts, cutlass::make_cute_packed_stride(StrideB{}, {c.n, c.k, 1}));
  CHECK_CUDA(cudaMalloc(&sa, c.experts * sizeof(StrideA)));
  CHECK_CUDA(cudaMalloc(&sb, c.experts * sizeof(StrideB)));
  CHECK_CUDA(cudaMemcpy(sa, hsa.data(), c.experts * sizeof(StrideA), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(sb, hsb.data(), c.experts * sizeof(StrideB), cudaMemcpyHostToDevice));
  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = 0;
  hw_info.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(0);
  typename Gemm::Arguments gargs{cutlass::gemm::GemmUniversalMode::kGrouped,
                                 {c.experts, arrays.shapes, nullptr},
                                 {arrays.a, sa, arrays.b, sb},
                                 {out, d_order, d_starts, int64_t(c.n)},
                                 hw_info};
  Gemm gemm;
  void* workspace = nullptr;
  const size_t bytes = Gemm::get_workspace_size(gargs);
  if (bytes) CHECK_CUDA(cudaMalloc(&workspace, bytes));
  cutlass::Status st = gemm.can_implement(gargs);
  if (st == cutlass::Status::kSuccess) st = gemm.initialize(gargs, workspace);
  if (st != cutlass::Status::kSuccess) {
    std::printf("CUTLASS error %s\n", cutlassGetStatusString(st));
  } else {
    const double ms = check_and_time(c, out, starts, hx, hw, [&](int p) { return horder[p]; }, [&]() {
      write_group_args<<<(c.experts + 127) / 128, 128>>>(d_starts, c.experts, c.n, c.k, x, w, sorted, arrays.shapes,
                                                          arrays.a, arrays.b, arrays.d);
      return gemm.run();
    });
    std::printf("| %s | %s | %.3f ms | %.0f TFLOP/s |  (smem %d B)\n", c.name, label, ms,
                2.0 * c.rows * double(c.n) * c.k / ms / 1e9, int(Gemm::GemmKernel::SharedStorageSize));
  }
  if (workspace) cudaFree(workspace);
  cudaFree(sa);
  cudaFree(sb);
}

void run_case(const Case& c) {
  const ForwardOperands op(c.counts, c.rows, c.k, c.n);
  const std::vector<int>& starts = op.starts;
  std::vector<int> horder(c.rows);
  std::iota(horder.begin(), horder.end(), 0);
  std::shuffle(horder.begin(), horder.end(), std::mt19937(99));
  int* d_order;
  CHECK_CUDA(cudaMalloc(&d_order, c.rows * sizeof(int)));
  CHECK_CUDA(cudaMemcpy(d_order, horder.data(), c.rows * sizeof(int), cudaMemcpyHostToDevice));
  const std::vector<Element>& hx = op.hx, &hw = op.hw;
  Element *x = op.x, *w = op.w, *out = op.out, *sorted;
  const int* d_starts = op.d_starts;
  CHECK_CUDA(cudaMalloc(&sorted, size_t(c.rows) * c.n * sizeof(Element)));
  std::printf("== %s: rows %d, E %d, N %d, K %d\n", c.name, c.rows, c.experts, c.n, c.k);
  const double flop = 2.0 * c.rows * double(c.n) * c.k;
  auto report = [&](const char* cfg, double ms) {
    std::printf("| %s | %s | %.3f ms | %.0f TFLOP/s |\n", c.name, cfg, ms, flop / ms / 1e9);
  };
  auto identity = [](int p) { return p; };
  auto scattered = [&](int p) { return horder[p]; };
  auto args = [&](auto& g, Element* dst) {
    write_group_args<<<(c.experts + 127) / 128, 128>>>(d_starts, c.experts, c.n, c.k, x, w, dst, g.shapes, g.a, g.b, g.d);
  };
  {
    GroupedSetup<TmaGemm::Gemm> g;
    if (init_forward(g, c.experts, c.n, c.k)) {
      report("A: TMA epilogue, routing order",
             check_and_time(c, out, starts, hx, hw, identity, [&]() { args(g, out); return g.gemm.run(); }));
      report("B: A + scatter pass", check_and_time(c, out, starts, hx, hw, scattered, [&]() {
               args(g, sorted);
               cutlass::Status st = g.gemm.run();
               scatter_rows<<<int(std::min<int64_t>((c.rows + 7) / 8, 65535)), 256>>>(
                   reinterpret_cast<const uint4*>(sorted), d_order, reinterpret_cast<uint4*>(out), c.rows, c.n / 8);
               return st;
             }));
    }
  }
  {
    GroupedSetup<NoSmemGemm::Gemm> g;
    if (init_forward(g, c.experts, c.n, c.k))
      report("C: no-smem epilogue, routing order",
             check_and_time(c, out, starts, hx, hw, identity, [&]() { args(g, out); return g.gemm.run(); }));
  }
  run_scatter<64>(c, "D: scatter epilogue, 64-column chunks", x, w, out, sorted, d_order, d_starts, starts, hx, hw,
                  horder);
  run_scatter<128>(c, "E: scatter epilogue, 128-column chunks", x, w, out, sorted, d_order, d_starts, starts, hx, hw,
                   horder);
  cudaFree(sorted);
  cudaFree(d_order);
}

int main() {
  std::mt19937 rng(1234);
  auto make = [&](const char* name, int n, int k, bool one_hot) {
    Case c{name, 8, 8192, n, k, std::vector<int>(8, 0)};  // Mixtral T=4096, top-2
    for (int a = 0; a < c.rows; ++a) c.counts[one_hot ? 3 : rng() % 8]++;
    return c;
  };
  run_case(make("up, uniform", 14336, 4096, false));
  run_case(make("up, one-hot", 14336, 4096, true));
  run_case(make("down, uniform", 4096, 14336, false));
  run_case(make("odd n (up, n = 14328), uniform", 14328, 4096, false));
  return 0;
}
