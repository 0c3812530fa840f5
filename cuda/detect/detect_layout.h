// Micro-tile detection: the index layout shared by the CPU and CUDA handlers.
//
// x [..., M, K] is cut into micro-tiles of tile_m x tile_k (edge tiles are partial).
// A tile is nonzero when any element compares != 0 (NaN counts as nonzero, -0.0 as zero).
// layout kRowMajor: outer = row block (nb_m of them), inner = column block (nb_k): k-gather.
// layout kColMajor: outer = column block, inner = row block: m-gather.
//   counts [B, n_outer]          nonzero tiles per outer block
//   offsets [B, n_outer + 1]     exclusive prefix sum of counts (CSR offsets; last = total)
//   indices [B, n_outer, n_inner] inner ids of the nonzero tiles, ascending, then -1 padding
#pragma once

#include <cstdint>

#include "../common/ffi_common.h"

namespace pit {

enum DetectLayout : int64_t { kRowMajor = 0, kColMajor = 1 };

struct DetectShape {
  int64_t batch, rows, cols, tile_m, tile_k;
  int64_t nb_m() const { return (rows + tile_m - 1) / tile_m; }
  int64_t nb_k() const { return (cols + tile_k - 1) / tile_k; }
  int64_t n_outer(int64_t layout) const { return layout == kRowMajor ? nb_m() : nb_k(); }
  int64_t n_inner(int64_t layout) const { return layout == kRowMajor ? nb_k() : nb_m(); }
};

// Checks the handler's arguments and outputs (Python validates first; this guards the ABI).
inline ffi::Error check_detect_args(ffi::AnyBuffer::Dimensions x_dims, int64_t tile_m, int64_t tile_k,
                                    int64_t layout, ffi::AnyBuffer::Dimensions counts,
                                    ffi::AnyBuffer::Dimensions offsets, ffi::AnyBuffer::Dimensions indices,
                                    DetectShape* shape) {
  MatrixView v;
  if (!matrix_view(x_dims, &v)) return ffi::Error::InvalidArgument("pit_detect: x must have rank >= 2");
  if (v.rows <= 0 || v.cols <= 0) return ffi::Error::InvalidArgument("pit_detect: x's last two dims must be non-empty");
  if (tile_m <= 0 || tile_k <= 0) return ffi::Error::InvalidArgument("pit_detect: tile must be positive");
  if (layout != kRowMajor && layout != kColMajor) return ffi::Error::InvalidArgument("pit_detect: bad layout");
  *shape = DetectShape{v.batch, v.rows, v.cols, tile_m, tile_k};
  const int64_t n_outer = shape->n_outer(layout), n_inner = shape->n_inner(layout);
  if (element_count(counts) != v.batch * n_outer || element_count(offsets) != v.batch * (n_outer + 1) ||
      element_count(indices) != v.batch * n_outer * n_inner)
    return ffi::Error::InvalidArgument("pit_detect: output sizes do not match x and tile");
  return ffi::Error::Success();
}

}  // namespace pit
