"""Magnitude pruning by micro-tile, on device: the masks that `dense_sparse` then skips.

Sparse training in the PIT style recomputes the weight mask at every step from the current
weights (no offline preprocessing). These functions do that with jnp alone (a sort of the tile
norms, no host round trip), so they run inside `jit` and `grad` on any backend, and `density`
may be a traced scalar (a pruning schedule does not recompile).
"""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from .tile_index import expand_tile_mask, is_int_pair


def check_tile_and_density(fn, tile, density):
    """Trace-time checks of a pruning tile (tk, tn) and density, naming the argument."""
    if not is_int_pair(tile) or min(tile) <= 0:
        raise ValueError(f"pit_jax.{fn}: tile must be a pair of positive ints, got {tile!r}")
    if isinstance(density, numbers.Real) and not isinstance(density, bool):
        if not 0.0 < float(density) <= 1.0:
            raise ValueError(f"pit_jax.{fn}: density must be in (0, 1], got {density!r}")
    elif not (hasattr(density, "shape") and density.shape == () and jnp.issubdtype(density.dtype, jnp.floating)):
        raise TypeError(f"pit_jax.{fn}: density must be a float in (0, 1] or a float scalar array, "
                        f"got {density!r}")


def _check(fn, w, tile, density):
    if not hasattr(w, "shape") or not hasattr(w, "dtype") or len(w.shape) != 2:
        raise ValueError(f"pit_jax.{fn}: w must be a matrix [K, N], got "
                         f"{'shape ' + str(tuple(w.shape)) if hasattr(w, 'shape') else type(w).__name__}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"pit_jax.{fn}: w must be a floating-point array, got {w.dtype}")
    check_tile_and_density(fn, tile, density)


# density · tiles within this relative distance of an integer counts as that integer: float
# rounding of the product (0.3 · 420 is 126.000005 in float32) must not keep one tile more.
_SNAP = 1e-6


def kept_tile_count(density, tiles):
    """ceil(density · tiles), clipped to [1, tiles]; a product within 1e-6 (relative) of an
    integer is that integer. A Python or numpy density is counted in float64, a traced one in
    float32 (the same count wherever float32 holds density · tiles to 1e-6, i.e. below about
    10^6 tiles for densities that are not exact binary fractions)."""
    if isinstance(density, numbers.Real):
        p = float(density) * tiles
        r = round(p)
        count = r if abs(p - r) <= _SNAP * max(p, 1.0) else math.ceil(p)
        return min(max(count, 1), tiles)
    count = ceil_snapped(jnp.clip(jnp.asarray(density, jnp.float32), 0.0, 1.0) * tiles)
    return jnp.clip(count, 1, tiles).astype(jnp.int32)


def ceil_snapped(p):
    """ceil of a float32 device value, a value within 1e-6 (relative) of an integer taken as that
    integer (float32 rounding of a product must not add one)."""
    r = jnp.round(p)
    return jnp.where(jnp.abs(p - r) <= _SNAP * jnp.maximum(p, 1.0), r, jnp.ceil(p))


def _kept_tiles(w, tile, density):
    """(boolean tile mask [ceil(K/tk), ceil(N/tn)], the tile clamped to w's shape)."""
    k, n = w.shape
    tk, tn = max(min(int(tile[0]), k), 1), max(min(int(tile[1]), n), 1)  # (1 on an empty dim)
    bk, bn = -(-k // tk), -(-n // tn)
    a = jax.lax.stop_gradient(w).astype(jnp.float32)
    a = jnp.pad(a, ((0, bk * tk - k), (0, bn * tn - n)))
    norms = jnp.sqrt(jnp.sum(jnp.square(a.reshape(bk, tk, bn, tn)), axis=(1, 3)))
    tiles = bk * bn
    if tiles == 0:  # an empty w has no tile to keep
        return jnp.zeros((bk, bn), bool), (tk, tn)
    ascending = jnp.sort(norms.reshape(-1))
    threshold = ascending[tiles - kept_tile_count(density, tiles)]
    return norms >= threshold, (tk, tn)


def tile_magnitude_mask(w, tile, density, *, tiles: bool = False):
    """Boolean [K, N] mask keeping the micro-tiles of `w` with the largest L2 norms.

    `tile` = (tk, tn) as in `dense_sparse`; edge tiles of a K or N that is not a multiple of the
    tile count as tiles of the elements they have. The ceil(density · tiles) largest norms are
    kept (`kept_tile_count`; at least one), and every tile tied with the smallest kept norm as
    well. A traced `density` is clipped into [0, 1]. The mask carries no gradient.

    tiles=True: the tile mask [ceil(K/tk), ceil(N/tn)] itself (one entry per micro-tile, the tile
    clamped to w's shape), e.g. for `pit_jax.tile_index_from_mask`.
    """
    _check("tile_magnitude_mask", w, tile, density)
    keep, (tk, tn) = _kept_tiles(w, tile, density)
    return keep if tiles else expand_tile_mask(keep, w.shape, (tk, tn))


def prune_tiles_by_magnitude(w, tile, density):
    """`w` with every micro-tile outside `tile_magnitude_mask(w, tile, density)` set to zero.

    Gradients pass to the kept weights only (the pruned ones are constant zeros).
    """
    _check("prune_tiles_by_magnitude", w, tile, density)
    return jnp.where(tile_magnitude_mask(w, tile, density), w, jnp.zeros((), w.dtype))
