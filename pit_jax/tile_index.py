"""TileIndex: the result of micro-tile detection, a pytree of device arrays plus static metadata."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
from jax import export as jax_export

from ._checks import is_int


def ceil_div(a, b):
    """ceil(a / b) in the one form every grid uses, so jax.export's symbolic dims compare equal
    (-(-a // b) is the same number but not the same symbolic expression)."""
    return (a + b - 1) // b


def clamp_tile(tile, shape):
    """`tile` as ints, each no larger than its dim of `shape`: a tile larger than the matrix covers
    it in one block. A symbolic dim (jax.export) keeps the tile: one partial block covers a smaller
    matrix just the same."""
    return tuple(min(int(t), d) if is_int(d) else int(t) for t, d in zip(tile, shape))


LAYOUTS = ("row", "col")


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class TileIndex:
    """Nonzero micro-tiles of the last two dims of an array x [..., M, K].

    x is cut into tiles of `tile = (tm, tk)`; edge tiles are partial. Row block i covers rows
    [i*tm, (i+1)*tm), column block j covers columns [j*tk, (j+1)*tk). A tile is nonzero when any
    of its elements compares != 0 (NaN is nonzero, -0.0 is zero).

    layout "row" (k-gather): outer blocks are row blocks, inner blocks are column blocks.
    layout "col" (m-gather): outer blocks are column blocks, inner blocks are row blocks.

    counts  int32 [..., n_outer]           nonzero tiles in each outer block
    offsets int32 [..., n_outer + 1]       exclusive prefix sum of counts; offsets[..., -1] = total
    indices int32 [..., n_outer, n_inner]  per outer block: ids of its nonzero inner blocks in
                                           ascending order, then -1 up to the capacity n_inner

    The capacity is fixed by the shape (every tile could be nonzero), so the index can never
    overflow and its shape stays symbolic under jax.export.

    Build it with `pit_jax.detect` or `pit_jax.tile_index_from_mask`. The ops check a given
    index's metadata, shapes and dtypes at trace time, but not its values (they are data on the
    device): an index built by hand must keep the invariants above (counts ≤ n_inner, ids in
    [0, n_inner) then -1) for defined results. One that breaks them stays in bounds: the CUDA
    kernels clamp counts to [0, n_inner] and skip ids outside [0, n_inner).
    """

    counts: jax.Array
    offsets: jax.Array
    indices: jax.Array
    shape: tuple  # (M, K) of the detected array's last two dims
    tile: tuple  # (tm, tk)
    layout: str

    def tree_flatten(self):
        return (self.counts, self.offsets, self.indices), (self.shape, self.tile, self.layout)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def grid(self) -> tuple:
        """(number of row blocks, number of column blocks)."""
        (m, k), (tm, tk) = self.shape, self.tile
        return (ceil_div(m, tm), ceil_div(k, tk))

    @property
    def nnz(self) -> jax.Array:
        """Total nonzero micro-tiles, per leading index."""
        return self.offsets[..., -1]

    @property
    def density(self) -> jax.Array:
        """Fraction of micro-tiles that are nonzero, per leading index."""
        nb_m, nb_k = self.grid
        return self.nnz.astype(jnp.float32) / max(nb_m * nb_k, 1)

    def to_mask(self) -> jax.Array:
        """Boolean tile mask [..., nb_m, nb_k] rebuilt from the index (for checks and references)."""
        return tile_mask_from_indices(self.indices, self.layout)

    def element_mask(self) -> jax.Array:
        """Boolean [..., M, K]: True on the elements covered by a nonzero micro-tile."""
        return element_mask_from_indices(self.indices, self.shape, self.tile, self.layout)


def _serialize_index_metadata(aux) -> bytes:
    shape, tile, layout = aux
    if not all(is_int(d) for d in (*shape, *tile)):
        raise ValueError(f"pit_jax.TileIndex: an exported index's shape and tile must be ints to be serialized "
                         f"(symbolic dims only in its leading, batch dims), got shape {shape}, tile {tile}")
    return json.dumps([[int(d) for d in shape], [int(t) for t in tile], layout]).encode()


def _deserialize_index_metadata(data: bytes):
    shape, tile, layout = json.loads(data.decode())
    return tuple(shape), tuple(tile), layout


# an exported function may take or return a TileIndex (jax.export serializes its pytree)
jax_export.register_pytree_node_serialization(TileIndex, serialized_name="pit_jax.TileIndex",
                                             serialize_auxdata=_serialize_index_metadata,
                                             deserialize_auxdata=_deserialize_index_metadata)


def is_int_pair(tile) -> bool:
    """A sequence of two Python or numpy ints (not bools): the form every tile argument takes."""
    return hasattr(tile, "__len__") and len(tile) == 2 and all(is_int(t) for t in tile)


def tile_index_from_mask(mask: jax.Array, shape, tile, layout: str = "row") -> TileIndex:
    """The TileIndex of an array of `shape` (M, K) whose nonzero micro-tiles of `tile` are True in
    the boolean tile mask `mask` [..., ceil(M/tm), ceil(K/tk)]: the index `detect` would give for
    values nonzero exactly there, built from the (small) tile mask by a jnp compaction on device,
    without the array itself. For a mask a caller already has (magnitude pruning, a fixed pattern),
    so no element mask is expanded and read again. A tile larger than `shape` is clamped to it, as
    `detect`, the ops and `tile_magnitude_mask` clamp theirs (the grid is the same)."""
    if layout not in LAYOUTS:
        raise ValueError(f"pit_jax.tile_index_from_mask: layout must be one of {LAYOUTS}, got {layout!r}")
    # shape: ints, or jax.export's symbolic dims, which are not clamped against
    if not (hasattr(shape, "__len__") and len(shape) == 2
            and all(is_int(d) and d > 0 or jax_export.is_symbolic_dim(d) for d in shape)):
        raise ValueError(f"pit_jax.tile_index_from_mask: shape must be a pair of positive ints (M, K), got {shape!r}")
    if not is_int_pair(tile) or min(tile) <= 0:
        raise ValueError(f"pit_jax.tile_index_from_mask: tile must be a pair of positive ints, got {tile!r}")
    m, k = (int(d) if is_int(d) else d for d in shape)
    tm, tk = clamp_tile(tile, (m, k))
    grid = (ceil_div(m, tm), ceil_div(k, tk))
    if not hasattr(mask, "shape") or len(mask.shape) < 2 or tuple(mask.shape[-2:]) != grid:
        raise ValueError(f"pit_jax.tile_index_from_mask: mask must have shape [..., {grid[0]}, {grid[1]}] "
                         f"(the tile grid of shape {tuple(shape)} with tile {tuple(tile)}), got "
                         f"{getattr(mask, 'shape', type(mask).__name__)}")
    mask = jnp.asarray(mask).astype(bool)
    if layout == "col":
        mask = jnp.swapaxes(mask, -1, -2)
    n_inner = mask.shape[-1]
    counts = mask.sum(-1, dtype=jnp.int32)
    offsets = jnp.concatenate(
        [jnp.zeros((*counts.shape[:-1], 1), jnp.int32), jnp.cumsum(counts, -1, dtype=jnp.int32)], -1)
    row_nonzero = lambda row: jnp.nonzero(row, size=n_inner, fill_value=-1)[0].astype(jnp.int32)
    indices = jax.vmap(row_nonzero)(mask.reshape(-1, n_inner)).reshape(mask.shape)
    return TileIndex(counts, offsets, indices, (m, k), (int(tm), int(tk)), layout)


def tile_mask_from_indices(indices: jax.Array, layout: str) -> jax.Array:
    """[..., n_outer, n_inner] ids (-1 padded) -> boolean tile mask [..., nb_m, nb_k]."""
    n_inner = indices.shape[-1]
    slots = jnp.where(indices >= 0, indices, n_inner)  # padding lands in a spare column
    scatter_row = lambda row: jnp.zeros(n_inner + 1, bool).at[row].set(True)
    mask = jax.vmap(scatter_row)(slots.reshape(-1, n_inner))[:, :n_inner].reshape(indices.shape)
    return mask if layout == "row" else jnp.swapaxes(mask, -1, -2)


def expand_tile_mask(mask: jax.Array, shape, tile) -> jax.Array:
    """Boolean tile mask [..., nb_m, nb_k] -> boolean [..., M, K], each tile's value on its elements."""
    (m, k), (tm, tk) = shape, tile
    return jnp.repeat(jnp.repeat(mask, tm, axis=-2), tk, axis=-1)[..., :m, :k]


def element_mask_from_indices(indices: jax.Array, shape, tile, layout: str) -> jax.Array:
    """[..., n_outer, n_inner] ids -> boolean [..., M, K], True on elements of nonzero tiles."""
    return expand_tile_mask(tile_mask_from_indices(indices, layout), shape, tile)
