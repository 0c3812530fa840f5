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

struct Case { const char* name; int experts, rows, n, k; std::vector<int> counts; };

// Runs one configuration on one case: checks 256 sampled outputs, returns ms per call (args kernel included).
template <class G>
double run_case(const Case& c, const ForwardOperands& op) {
  using Setup = GroupedSetup<typename G::Gemm>;
  Setup g;
  // Strides do not depend on the routing (row-major A and D of any height, fixed K and N).
  if (!init_forward(g, c.experts, c.n, c.k)) return -1.0;
  auto call = [&]() {
    write_group_args<<<(c.experts + 127) / 128, 128>>>(op.d_starts, c.experts, c.n, c.k, op.x, op.w, op.out,
                                                        g.shapes, g.a, g.b, g.d);
    return g.gemm.run();
  };
  // Sampled check against an fp32 host reference.
  std::vector<Element> hout;
  if (!run_poisoned(op.out, size_t(c.rows) * c.n, call, &hout)) return -1.0;
  std::mt19937 rng(7);
  double worst = 0;
  for (int s = 0; s < 256; ++s) {
    int row = rng() % c.rows, col = rng() % c.n;
    int e = expert_of(op.starts, row);
    double ref = 0;
    for (int kk = 0; kk < c.k; ++kk)
      ref += double(float(op.hx[size_t(row) * c.k + kk])) * double(float(op.hw[(size_t(e) * c.k + kk) * c.n + col]));
    track_error(float(hout[size_t(row) * c.n + col]), ref, &worst);
  }
  const double ms = time_calls(call);
  std::printf("   max rel err (256 samples) %.2e%s\n", worst, worst > 2e-2 ? "  FAILED" : "");
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
    const ForwardOperands op(c.counts, c.rows, c.k, c.n);
    double flop = 2.0 * c.rows * double(c.n) * c.k;
    std::printf("== %s: rows %d, E %d, N %d, K %d, %.1f GFLOP\n", c.name, c.rows, c.experts, c.n, c.k, flop / 1e9);
    auto report = [&](const char* cfg, double ms) {
      std::printf("| %s | %s | %.3f ms | %.0f TFLOP/s |\n", c.name, cfg, ms, flop / ms / 1e9);
    };
    report("coop 256x128x64 cluster 2x1", run_case<Coop256x128c21>(c, op));
    report("coop 128x256x64 cluster 1x2", run_case<Coop128x256c12>(c, op));
    report("coop 128x256x64 cluster 1x1", run_case<Coop128x256c11>(c, op));
    report("pingpong 128x128x64 cluster 1x2", run_case<Ping128x128c12>(c, op));
  }
  return 0;
}
