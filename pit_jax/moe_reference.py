"""jnp references of the MoE m-gather/scatter rule (the CPU path, and the check for kernels).

Dropless routing by a stable sort, grouped matmuls through `jax.lax.ragged_dot`, scatter back
to assignment order. Materialises the permuted rows, which the PIT kernels will avoid.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


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


def grouped_matmul_ref(x, w, expert_ids, *, rows_per_source):
    """out[a] = x[a // rows_per_source] @ w[expert_ids[a]] for every assignment a, [A, f].

    x [R, d] source rows (tokens when rows_per_source = top_k, assignment rows when 1);
    w [E, d, f]; expert_ids [A] int. fp32 accumulation, output in x's dtype; rows of invalid
    ids are zero."""
    order, group_sizes = route(expert_ids, w.shape[0])
    rows = jnp.take(x, order // rows_per_source, axis=0)  # SRead
    out = jax.lax.ragged_dot(rows, w, group_sizes, preferred_element_type=F32)
    out = jnp.where(jnp.arange(out.shape[0])[:, None] < jnp.sum(group_sizes), out, 0.0)
    return jnp.zeros_like(out).at[order].set(out).astype(x.dtype)  # SWrite


def grouped_matmul_tn_ref(x, dy, expert_ids, *, rows_per_source, num_experts, out_dtype):
    """dw[e] = Σ_{a: expert_ids[a] = e} x[a // rows_per_source]ᵀ dy[a], [E, d, f] (fp32 sums)."""
    d, f = x.shape[-1], dy.shape[-1]
    w0 = jnp.zeros((num_experts, d, f), x.dtype)
    _, vjp = jax.vjp(lambda w: grouped_matmul_ref(x.astype(F32), w.astype(F32), expert_ids,
                                                  rows_per_source=rows_per_source), w0)
    (dw,) = vjp(dy.astype(F32))
    return dw.astype(out_dtype)
