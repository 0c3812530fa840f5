"""CUDA lowering of `pit_moe_matmul` and `pit_moe_matmul_tn` onto cuda/moe/moe_cuda.cu — EXPERIMENTAL.

The kernels are built and registered, but they have not yet been checked on a GPU, so the default
CUDA lowering stays the `lax.ragged_dot` reference (with its RuntimeWarning). Set
PIT_EXPERIMENTAL_MOE_KERNELS=1 (read when a function is lowered) to use them;
tests/test_moe_kernels.py compares them with the reference on a GPU.

Routing runs on device in cuda/moe/moe_route_cuda.cu (count -> scan -> scatter, a stable
counting sort of the assignments by expert, invalid ids last as pseudo-group E): group
offsets and the prefix sum of each group's row tiles, which the GEMM searches to find its
group. `routing_tables_reference` is the same in jnp (the test oracle).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from .moe_reference import route

TILE_ROWS = 64  # MoeConfig::kBM
ROUTE_CHUNK = 256  # kChunk in moe_route_cuda.cu
MAX_EXPERTS = 8191  # kMaxBins - 1


def enabled() -> bool:
    return os.environ.get("PIT_EXPERIMENTAL_MOE_KERNELS") == "1"


def _check_experts(num_experts):
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"pit_jax.moe_matmul: the CUDA kernels support up to {MAX_EXPERTS} experts, "
                         f"got {num_experts}")


def routing_tables(expert_ids, num_experts):
    """(order [A], group_starts [E + 2], tile_starts [E + 2]) with group E = invalid ids."""
    a = expert_ids.shape[0]
    i32 = jnp.int32
    chunks = -(-a // ROUTE_CHUNK)
    outs = (jax.ShapeDtypeStruct((a,), i32), jax.ShapeDtypeStruct((num_experts + 2,), i32),
            jax.ShapeDtypeStruct((num_experts + 2,), i32),
            jax.ShapeDtypeStruct(((num_experts + 1) * chunks,), i32))
    order, group_starts, tile_starts, _ = jax.ffi.ffi_call("pit_moe_route", outs)(
        expert_ids.astype(i32), num_experts=np.int64(num_experts), tile_rows=np.int64(TILE_ROWS))
    return order, group_starts, tile_starts


def routing_tables_reference(expert_ids, num_experts):
    """routing_tables in jnp (stable argsort)."""
    order, sizes = route(expert_ids, num_experts)
    a = expert_ids.shape[0]
    sizes = jnp.concatenate([sizes, (a - jnp.sum(sizes))[None]]).astype(jnp.int32)
    zero = jnp.zeros(1, jnp.int32)
    group_starts = jnp.concatenate([zero, jnp.cumsum(sizes)]).astype(jnp.int32)
    tiles = (sizes + TILE_ROWS - 1) // TILE_ROWS
    tile_starts = jnp.concatenate([zero, jnp.cumsum(tiles)]).astype(jnp.int32)
    return order, group_starts, tile_starts


def moe_matmul_cuda(x, w, expert_ids, *, rows_per_source):
    _check_experts(w.shape[0])
    order, group_starts, tile_starts = routing_tables(expert_ids, w.shape[0])
    out_type = jax.ShapeDtypeStruct((expert_ids.shape[0], w.shape[-1]), x.dtype)
    return jax.ffi.ffi_call("pit_moe_matmul", out_type)(
        x, w, order, group_starts, tile_starts,
        rows_per_source=np.int64(rows_per_source), tile_rows=np.int64(TILE_ROWS))


def moe_matmul_tn_cuda(x, dy, expert_ids, *, rows_per_source, num_experts, out_dtype):
    _check_experts(num_experts)
    order, group_starts, _ = routing_tables(expert_ids, num_experts)
    out_type = jax.ShapeDtypeStruct((num_experts, x.shape[-1], dy.shape[-1]), x.dtype)
    dw = jax.ffi.ffi_call("pit_moe_matmul_tn", out_type)(
        x, dy.astype(x.dtype), order, group_starts, rows_per_source=np.int64(rows_per_source))
    return dw.astype(out_dtype)
