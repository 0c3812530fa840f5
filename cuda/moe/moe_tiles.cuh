// Problem shape and routing-tile lookup shared by the MoE grouped-GEMM kernels (moe_cuda.cu,
// moe_sm90.cuh).
#pragma once

#include <cstdint>

#include "../common/ffi_common.h"

namespace pit {

// Rows per routing tile: tile_starts (from the routing kernel) counts each expert's rows in
// tiles of this many; the Hopper forward computes one such tile per CTA, the sm_80 forward
// two halves of 64.
constexpr int kMoeRouteTileRows = 128;

// Fused epilogues of the forward (the `epilogue` attribute of pit_moe_fused; the same numbers
// as EPILOGUES in pit_jax/moe.py): applied to the fp32 accumulators before the single rounding.
enum MoeEpilogue : int {
  kEpiNone = 0,
  kEpiReLU = 1,    // max(v, 0)
  kEpiGELU = 2,    // tanh approximation (jax.nn.gelu's default)
  kEpiSwiGLU = 3,  // silu(x @ w_gate) * (x @ w_up)
  kEpiScale = 4,   // v * row_scale[assignment]: the top-k combine weight
};

struct MoeShape {
  int64_t sources = 0;      // R rows of x
  int64_t d = 0, f = 0;     // x [R, d]; w [E, d, f], or [E, f, d] when w_transposed; out [A, f]
  int64_t experts = 0;      // E
  int64_t assignments = 0;  // A rows of out
  int64_t rows_per_source = 1;
  bool w_transposed = false;  // out[a] = x[a / r] @ w[e]ᵀ (w given as [E, f, d])
  // Row layouts: x's (x_sorted) and out's or, for dW, dy's (out_sorted) row p holds assignment
  // order[p] — routing order, each expert's rows contiguous — instead of source / assignment order.
  bool x_sorted = false, out_sorted = false;
  int64_t max_row_tiles = 0;  // grid bound of the forward: ceil(A / tile) + E + 1
  bool fast_rows = true;      // Hopper forward: unpredicated copies for whole gathered rows (an A/B switch)
  bool skip_idle_half = true;  // Hopper forward: a warpgroup whose 64 rows are all padding skips its MMAs
  bool two_ended_rows = false;  // Hopper forward: row tiles alternately from the front and the back (set per launch)
};

inline MoeShape make_moe_shape(int64_t sources, int64_t d, int64_t f, int64_t experts, int64_t assignments,
                               int64_t rows_per_source, bool w_transposed, bool x_sorted, bool out_sorted) {
  MoeShape s;
  s.sources = sources;
  s.d = d;
  s.f = f;
  s.experts = experts;
  s.assignments = assignments;
  s.rows_per_source = rows_per_source;
  s.w_transposed = w_transposed;
  s.x_sorted = x_sorted;
  s.out_sorted = out_sorted;
  s.max_row_tiles = ceil_div(assignments, int64_t(kMoeRouteTileRows)) + experts + 1;
  return s;
}

// The routing tile `tile` of a forward grid: its group (expert, or E for invalid ids) by binary
// search in tile_starts, its first position in `order` and its row count (<= kMoeRouteTileRows).
// Returns false past the last tile of this routing.
struct MoeRouteTile {
  int group;
  int64_t first;
  int rows;
};

__device__ __forceinline__ bool find_route_tile(const int32_t* tile_starts, const int32_t* group_starts,
                                                int64_t experts, int64_t tile, MoeRouteTile* out) {
  if (tile >= tile_starts[experts + 1]) return false;
  int lo = 0, hi = int(experts) + 1;  // largest group g with tile_starts[g] <= tile
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (tile_starts[mid] <= tile) lo = mid; else hi = mid;
  }
  out->group = lo;
  out->first = group_starts[lo] + (tile - tile_starts[lo]) * kMoeRouteTileRows;
  const int64_t left = int64_t(group_starts[lo + 1]) - out->first;
  out->rows = int(left < kMoeRouteTileRows ? left : kMoeRouteTileRows);
  return true;
}

// Raster of the forward grid (row tiles x column tiles): the column tiles come in bands of
// `band`; inside a band, consecutive CTAs take the band's columns of one row tile, then of the
// next row tile. band = 1 walks all row tiles of one column tile first (every expert's weight
// column tile is read by neighbouring CTAs); a wider band keeps fewer experts' rows in flight.
struct MoeGridTile {
  int64_t row_tile, col_tile;
};

__device__ __forceinline__ MoeGridTile forward_grid_tile(int64_t block, int64_t row_tiles, int64_t col_tiles,
                                                         int64_t band) {
  const int64_t band_blocks = row_tiles * band, b = block / band_blocks, r = block % band_blocks;
  const int64_t width = col_tiles - b * band < band ? col_tiles - b * band : band;
  return {r / width, b * band + r % width};
}

// Row tile of grid row `row` when the tiles are taken alternately from both ends of the routing
// (0, n - 1, 1, n - 2, ...; PIT_MOE_TWO_ENDED=1): when the groups are sorted by size, each wave
// then mixes tiles of large groups (weights shared by many tiles: MMA-bound) with tiles of small
// ones (weights read for few rows: memory-bound), and each group's tiles stay neighbours.
__device__ __forceinline__ int64_t two_ended_row_tile(const MoeShape& s, const int32_t* tile_starts, int64_t row) {
  if (!s.two_ended_rows) return row;
  const int64_t n = tile_starts[s.experts + 1];
  return row >= n ? row : (row % 2 == 0 ? row / 2 : n - 1 - row / 2);
}

}  // namespace pit
