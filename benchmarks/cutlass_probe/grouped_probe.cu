// Probe (not part of the package): how fast is CUTLASS's Hopper ptr-array grouped GEMM on our MoE
// shapes, with the per-expert problem sizes and pointers written on the device from the routing
// counts (no host sync), against the same kernel run as one dense GEMM of the same FLOPs?
// Question it answers for issue 4: is ≤ 1.15× dense reachable for rows already in routing order
// with a CUTLASS mainloop, where our own tiled kernel stays at 1.23–1.31×?
//
// Build (CPU box; headers from the nvidia-cutlass wheel):
//   nvcc -O3 -DNDEBUG -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//     -I$CUTLASS/include -I$CUTLASS/tools/util/include grouped_probe.cu -o grouped_probe
#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "probe_common.cuh"

using LayoutA = cutlass::layout::RowMajor;  // x rows in routing order, [rows, K]
using LayoutB = cutlass::layout::RowMajor;  // w[e] is [K, N] with N contiguous (our [E, d, f])

// Device side of the routing: problem sizes and per-expert pointers from the group starts.
template <class StrideA, class StrideB, class StrideD>
__global__ void write_group_args(const int* starts, int experts, int n, int k, const Element* x, const Element* w,
                                 Element* out, ProblemShape::UnderlyingProblemShape* shapes, const Element** a_ptrs,
                                 const Element** b_ptrs, Element** d_ptrs) {
  int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= experts) return;
  int m = starts[e + 1] - starts[e];
  shapes[e] = {m, n, k};
  a_ptrs[e] = x + static_cast<int64_t>(starts[e]) * k;
  b_ptrs[e] = w + static_cast<int64_t>(e) * k * n;
  d_ptrs[e] = out + static_cast<int64_t>(starts[e]) * n;
}

struct Case { const char* name; int experts, rows, n, k; std::vector<int> counts; };

