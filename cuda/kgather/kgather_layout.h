// Shapes and scratch layout shared by the k-gather CUDA handlers (and mirrored in
// pit_jax/kgather.py, which sizes the scratch buffer XLA allocates for them).
#pragma once

#include <cstdint>

#include "../common/ffi_common.h"

namespace pit {

// Rows that share one k-list in the forward GEMM. The Python lowering guarantees that the row
// tile is a multiple of this (a smaller tile is merged into 32-row groups before the call).
constexpr int64_t kGroupRows = 32;
// Packed (gathered) rows are padded to a multiple of the forward GEMM's k-step.
constexpr int64_t kPackAlign = 32;
// dW tiles: rows of dW (= columns of x) per CTA; one 64-bit column mask per (row group, tile).
constexpr int64_t kMaskCols = 64;

struct KGatherShape {
  int64_t batch = 1;   // product of x's leading dims
  int64_t rows = 0;    // M
  int64_t k = 0;       // K (x's columns, w's rows)
  int64_t n = 0;       // N (w's / dy's columns)
  int64_t tile_m = 0;  // row tile (multiple of kGroupRows)
  int64_t tile_k = 0;
  int64_t nb_m = 0;
  int64_t nb_k = 0;
  int64_t groups = 0;    // ceil(M / kGroupRows)
  int64_t packed_k = 0;  // row length of the packed x: nb_k * tile_k rounded up to kPackAlign

  PIT_HOST_DEVICE int64_t all_groups() const { return batch * groups; }
  PIT_HOST_DEVICE int64_t mask_tiles() const { return ceil_div(k, kMaskCols); }
  // The count of row block `block` (over the batch). A caller's TileIndex is device data the host
  // never sees: its count is clamped to [0, nb_k], so no kernel reads past its row of ids or its
  // group's packed scratch.
  PIT_HOST_DEVICE int64_t listed_count(const int32_t* counts, int64_t block) const {
    const int64_t count = counts[block];
    return count < 0 ? 0 : count > nb_k ? nb_k : count;
  }
  // The packed length (tile_k · its row block's count) of group g of batch element b, as pack writes it.
  PIT_HOST_DEVICE int64_t group_length(const int32_t* counts, int64_t b, int64_t g) const {
    return listed_count(counts, b * nb_m + g * kGroupRows / tile_m) * tile_k;
  }
  // Column p of a group's packed list (ids: its row block's listed column blocks), or -1 where p is
  // past K (the last block is partial) or the id is outside [0, nb_k) (a caller's bad index: skipped).
  PIT_HOST_DEVICE int64_t listed_column(const int32_t* ids, int64_t p) const {
    const int64_t block = ids[p / tile_k];
    const int64_t col = block * tile_k + p % tile_k;
    return (block < 0 || block >= nb_k || col >= k) ? -1 : col;
  }

  // Forward scratch: packed x [batch*groups*32, packed_k] then its column ids [batch*groups, packed_k].
  int64_t packed_x_bytes(int64_t elem_bytes) const { return all_groups() * kGroupRows * packed_k * elem_bytes; }
  int64_t forward_workspace_bytes(int64_t elem_bytes) const {
    return packed_x_bytes(elem_bytes) + all_groups() * packed_k * int64_t(sizeof(int32_t));
  }
  // dW scratch: one 64-bit column mask per (column tile, row group).
  int64_t tn_workspace_bytes() const { return mask_tiles() * all_groups() * int64_t(sizeof(uint64_t)); }
};

inline KGatherShape make_kgather_shape(int64_t batch, int64_t rows, int64_t k, int64_t n, int64_t tile_m,
                                       int64_t tile_k) {
  KGatherShape s;
  s.batch = batch;
  s.rows = rows;
  s.k = k;
  s.n = n;
  s.tile_m = tile_m;
  s.tile_k = tile_k;
  s.nb_m = ceil_div(rows, tile_m);
  s.nb_k = ceil_div(k, tile_k);
  s.groups = ceil_div(rows, kGroupRows);
  s.packed_k = ceil_div(s.nb_k * tile_k, kPackAlign) * kPackAlign;
  return s;
}

}  // namespace pit
