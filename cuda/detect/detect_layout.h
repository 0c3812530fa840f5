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

namespace pit {

enum DetectLayout : int64_t { kRowMajor = 0, kColMajor = 1 };

struct DetectShape {
  int64_t batch, rows, cols, tile_m, tile_k;
  int64_t nb_m() const { return (rows + tile_m - 1) / tile_m; }
  int64_t nb_k() const { return (cols + tile_k - 1) / tile_k; }
  int64_t n_outer(int64_t layout) const { return layout == kRowMajor ? nb_m() : nb_k(); }
  int64_t n_inner(int64_t layout) const { return layout == kRowMajor ? nb_k() : nb_m(); }
};

}  // namespace pit
