// Probe (not part of the package): which CUTLASS tile and cluster shape is fastest for each of the
// six grouped GEMMs of a Mixtral SwiGLU layer step that are not dW (the layer's per-kernel profile,
// session 20: its 9 grouped GEMMs take 1.14x cuBLAS's time for the same dense shapes, and cuBLAS
// picks 256x128 tiles and 2-CTA clusters for half of them)? Rows already in routing order, uniform
// routing, sizes on the device only (as the staged forward).
//   up:   x[rows, 4096] · w[e] [4096, 14336]  (gate/up forward; B row-major)
//   down: h[rows, 14336] · w[e] [14336, 4096] (down forward; B row-major)
//   up, wᵀ:   dy[rows, 4096] · w_out[e]ᵀ      (dh; w_out[e] is [14336, 4096]: B column-major)
//   down, wᵀ: dh[rows, 14336] · w[e]ᵀ         (dx; w[e] is [4096, 14336]: B column-major)
// Also: each expert's rows split into whole 128-row tiles and a tail run with 64-row tiles (does the
// last, partial tile of each expert cost what the balanced cases suggest?), and balanced routing.
// Reference for the dense times: layer_shapes_dense.py in the same device call.
//
// Build (CPU box; headers from the nvidia-cutlass wheel):
//   nvcc -O3 -DNDEBUG -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//     -I$CUTLASS/include -I$CUTLASS/tools/util/include layer_shapes_probe.cu -o layer_shapes_probe
#include <algorithm>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "probe_common.cuh"

using RowA = cutlass::layout::RowMajor;

// Split: each expert's rows as a main problem (whole 128-row tiles) and a tail problem (the rest, under
// 128 rows) for a second grouped GEMM with 64-row tiles, so a partial tile pays for 64 rows, not 128.
__global__ void write_split_args(const int* starts, int experts, int n, int k, const Element* x, const Element* w,
                                 Element* out, ProblemShape::UnderlyingProblemShape* main_shapes,
                                 const Element** main_a, const Element** main_b, Element** main_d,
                                 ProblemShape::UnderlyingProblemShape* tail_shapes, const Element** tail_a,
                                 const Element** tail_b, Element** tail_d) {
  int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= experts) return;
  const int rows = starts[e + 1] - starts[e], main_rows = rows / 128 * 128;
  const int64_t tail_start = int64_t(starts[e]) + main_rows;
  main_shapes[e] = {main_rows, n, k};
  main_a[e] = x + static_cast<int64_t>(starts[e]) * k;
  main_b[e] = tail_b[e] = w + static_cast<int64_t>(e) * k * n;
  main_d[e] = out + static_cast<int64_t>(starts[e]) * n;
  tail_shapes[e] = {rows - main_rows, n, k};
  tail_a[e] = x + tail_start * k;
  tail_d[e] = out + tail_start * n;
}

struct Case { const char* name; bool b_transposed; int experts, rows, n, k; std::vector<int> counts; };

// Poisons out, runs call once and checks sampled outputs against an fp64 host reference (128
// random entries, and 16 in each expert's last, partial tile), then times call.
template <class LayoutB, class Call>
double check_and_time(const Case& c, const ForwardOperands& op, Call call) {
  constexpr bool kColB = std::is_same_v<LayoutB, cutlass::layout::ColumnMajor>;
  const std::vector<int>& starts = op.starts;
  std::vector<Element> hout;
  if (!run_poisoned(op.out, size_t(c.rows) * c.n, call, &hout)) return -1.0;
  std::mt19937 rng(7);
  std::vector<int> rows;
  for (int s = 0; s < 128; ++s) rows.push_back(rng() % c.rows);
  for (int e = 0; e < c.experts; ++e) {
    const int first = starts[e] + (starts[e + 1] - starts[e]) / 128 * 128;
    for (int s = 0; s < 16 && first < starts[e + 1]; ++s) rows.push_back(first + rng() % (starts[e + 1] - first));
  }
  double worst = 0;
  for (int row : rows) {
    int col = rng() % c.n;
    int e = expert_of(starts, row);
    const size_t base = size_t(e) * c.k * c.n;
    double ref = 0;
    for (int kk = 0; kk < c.k; ++kk) {
      const size_t wi = kColB ? base + size_t(col) * c.k + kk : base + size_t(kk) * c.n + col;
      ref += double(float(op.hx[size_t(row) * c.k + kk])) * double(float(op.hw[wi]));
    }
    track_error(float(hout[size_t(row) * c.n + col]), ref, &worst);
  }
  const double ms = time_calls(call);
  std::printf("   max rel err (%zu samples) %.2e%s\n", rows.size(), worst, worst > 2e-2 ? "  FAILED" : "");
  return ms;
}

