"""jnp references of the MoE m-gather/scatter rule (the CPU path, and the check for kernels).

Routing by a stable sort, grouped matmuls through `jax.lax.ragged_dot`, scatter back to
assignment order. Materialises the permuted rows, which the PIT kernels avoid.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32
TILE_ROWS = 128  # rows per routing tile (kMoeRouteTileRows in cuda/moe/moe_tiles.cuh)


def route(expert_ids: jax.Array, num_experts: int):
    """Assignments (flattened expert ids) grouped by expert.

    Returns (order, group_sizes): `order` [A] lists assignment ids sorted by expert (stable, so
    token order is kept inside each expert); `group_sizes` [E] counts them. Ids outside
    [0, E) belong to no expert: they sort last, are in no group, and their rows get no output."""
    flat = expert_ids.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    key = jnp.where(valid, flat, num_experts)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    group_sizes = jnp.zeros(num_experts + 1, jnp.int32).at[key].add(1)[:num_experts]
    return order, group_sizes


def routing_tables_ref(expert_ids, *, num_experts):
    """(order [A], group_starts [E + 2], tile_starts [E + 2]): assignments sorted by expert,
    offsets of groups 0..E (group E: invalid ids) and the prefix sum of each group's
    TILE_ROWS-row tiles — what the routing kernel builds."""
    order, sizes = route(expert_ids, num_experts)
    a = expert_ids.shape[0]
    sizes = jnp.concatenate([sizes, (a - jnp.sum(sizes))[None]]).astype(jnp.int32)
    group_starts = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(sizes)]).astype(jnp.int32)
    return order, group_starts, tile_starts_of(group_starts)


def tile_starts_of(group_starts):
    """Prefix sum of each group's TILE_ROWS-row tiles, [E + 2], from the group offsets."""
    tiles = (jnp.diff(group_starts) + TILE_ROWS - 1) // TILE_ROWS
    return jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(tiles)]).astype(jnp.int32)


def _expert_weights(w, w_transposed):
    return jnp.swapaxes(w, -1, -2) if w_transposed else w


def grouped_matmul_ref(x, w, order, group_starts, tile_starts, *, rows_per_source, w_transposed,
                       x_sorted=False, out_sorted=False):
    """out[a] = x[a // rows_per_source] @ w[e(a)] for every assignment a, [A, f].

    x [R, d] source rows (tokens when rows_per_source = top_k, assignment rows when 1);
    w [E, d, f] (or [E, f, d] with w_transposed); routing tables as routing_tables_ref.
    x_sorted: x [A, d] holds the assignment rows in routing order (row p is assignment
    order[p]; rows_per_source must be 1); out_sorted: out's row p is assignment order[p].
    fp32 accumulation, output in x's dtype; rows of invalid ids are zero."""
    del tile_starts
    w = _expert_weights(w, w_transposed)
    e = w.shape[0]
    group_sizes = jnp.diff(group_starts)[:e]
    rows = x if x_sorted else jnp.take(x, order // rows_per_source, axis=0)  # SRead
    out = jax.lax.ragged_dot(rows, w, group_sizes, preferred_element_type=F32)
    out = jnp.where(jnp.arange(out.shape[0])[:, None] < group_starts[e], out, 0.0)
    if out_sorted:
        return out.astype(x.dtype)
    return jnp.zeros_like(out).at[order].set(out).astype(x.dtype)  # SWrite


def grouped_matmul_tn_ref(x, dy, order, group_starts, *, rows_per_source, num_experts, out_dtype,
                          x_sorted=False, out_sorted=False):
    """dw[e] = Σ_{a in group e} x[a // rows_per_source]ᵀ dy[a], [E, d, f] (fp32 sums); x_sorted /
    out_sorted: x's / dy's rows are in routing order (as grouped_matmul_ref)."""
    d, f = x.shape[-1], dy.shape[-1]
    w0 = jnp.zeros((num_experts, d, f), F32)
    tiles = jnp.zeros(num_experts + 2, jnp.int32)  # unused by the reference
    _, vjp = jax.vjp(lambda w: grouped_matmul_ref(x.astype(F32), w, order, group_starts, tiles,
                                                  rows_per_source=rows_per_source, w_transposed=False,
                                                  x_sorted=x_sorted, out_sorted=out_sorted), w0)
    (dw,) = vjp(dy.astype(F32))
    return dw.astype(out_dtype)


EPILOGUES = ("relu", "gelu", "swiglu", "scale")  # codes 1.. of MoeEpilogue in cuda/moe/moe_tiles.cuh


def apply_epilogue(epilogue, mm, w, extra, order, out_sorted):
    """A fused epilogue on the products mm(w) (rows in the output's layout), in fp32: relu, gelu
    (tanh approximation), swiglu (extra = (w_up,): silu(mm(w)) * mm(w_up)) or scale (extra =
    (scale,), one factor per assignment id, gathered by `order` when the rows are in routing
    order). The caller rounds to the output dtype."""
    g = mm(w).astype(F32)
    if epilogue == "relu":
        return jax.nn.relu(g)
    if epilogue == "gelu":
        return jax.nn.gelu(g, approximate=True)
    if epilogue == "swiglu":
        return jax.nn.silu(g) * mm(extra[0]).astype(F32)
    if epilogue == "scale":
        scale = extra[0].astype(F32)
        return g * (scale[order] if out_sorted else scale)[:, None]
    raise ValueError(f"unknown epilogue {epilogue!r}")


def fused_matmul_ref(x, w, *rest, epilogue, rows_per_source, x_sorted, out_sorted):
    """grouped_matmul_ref (w [E, d, f]) with a fused epilogue (apply_epilogue; rest = the
    epilogue's extra operand if any, then the routing tables): products and epilogue in fp32,
    rounded once to x's dtype, as the fused kernel."""
    *extra, order, group_starts, tile_starts = rest
    mm = lambda w_: grouped_matmul_ref(x.astype(F32), w_.astype(F32), order, group_starts, tile_starts,
                                       rows_per_source=rows_per_source, w_transposed=False, x_sorted=x_sorted,
                                       out_sorted=out_sorted)
    return apply_epilogue(epilogue, mm, w, extra, order, out_sorted).astype(x.dtype)
