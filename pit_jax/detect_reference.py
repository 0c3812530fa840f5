"""Pure-jnp micro-tile detection with the same outputs as the `pit_detect` kernels.

Used as the peer baseline in benchmarks (it is how a JAX user would write detection today:
a tile reduction then `jnp.nonzero(size=...)`) and as a cross-check in tests.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .tile_index import TileIndex


def tile_mask(x: jax.Array, tile) -> jax.Array:
    """Boolean [..., nb_m, nb_k]: which micro-tiles of x's last two dims hold a nonzero."""
    tm, tk = tile
    *lead, m, k = x.shape
    nb_m, nb_k = -(-m // tm), -(-k // tk)
    pad = [(0, 0)] * len(lead) + [(0, nb_m * tm - m), (0, nb_k * tk - k)]
    nz = jnp.pad(x != 0, pad)
    return nz.reshape(*lead, nb_m, tm, nb_k, tk).any(axis=(-3, -1))


def detect_reference(x: jax.Array, tile=(32, 1), *, layout: str = "row") -> TileIndex:
    mask = tile_mask(x, tile)
    if layout == "col":
        mask = jnp.swapaxes(mask, -1, -2)
    n_inner = mask.shape[-1]
    counts = mask.sum(-1, dtype=jnp.int32)
    offsets = jnp.concatenate(
        [jnp.zeros((*counts.shape[:-1], 1), jnp.int32), jnp.cumsum(counts, -1, dtype=jnp.int32)], -1)

    def row_nonzero(row):
        return jnp.nonzero(row, size=n_inner, fill_value=-1)[0].astype(jnp.int32)

    flat = mask.reshape(-1, n_inner)
    indices = jax.vmap(row_nonzero)(flat).reshape(mask.shape)
    return TileIndex(counts, offsets, indices, tuple(x.shape[-2:]), tuple(tile), layout)