template <class G, class LayoutB>
double run_case(const Case& c, const ForwardOperands& op) {
  GroupedSetup<typename G::Gemm> g;
  if (!init_forward(g, c.experts, c.n, c.k)) return -1.0;
  return check_and_time<LayoutB>(c, op, [&]() {
    write_group_args<<<(c.experts + 127) / 128, 128>>>(op.d_starts, c.experts, c.n, c.k, op.x, op.w, op.out, g.shapes,
                                                          g.a, g.b, g.d);
    return g.gemm.run();
  });
}

// The main problems with GMain's tiles, then the tails with GTail's, one after the other.
template <class GMain, class GTail, class LayoutB>
double run_split(const Case& c, const ForwardOperands& op) {
  GroupedSetup<typename GMain::Gemm> gm;
  GroupedSetup<typename GTail::Gemm> gt;
  if (!init_forward(gm, c.experts, c.n, c.k) || !init_forward(gt, c.experts, c.n, c.k)) return -1.0;
  return check_and_time<LayoutB>(c, op, [&]() {
    write_split_args<<<(c.experts + 127) / 128, 128>>>(op.d_starts, c.experts, c.n, c.k, op.x, op.w, op.out,
                                                       gm.shapes, gm.a, gm.b, gm.d, gt.shapes, gt.a, gt.b, gt.d);
    cutlass::Status st = gm.gemm.run();
    return st == cutlass::Status::kSuccess ? gt.gemm.run() : st;
  });
}

template <class LayoutB>
void run_configs(const Case& c, const ForwardOperands& op) {
  using C128x256c11 = GroupedGemm<Shape<_128, _256, _64>, Shape<_1, _1, _1>, CoopMain, CoopEpi, RowA, LayoutB>;
  using C256x128c11 = GroupedGemm<Shape<_256, _128, _64>, Shape<_1, _1, _1>, CoopMain, CoopEpi, RowA, LayoutB>;
  using C128x256c21 = GroupedGemm<Shape<_128, _256, _64>, Shape<_2, _1, _1>, CoopMain, CoopEpi, RowA, LayoutB>;
  using C256x128c12 = GroupedGemm<Shape<_256, _128, _64>, Shape<_1, _2, _1>, CoopMain, CoopEpi, RowA, LayoutB>;
  const double flop = 2.0 * c.rows * double(c.n) * c.k;
  auto report = [&](const char* cfg, double ms) {
    std::printf("| %s | %s | %.3f ms | %.0f TFLOP/s |\n", c.name, cfg, ms, flop / ms / 1e9);
  };
  report("coop 128x256x64 cluster 1x1 (staged today)", run_case<C128x256c11, LayoutB>(c, op));
  report("coop 256x128x64 cluster 1x1", run_case<C256x128c11, LayoutB>(c, op));
  report("coop 128x256x64 cluster 2x1", run_case<C128x256c21, LayoutB>(c, op));
  report("coop 256x128x64 cluster 1x2", run_case<C256x128c12, LayoutB>(c, op));
  using P64x256c11 = GroupedGemm<Shape<_64, _256, _64>, Shape<_1, _1, _1>, PingMain, PingEpi, RowA, LayoutB>;
  report("split: coop 128x256 whole tiles, then pingpong 64x256 tails",
         run_split<C128x256c11, P64x256c11, LayoutB>(c, op));
}

int main() {
  std::mt19937 rng(1234);
  std::vector<Case> cases;
  // balanced: every expert exactly rows / E rows (1024, a multiple of the 128-row tile), to tell the
  // cost of each expert's last, partial tile under random routing from the rest of the grouping
  auto add = [&](const char* name, bool bt, int E, int n, int k, bool balanced = false) {
    Case c{name, bt, E, 8192, n, k, std::vector<int>(E, 0)};  // Mixtral T=4096, top-2
    for (int a = 0; a < c.rows; ++a) c.counts[E == 1 ? 0 : balanced ? a * E / c.rows : rng() % E]++;
    cases.push_back(c);
  };
  add("up (B row-major)", false, 8, 14336, 4096);
  add("down (B row-major)", false, 8, 4096, 14336);
  add("up, wT (B column-major)", true, 8, 14336, 4096);
  add("down, wT (B column-major)", true, 8, 4096, 14336);
  add("down as ONE dense GEMM", false, 1, 4096, 14336);
  add("up, balanced (8 x 1024 rows)", false, 8, 14336, 4096, true);
  add("down, balanced (8 x 1024 rows)", false, 8, 4096, 14336, true);
  for (auto& c : cases) {
    const ForwardOperands op(c.counts, c.rows, c.k, c.n);
    std::printf("== %s: rows %d, E %d, N %d, K %d\n", c.name, c.rows, c.experts, c.n, c.k);
    if (c.b_transposed) run_configs<cutlass::layout::ColumnMajor>(c, op);
    else run_configs<cutlass::layout::RowMajor>(c, op);
  }
  return 0;
}
