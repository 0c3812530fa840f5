"""CUDA lowering of `pit_moe_matmul` and `pit_moe_matmul_tn` onto cuda/moe/moe_cuda.cu — EXPERIMENTAL.

The kernels are built and registered, but they have not yet been checked on a GPU, so the default
CUDA lowering stays the `lax.ragged_dot` reference (with its RuntimeWarning). Set
PIT_EXPERIMENTAL_MOE_KERNELS=1 (read when a function is lowered) to use them;
tests/test_moe_kernels.py compares them with the reference on a GPU.

Routing is done here on device: a stable sort of the assignments by expert (invalid ids
last, as pseudo-group E), group offsets, and the prefix sum of each group's row tiles, which
the kernel searches to find its group.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from .moe_reference import route

TILE_ROWS = 64  # MoeConfig::kBM


def enabled() -> bool:
    return os.environ.get("PIT_EXPERIMENTAL_MOE_KERNELS") == "1"


def routing_tables(expert_ids, num_experts):
    """(order [A], group_starts [E + 2], tile_starts [E + 2]) with group E = invalid ids."""
    order, sizes = route(expert_ids, num_experts)
    a = expert_ids.shape[0]
    sizes = jnp.concatenate([sizes, (a - jnp.sum(sizes))[None]]).astype(jnp.int32)
    zero = jnp.zeros(1, jnp.int32)
    group_starts = jnp.concatenate([zero, jnp.cumsum(sizes)]).astype(jnp.int32)
    tiles = (sizes + TILE_ROWS - 1) // TILE_ROWS
    tile_starts = jnp.concatenate([zero, jnp.cumsum(tiles)]).astype(jnp.int32)
    return order, group_starts, tile_starts


def moe_matmul_cuda(x, w, expert_ids, *, rows_per_source):
    order, group_starts, tile_starts = routing_tables(expert_ids, w.shape[0])
    out_type = jax.ShapeDtypeStruct((expert_ids.shape[0], w.shape[-1]), x.dtype)
    return jax.ffi.ffi_call("pit_moe_matmul", out_type)(
        x, w, order, group_starts, tile_starts,
        rows_per_source=np.int64(rows_per_source), tile_rows=np.int64(TILE_ROWS))


def moe_matmul_tn_cuda(x, dy, expert_ids, *, rows_per_source, num_experts, out_dtype):
    order, group_starts, _ = routing_tables(expert_ids, num_experts)
    out_type = jax.ShapeDtypeStruct((num_experts, x.shape[-1], dy.shape[-1]), x.dtype)
    dw = jax.ffi.ffi_call("pit_moe_matmul_tn", out_type)(
        x, dy.astype(x.dtype), order, group_starts, rows_per_source=np.int64(rows_per_source))
    return dw.astype(out_dtype)