// Runs one configuration on one case: checks 256 sampled outputs, returns ms per call (args kernel included).
template <class G>
double run_case(const Case& c, const Element* x, const Element* w, Element* out, const int* d_starts,
                const std::vector<int>& starts, const std::vector<Element>& hx, const std::vector<Element>& hw) {
  using Gemm = typename G::Gemm;
  using StrideA = typename Gemm::GemmKernel::InternalStrideA;
  using StrideB = typename Gemm::GemmKernel::InternalStrideB;
  using StrideD = typename Gemm::GemmKernel::InternalStrideD;
  int E = c.experts;
  ProblemShape::UnderlyingProblemShape* shapes;
  const Element **a_ptrs, **b_ptrs; Element** d_ptrs;
  StrideA* sa; StrideB* sb; StrideD* sd;
  CHECK_CUDA(cudaMalloc(&shapes, E * sizeof(*shapes)));
  CHECK_CUDA(cudaMalloc(&a_ptrs, E * sizeof(void*))); CHECK_CUDA(cudaMalloc(&b_ptrs, E * sizeof(void*)));
  CHECK_CUDA(cudaMalloc(&d_ptrs, E * sizeof(void*)));
  CHECK_CUDA(cudaMalloc(&sa, E * sizeof(StrideA))); CHECK_CUDA(cudaMalloc(&sb, E * sizeof(StrideB)));
  CHECK_CUDA(cudaMalloc(&sd, E * sizeof(StrideD)));
  // Strides do not depend on the routing (row-major A and D of any height, fixed K and N).
  std::vector<StrideA> hsa(E, cutlass::make_cute_packed_stride(StrideA{}, {1, c.k, 1}));
  std::vector<StrideB> hsb(E, cutlass::make_cute_packed_stride(StrideB{}, {c.n, c.k, 1}));
  std::vector<StrideD> hsd(E, cutlass::make_cute_packed_stride(StrideD{}, {1, c.n, 1}));
  CHECK_CUDA(cudaMemcpy(sa, hsa.data(), E * sizeof(StrideA), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(sb, hsb.data(), E * sizeof(StrideB), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(sd, hsd.data(), E * sizeof(StrideD), cudaMemcpyHostToDevice));

  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = 0;
  hw_info.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(0);
  typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGrouped,
                                {E, shapes, nullptr},  // sizes on the device only
                                {a_ptrs, sa, b_ptrs, sb},
                                {{}, nullptr, sd, d_ptrs, sd},
                                hw_info};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  Gemm gemm;
  size_t ws_bytes = Gemm::get_workspace_size(args);
  void* ws = nullptr;
  if (ws_bytes) CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
  CHECK_CUTLASS(gemm.can_implement(args));
  CHECK_CUTLASS(gemm.initialize(args, ws));

  auto call = [&]() {
    write_group_args<StrideA, StrideB, StrideD><<<(E + 127) / 128, 128>>>(d_starts, E, c.n, c.k, x, w, out, shapes,
                                                                       a_ptrs, b_ptrs, d_ptrs);
    return gemm.run();
  };
  CHECK_CUDA(cudaMemset(out, 0xff, size_t(c.rows) * c.n * sizeof(Element)));  // poison: NaN in bf16
  CHECK_CUTLASS(call());
  CHECK_CUDA(cudaDeviceSynchronize());
  // Sampled check against an fp32 host reference.
  std::vector<Element> hout(size_t(c.rows) * c.n);
  CHECK_CUDA(cudaMemcpy(hout.data(), out, hout.size() * sizeof(Element), cudaMemcpyDeviceToHost));
  std::mt19937 rng(7);
  double worst = 0;
  for (int s = 0; s < 256; ++s) {
    int row = rng() % c.rows, col = rng() % c.n;
    int e = int(std::upper_bound(starts.begin(), starts.end(), row) - starts.begin()) - 1;
    double ref = 0;
    for (int kk = 0; kk < c.k; ++kk)
      ref += double(float(hx[size_t(row) * c.k + kk])) * double(float(hw[(size_t(e) * c.k + kk) * c.n + col]));
    double got = float(hout[size_t(row) * c.n + col]);
    double err = std::abs(got - ref) / (1.0 + std::abs(ref));
    if (!(err <= worst)) worst = std::isnan(err) ? 1e9 : err;
  }
  const double ms = time_calls(call);
  std::printf("   max rel err (256 samples) %.2e%s\n", worst, worst > 2e-2 ? "  FAILED" : "");
  cudaFree(shapes); cudaFree(a_ptrs); cudaFree(b_ptrs); cudaFree(d_ptrs); cudaFree(sa); cudaFree(sb); cudaFree(sd);
  if (ws) cudaFree(ws);
  return ms;
}

using Coop256x128c21 = GroupedGemm<Shape<_256, _128, _64>, Shape<_2, _1, _1>, CoopMain, CoopEpi, LayoutA, LayoutB>;
using Coop128x256c12 = GroupedGemm<Shape<_128, _256, _64>, Shape<_1, _2, _1>, CoopMain, CoopEpi, LayoutA, LayoutB>;
using Coop128x256c11 = GroupedGemm<Shape<_128, _256, _64>, Shape<_1, _1, _1>, CoopMain, CoopEpi, LayoutA, LayoutB>;
using Ping128x128c12 = GroupedGemm<Shape<_128, _128, _64>, Shape<_1, _2, _1>, PingMain, PingEpi, LayoutA, LayoutB>;

int main(int argc, char** argv) {
  std::mt19937 rng(1234);
  std::vector<Case> cases;
  auto add = [&](const char* name, int tokens, int top_k, int E, int n, int k, const char* routing) {
    Case c{name, E, tokens * top_k, n, k, std::vector<int>(E, 0)};
    for (int a = 0; a < c.rows; ++a) {
      int e;
      if (std::string(routing) == "one-hot") e = 0;
      else if (std::string(routing) == "dense") e = a * E / c.rows;  // equal blocks: the dense reference
      else e = rng() % E;
      c.counts[e]++;
    }
    cases.push_back(c);
  };
  add("Mixtral up T=4096 uniform", 4096, 2, 8, 14336, 4096, "uniform");
  add("Mixtral up T=4096 one-hot", 4096, 2, 8, 14336, 4096, "one-hot");
  add("Mixtral up T=4096 as ONE dense GEMM", 4096, 2, 1, 14336, 4096, "one-hot");
  add("Qwen3-like uniform", 2048, 8, 128, 768, 2048, "uniform");
  add("Qwen3-like one-hot", 2048, 8, 128, 768, 2048, "one-hot");

  for (auto& c : cases) {
    std::vector<int> starts(c.experts + 1, 0);
    for (int e = 0; e < c.experts; ++e) starts[e + 1] = starts[e] + c.counts[e];
    Element *x, *w, *out; int* d_starts;
    size_t xs = size_t(c.rows) * c.k, ws = size_t(c.experts) * c.k * c.n, os = size_t(c.rows) * c.n;
    CHECK_CUDA(cudaMalloc(&x, xs * 2)); CHECK_CUDA(cudaMalloc(&w, ws * 2)); CHECK_CUDA(cudaMalloc(&out, os * 2));
    CHECK_CUDA(cudaMalloc(&d_starts, starts.size() * 4));
    CHECK_CUDA(cudaMemcpy(d_starts, starts.data(), starts.size() * 4, cudaMemcpyHostToDevice));
    fill_random<<<1024, 256>>>(x, xs, 11); fill_random<<<1024, 256>>>(w, ws, 23);
    std::vector<Element> hx(xs), hw(ws);
    CHECK_CUDA(cudaMemcpy(hx.data(), x, xs * 2, cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(hw.data(), w, ws * 2, cudaMemcpyDeviceToHost));
    double flop = 2.0 * c.rows * double(c.n) * c.k;
    std::printf("== %s: rows %d, E %d, N %d, K %d, %.1f GFLOP\n", c.name, c.rows, c.experts, c.n, c.k, flop / 1e9);
    auto report = [&](const char* cfg, double ms) {
      std::printf("| %s | %s | %.3f ms | %.0f TFLOP/s |\n", c.name, cfg, ms, flop / ms / 1e9);
    };
    report("coop 256x128x64 cluster 2x1", run_case<Coop256x128c21>(c, x, w, out, d_starts, starts, hx, hw));
    report("coop 128x256x64 cluster 1x2", run_case<Coop128x256c12>(c, x, w, out, d_starts, starts, hx, hw));
    report("coop 128x256x64 cluster 1x1", run_case<Coop128x256c11>(c, x, w, out, d_starts, starts, hx, hw));
    report("pingpong 128x128x64 cluster 1x2", run_case<Ping128x128c12>(c, x, w, out, d_starts, starts, hx, hw));
    cudaFree(x); cudaFree(w); cudaFree(out); cudaFree(d_starts);
  }
  return 0;
}
