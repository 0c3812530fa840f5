"""Pure-jnp micro-tile detection with the same outputs as the `pit_detect` kernels.

Used as the peer baseline in benchmarks (it is how a JAX user would write detection today:
a tile reduction then `jnp.nonzero(size=...)`) and as a cross-check in tests.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .tile_index import TileIndex, tile_index_from_mask


def tile_mask(x: jax.Array, tile) -> jax.Array:
    """Boolean [..., nb_m, nb_k]: which micro-tiles of x's last two dims hold a nonzero."""
    tm, tk = tile
    *lead, m, k = x.shape
    nb_m, nb_k = -(-m // tm), -(-k // tk)
    pad = [(0, 0)] * len(lead) + [(0, nb_m * tm - m), (0, nb_k * tk - k)]
    nz = jnp.pad(x != 0, pad)
    return nz.reshape(*lead, nb_m, tm, nb_k, tk).any(axis=(-3, -1))


def detect_reference(x: jax.Array, tile=(32, 1), *, layout: str = "row") -> TileIndex:
    return tile_index_from_mask(tile_mask(x, tile), tuple(x.shape[-2:]), tuple(tile), layout)
