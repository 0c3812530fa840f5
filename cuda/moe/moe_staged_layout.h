// Workspace of the staged Hopper forward (moe_staged_sm90.cu): one u8 result of the custom call,
// sized by the lowering with the same formula (pit_jax/moe_cuda.py: staged_workspace_bytes).
// Sections, each 256-byte aligned:
//   args      256 B per expert: the grouped GEMM's per-expert problem sizes, pointers and strides
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

struct MoeStagedLayout {
  int64_t args = 0, cutlass = 0, x_rows = 0, out_rows = 0, total = 0;  // byte offsets; total size
};

inline int64_t moe_staged_align(int64_t bytes) { return (bytes + 255) / 256 * 256; }

inline MoeStagedLayout moe_staged_layout(int64_t experts, int64_t assignments, int64_t d, int64_t f,
                                         int64_t elem_bytes, bool x_sorted, bool out_sorted) {
  MoeStagedLayout l;
  l.args = 0;
  l.cutlass = moe_staged_align(experts * kMoeStagedArgsBytesPerExpert);
  l.x_rows = l.cutlass + kMoeStagedCutlassBytes;
  l.out_rows = l.x_rows + (x_sorted ? 0 : moe_staged_align(assignments * d * elem_bytes));
  l.total = l.out_rows + (out_sorted ? 0 : moe_staged_align(assignments * f * elem_bytes));
  return l;
}

}  // namespace pit
