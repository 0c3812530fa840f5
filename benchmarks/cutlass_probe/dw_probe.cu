// Probe (not part of the package): CUTLASS's Hopper ptr-array grouped GEMM as the MoE dW,
// dw[e] = x_eᵀ dy_e over each expert's rows in routing order (M = d, N = f, K = the expert's
// rows; both operands MN-major, sizes written on the device), against the same FLOPs as one
// dense GEMM. Question for issue 4: pit's dW kernel takes about 2.8 ms per Mixtral projection
// (about 2.1x the dense time) and is half of the layer's training step; would a staged dW on
// CUTLASS close that? Empty experts get M = K = 0 (no tiles) and are zeroed apart.
//
// Build (CPU box; headers from the nvidia-cutlass wheel):
//   nvcc -O3 -DNDEBUG -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//     -I$CUTLASS/include -I$CUTLASS/tools/util/include dw_probe.cu -o dw_probe
#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "probe_common.cuh"

using LayoutA = cutlass::layout::ColumnMajor;  // x_eᵀ: (M = d, K = rows), element (m, k) at k * d + m
using LayoutB = cutlass::layout::RowMajor;     // dy_e: (K = rows, N = f), element (k, n) at k * f + n

__global__ void write_dw_args(const int* starts, int experts, int d, int f, const Element* x, const Element* dy,
                              Element* dw, ProblemShape::UnderlyingProblemShape* shapes, const Element** a_ptrs,
                              const Element** b_ptrs, Element** d_ptrs) {
  int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= experts) return;
  int rows = starts[e + 1] - starts[e];
  shapes[e] = rows > 0 ? ProblemShape::UnderlyingProblemShape{d, f, rows} : ProblemShape::UnderlyingProblemShape{0, f, 0};
  a_ptrs[e] = x + static_cast<int64_t>(starts[e]) * d;
  b_ptrs[e] = dy + static_cast<int64_t>(starts[e]) * f;
  d_ptrs[e] = dw + static_cast<int64_t>(e) * d * f;
}

struct DwCase { const char* name; int experts, rows, d, f; std::vector<int> counts; };

template <class G>
double run_dw(const DwCase& c, const Element* x, const Element* dy, Element* dw, const int* d_starts,
              const std::vector<int>& starts, const std::vector<Element>& hx, const std::vector<Element>& hdy) {
  using Setup = GroupedSetup<typename G::Gemm>;
  Setup g;
  // Leading dimensions d (A), f (B and D) whatever an expert's row count.
  if (!g.init(c.experts, cutlass::make_cute_packed_stride(typename Setup::StrideA{}, {c.d, 1, 1}),
              cutlass::make_cute_packed_stride(typename Setup::StrideB{}, {c.f, 1, 1}),
              cutlass::make_cute_packed_stride(typename Setup::StrideD{}, {c.d, c.f, 1})))
    return -1.0;
  auto call = [&]() {
    write_dw_args<<<(c.experts + 127) / 128, 128>>>(d_starts, c.experts, c.d, c.f, x, dy, dw, g.shapes, g.a, g.b,
                                                     g.d);
    return g.gemm.run();
  };
  CHECK_CUDA(cudaMemset(dw, 0xff, size_t(c.experts) * c.d * c.f * sizeof(Element)));  // poison: NaN in bf16
  CHECK_CUTLASS(call());
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<Element> hdw(size_t(c.experts) * c.d * c.f);
  CHECK_CUDA(cudaMemcpy(hdw.data(), dw, hdw.size() * sizeof(Element), cudaMemcpyDeviceToHost));
  std::mt19937 rng(7);
  double worst = 0;
  int checked = 0;
  for (int s = 0; s < 256; ++s) {
    int e = rng() % c.experts, i = rng() % c.d, j = rng() % c.f;
    if (c.counts[e] == 0) continue;  // not written by the GEMM (a separate zero fill in the real path)
    double ref = 0;
    for (int p = starts[e]; p < starts[e + 1]; ++p)
      ref += double(float(hx[size_t(p) * c.d + i])) * double(float(hdy[size_t(p) * c.f + j]));
    track_error(float(hdw[(size_t(e) * c.d + i) * c.f + j]), ref, &worst);
    ++checked;
  }
  const double ms = time_calls(call);
  std::printf("   max rel err (%d samples) %.2e%s, workspace %zu B\n", checked, worst, worst > 2e-2 ? "  FAILED" : "",
              g.workspace_bytes);
  return ms;
}

using Coop128x256 = GroupedGemm<Shape<_128, _256, _64>, Shape<_1, _1, _1>, CoopMain, CoopEpi, LayoutA, LayoutB>;
using Coop256x128 = GroupedGemm<Shape<_256, _128, _64>, Shape<_1, _1, _1>, CoopMain, CoopEpi, LayoutA, LayoutB>;
using Ping128x128 = GroupedGemm<Shape<_128, _128, _64>, Shape<_1, _1, _1>, PingMain, PingEpi, LayoutA, LayoutB>;
using Ping64x256 = GroupedGemm<Shape<_64, _256, _64>, Shape<_1, _1, _1>, PingMain, PingEpi, LayoutA, LayoutB>;

int main() {
  std::mt19937 rng(1234);
  std::vector<DwCase> cases;
  auto add = [&](const char* name, int tokens, int top_k, int E, int d, int f, const char* routing) {
    DwCase c{name, E, tokens * top_k, d, f, std::vector<int>(E, 0)};
    for (int a = 0; a < c.rows; ++a) c.counts[std::string(routing) == "one-hot" ? 0 : int(rng() % E)]++;
    cases.push_back(c);
  };
  add("Mixtral dW T=4096 uniform", 4096, 2, 8, 4096, 14336, "uniform");
  add("Mixtral dW T=4096 one-hot (7 empty experts)", 4096, 2, 8, 4096, 14336, "one-hot");
  add("Mixtral dW as ONE dense GEMM", 4096, 2, 1, 4096, 14336, "one-hot");
  add("Qwen3-like dW uniform", 2048, 8, 128, 2048, 768, "uniform");
  for (auto& c : cases) {
    std::vector<int> starts;
    std::vector<Element> hx, hdy;
    int* d_starts = device_starts(c.counts, &starts);
    Element* x = device_random(size_t(c.rows) * c.d, 11, &hx);
    Element* dy = device_random(size_t(c.rows) * c.f, 23, &hdy);
    Element* dw;
    CHECK_CUDA(cudaMalloc(&dw, size_t(c.experts) * c.d * c.f * sizeof(Element)));
    double flop = 2.0 * c.rows * double(c.d) * c.f;
    std::printf("== %s: rows %d, E %d, d %d, f %d, %.1f GFLOP\n", c.name, c.rows, c.experts, c.d, c.f, flop / 1e9);
    auto report = [&](const char* cfg, double ms) {
      std::printf("| %s | %s | %.3f ms | %.0f TFLOP/s |\n", c.name, cfg, ms, flop / ms / 1e9);
    };
    report("coop 128x256x64", run_dw<Coop128x256>(c, x, dy, dw, d_starts, starts, hx, hdy));
    report("coop 256x128x64", run_dw<Coop256x128>(c, x, dy, dw, d_starts, starts, hx, hdy));
    report("pingpong 128x128x64", run_dw<Ping128x128>(c, x, dy, dw, d_starts, starts, hx, hdy));
    report("pingpong 64x256x64", run_dw<Ping64x256>(c, x, dy, dw, d_starts, starts, hx, hdy));
    cudaFree(x); cudaFree(dy); cudaFree(dw); cudaFree(d_starts);
  }
  return 0;
}
