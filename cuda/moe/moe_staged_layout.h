// Workspace of the staged Hopper forward (moe_staged_sm90.cu): one u8 result of the custom call,
// sized by the lowering with the same formula (pit_jax/moe_cuda.py: staged_workspace_bytes).
// Sections, each 256-byte aligned:
//   args      256 B per problem: the grouped GEMM's problem sizes, pointers, strides and first rows;
//             moe_staged_problems(E, A) problems (the forward splits experts into row blocks)
//   cutlass   kMoeStagedCutlassBytes: CUTLASS's own workspace (tensor maps per SM, scheduler)
//   x_rows    [A, d] x's rows gathered into routing order (absent when x is already in it)
//   out_rows  dW: [A, f] dy's rows gathered into routing order (absent when dy is sorted; the forward
//             never has it: its epilogue writes the product rows in place)
#pragma once

#include <cstddef>
#include <cstdint>

namespace pit {

constexpr int64_t kMoeStagedArgsBytesPerExpert = 256;
constexpr int64_t kMoeStagedCutlassBytes = int64_t(1) << 20;
// The staged forward splits each expert of at least 4 * kMoeStagedSplitRows routing-order rows into
// blocks of this many (whole 128-row tiles; the last block takes the rest), so one expert holding
// most rows still gives the grouped GEMM several problems: CUTLASS's scheduler walks a problem's
// row tiles column by column, and one expert of 32768 rows ran 1.19x slower than eight of 4096
// (benchmarks/results/2026-11-27_session21/swizzle_probe_h100/). Measured there: cutting every
// expert at global multiples of 4096 rows (split_global_cuts_h100/) took Mixtral T=16384 one-hot
// 1.09-1.14x faster but cost 3-8% on uniform routing and 2-3% on T=4096 one-hot (8192 rows cut in
// two); blocks of 8192 (split_8192_h100/) gained less (1.02-1.11x). So only experts of 16384 rows
// or more are split, at their own tile grid.
constexpr int64_t kMoeStagedSplitRows = 4096;
constexpr int64_t kMoeStagedSplitMinRows = 4 * kMoeStagedSplitRows;

// The grouped GEMM's problems for E experts and A routed rows: one per expert and one slot for each
// multiple of kMoeStagedSplitRows (a split expert's block starting in that slot's row range).
inline int64_t moe_staged_problems(int64_t experts, int64_t assignments) {
  return experts + (assignments > 0 ? (assignments - 1) / kMoeStagedSplitRows : 0);
}

struct MoeStagedLayout {
  int64_t args = 0, cutlass = 0, x_rows = 0, out_rows = 0, total = 0;  // byte offsets; total size
};

inline int64_t moe_staged_align(int64_t bytes) { return (bytes + 255) / 256 * 256; }

inline MoeStagedLayout moe_staged_layout(int64_t experts, int64_t assignments, int64_t d, int64_t f,
                                         int64_t elem_bytes, bool x_sorted, bool out_sorted) {
  MoeStagedLayout l;
  l.args = 0;
  l.cutlass = moe_staged_align(moe_staged_problems(experts, assignments) * kMoeStagedArgsBytesPerExpert);
  l.x_rows = l.cutlass + kMoeStagedCutlassBytes;
  l.out_rows = l.x_rows + (x_sorted ? 0 : moe_staged_align(assignments * d * elem_bytes));
  l.total = l.out_rows + (out_sorted ? 0 : moe_staged_align(assignments * f * elem_bytes));
  return l;
}

}  // namespace pit
