// Probe (not part of the package): the grouped GEMM's tile order. CUTLASS's grouped tile scheduler
// walks each expert's tiles along M (default swizzle 1): a wave of 132 CTAs takes 132 row tiles of
// one column tile, so where an expert has many row tiles (Mixtral T=16384 one-hot: 256) each wave
// reads 138 MB of A, more than the 50 MB L2, once per column tile. Session 21's A/B read the
// staged forward at 1.30x dense there against 1.16-1.20x elsewhere. A swizzle of s takes s column
// tiles per row tile. Times the staged forward's GEMM (TMA epilogue, routing order) for s = 1, 2,
// 4, 8 on Mixtral up shapes; dense references in the same call: swizzle_dense.py.
//
// Build (CPU box; headers from the nvidia-cutlass wheel):
//   nvcc -O3 -DNDEBUG -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//     -I$CUTLASS/include -I$CUTLASS/tools/util/include swizzle_probe.cu -o swizzle_probe
#include <random>
#include <vector>

#include "probe_common.cuh"

using Gemm = GroupedGemm<Shape<_128, _256, _64>, Shape<_1, _1, _1>, CoopMain, CoopEpi, cutlass::layout::RowMajor,
                         cutlass::layout::RowMajor>;

int main() {
  std::mt19937 rng(1234);
  struct Case { const char* name; int rows, n, k; bool one_hot; };
  for (Case c : {Case{"up T=4096 uniform", 8192, 14336, 4096, false}, Case{"up T=4096 one-hot", 8192, 14336, 4096, true},
                 Case{"up T=16384 uniform", 32768, 14336, 4096, false},
                 Case{"up T=16384 one-hot", 32768, 14336, 4096, true},
                 Case{"down T=4096 uniform", 8192, 4096, 14336, false}}) {
    const int experts = 8;
    std::vector<int> counts(experts, 0);
    for (int a = 0; a < c.rows; ++a) counts[c.one_hot ? 3 : rng() % experts]++;
    const ForwardOperands op(counts, c.rows, c.k, c.n);
    for (int swizzle : {1, 2, 4, 8}) {
      GroupedSetup<Gemm::Gemm> g;
      g.max_swizzle = swizzle;
      if (!init_forward(g, experts, c.n, c.k)) continue;
      // a spot check of one output against the host (row 5 of the first expert with rows, column 7)
      int e0 = 0;
      while (counts[e0] == 0) ++e0;
      const double ms = time_calls([&]() {
        write_group_args<<<1, 128>>>(op.d_starts, experts, c.n, c.k, op.x, op.w, op.out, g.shapes, g.a, g.b, g.d);
        return g.gemm.run();
      });
      Element got;
      const int row = op.starts[e0] + 5, col = 7;
      CHECK_CUDA(cudaMemcpy(&got, op.out + size_t(row) * c.n + col, sizeof(Element), cudaMemcpyDeviceToHost));
      double ref = 0;
      for (int kk = 0; kk < c.k; ++kk)
        ref += double(float(op.hx[size_t(row) * c.k + kk])) * double(float(op.hw[size_t(e0) * c.k * c.n + size_t(kk) * c.n + col]));
      double err = 0;
      track_error(float(got), ref, &err);
      std::printf("| %s | swizzle %d | %.3f ms | %.0f TFLOP/s | err %.1e%s |\n", c.name, swizzle, ms,
                  2.0 * c.rows * double(c.n) * c.k / ms / 1e9, err, err > 2e-2 ? " FAILED" : "");
    }
  }
  return 0;
}
