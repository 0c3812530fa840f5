"""Micro-tile detection rule: primitive, lowering per platform, public `detect`."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from . import _primitive
from .tile_index import LAYOUTS, TileIndex, ceil_div, is_int_pair

_TARGET = "pit_detect"

detect_p = _primitive.make_primitive("pit_detect")


def _grid(m, k, tile_m, tile_k):
    return ceil_div(m, tile_m), ceil_div(k, tile_k)


def _outer_inner(m, k, tile_m, tile_k, layout):
    nb_m, nb_k = _grid(m, k, tile_m, tile_k)
    return (nb_m, nb_k) if layout == "row" else (nb_k, nb_m)


def _abstract_eval(x, *, tile_m, tile_k, layout):
    *lead, m, k = x.shape
    n_outer, n_inner = _outer_inner(m, k, tile_m, tile_k, layout)
    i32 = jnp.int32
    return (jax.core.ShapedArray((*lead, n_outer), i32),
            jax.core.ShapedArray((*lead, n_outer + 1), i32),
            jax.core.ShapedArray((*lead, n_outer, n_inner), i32))


detect_p.def_abstract_eval(_abstract_eval)


def cuda_workspace_words(lead, m, k, tile_m, tile_k, layout):
    """Scratch of the CUDA handler in 32-bit words; must match `Plan` in detect_cuda.cu:
    a column bitmask per 32-row slab of each row block, one count per chunk of inner blocks,
    and one counter per batch element."""
    batch = math.prod(lead) if lead else 1
    nb_m, _ = _grid(m, k, tile_m, tile_k)
    n_outer, n_inner = _outer_inner(m, k, tile_m, tile_k, layout)
    n_slabs = (tile_m + 31) // 32
    tile_words = tile_k // 32 if tile_k % 32 == 0 else (tile_k - 1 + 31) // 32 + 1
    wide = n_slabs * tile_words >= 8  # a warp per tile (kWideWords)
    chunk = 32 if wide else 4096
    return (batch * nb_m * n_slabs * ((k + 31) // 32)
            + batch * n_outer * ((n_inner + chunk - 1) // chunk) + batch)


def _ffi_params(tile_m, tile_k, layout):
    return dict(tile_m=np.int64(tile_m), tile_k=np.int64(tile_k),
                layout=np.int64(LAYOUTS.index(layout)))


_ffi_rule = jax.ffi.ffi_lowering(_TARGET)  # same target name on both platforms


def _lower_cpu(ctx, x, *, tile_m, tile_k, layout):
    return _ffi_rule(ctx, x, **_ffi_params(tile_m, tile_k, layout))


def _lower_cuda(ctx, x, *, tile_m, tile_k, layout):
    # The CUDA handler needs scratch; it is an extra result, dropped here.
    *lead, m, k = ctx.avals_in[0].shape
    words = cuda_workspace_words(lead, m, k, tile_m, tile_k, layout)
    ws = jax.core.ShapedArray((words,), jnp.uint32)
    outs = _ffi_rule(ctx.replace(avals_out=[*ctx.avals_out, ws]), x,
                      **_ffi_params(tile_m, tile_k, layout))
    return outs[:3]


_primitive.register_lowerings(detect_p, cpu=_lower_cpu, cuda=_lower_cuda)
_primitive.batch_at_front(detect_p)
_primitive.integer_outputs_jvp(detect_p)


def _check_tile(tile, m, k):
    if not isinstance(tile, (tuple, list)) or not is_int_pair(tile):
        raise TypeError(f"pit_jax.detect: tile must be a pair of ints (tm, tk), got {tile!r}")
    tm, tk = int(tile[0]), int(tile[1])
    if tm <= 0 or tk <= 0:
        raise ValueError(f"pit_jax.detect: tile sizes must be positive, got tile={tile!r}")
    for name, t, d in (("tm", tm, m), ("tk", tk, k)):
        if isinstance(d, int) and t > d:
            raise ValueError(f"pit_jax.detect: tile {name}={t} is larger than x's dimension ({d}); "
                             f"x's last two dims are ({m}, {k})")
    return tm, tk


def detect(x: jax.Array, tile=(32, 1), *, layout: str = "row") -> TileIndex:
    """Find the nonzero micro-tiles of the last two dims of `x`, on device, without host sync.

    Args:
      x: [..., M, K] bfloat16, float16 or float32; leading dims are batch.
      tile: (tm, tk) micro-tile shape, positive and no larger than (M, K).
      layout: "row" (per row block, its nonzero column blocks; for k-gather) or "col" (per
        column block, its nonzero row blocks; for m-gather).

    Returns a `TileIndex`. Works under jit, vmap, grad (the index has no gradient) and jax.export.
    """
    _primitive.check_float_matrix("detect", "x", x)
    if layout not in LAYOUTS:
        raise ValueError(f"pit_jax.detect: layout must be one of {LAYOUTS}, got {layout!r}")
    m, k = x.shape[-2:]
    if (isinstance(m, int) and m == 0) or (isinstance(k, int) and k == 0):
        raise ValueError(f"pit_jax.detect: x's last two dims must be non-empty, got shape {x.shape}")
    tm, tk = _check_tile(tile, m, k)
    if isinstance(m, int) and isinstance(k, int) and (-(-m // tm)) * (-(-k // tk)) >= 2**31:
        raise ValueError(f"pit_jax.detect: x of shape {x.shape} with tile {(tm, tk)} has "
                         f"{(-(-m // tm)) * (-(-k // tk))} micro-tiles per matrix; the int32 index "
                         "holds fewer than 2**31 — use a larger tile")
    counts, offsets, indices = detect_p.bind(x, tile_m=tm, tile_k=tk, layout=layout)
    return TileIndex(counts, offsets, indices, (m, k), (tm, tk), layout)
