"""MoE m-gather/scatter rule (PIT SRead rows by token, SWrite rows by assignment): primitives,
AD and batching rules, public `moe_matmul`.

    moe_matmul(x, w, expert_ids) -> out [T, k, f],  out[t, s] = x[t] @ w[expert_ids[t, s]]

Primitives (expert ids are an operand; routing happens inside, on device, no host sync):
    pit_moe_matmul(x, w, ids)      out[a] = x[a // r] @ w[ids[a]]          (r rows per source row)
    pit_moe_matmul_tn(x, dy, ids)  dw[e] = Σ_{ids[a] = e} x[a // r]ᵀ dy[a]   (dW of the above)
Lowered to the jnp reference (lax.ragged_dot) on every platform until the PIT kernels are
checked on a GPU; on GPU that is said once with a RuntimeWarning. The forward kernel exists
and the dW kernel exist (moe_cuda.py, opt-in with PIT_EXPERIMENTAL_MOE_KERNELS=1).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.interpreters import ad, batching

from . import _primitive, moe_cuda
from .moe_reference import F32, grouped_matmul_ref, grouped_matmul_tn_ref, route

moe_matmul_p = _primitive.make_primitive("pit_moe_matmul", multiple_results=False)
moe_matmul_tn_p = _primitive.make_primitive("pit_moe_matmul_tn", multiple_results=False)


def _mm_abstract(x, w, ids, *, rows_per_source):
    return jax.core.ShapedArray((ids.shape[0], w.shape[-1]), x.dtype)


def _tn_abstract(x, dy, ids, *, rows_per_source, num_experts, out_dtype):
    return jax.core.ShapedArray((num_experts, x.shape[-1], dy.shape[-1]), out_dtype)


moe_matmul_p.def_abstract_eval(_mm_abstract)
moe_matmul_tn_p.def_abstract_eval(_tn_abstract)

_primitive.register_reference_lowerings(moe_matmul_p, grouped_matmul_ref, "moe_matmul",
                                        experimental_kernel=(moe_cuda.enabled, moe_cuda.moe_matmul_cuda))
_primitive.register_reference_lowerings(moe_matmul_tn_p, grouped_matmul_tn_ref, "moe_matmul_tn",
                                        experimental_kernel=(moe_cuda.enabled, moe_cuda.moe_matmul_tn_cuda))


def _sum_slots(rows, n_sources, dtype):
    """[A, d] per-assignment rows -> [R, d] per source row (sum over its r assignments)."""
    return rows.astype(F32).reshape(n_sources, -1, rows.shape[-1]).sum(1).astype(dtype)


def _mm_jvp(primals, tangents, *, rows_per_source):
    x, w, ids = primals
    dx, dw, _ = tangents
    out = moe_matmul_p.bind(x, w, ids, rows_per_source=rows_per_source)
    t = None
    if type(dx) is not ad.Zero:
        t = moe_matmul_p.bind(dx, w, ids, rows_per_source=rows_per_source)
    if type(dw) is not ad.Zero:
        u = moe_matmul_p.bind(x, dw, ids, rows_per_source=rows_per_source)
        t = u if t is None else t + u
    return out, (_primitive.zero_tangent(out) if t is None else t)


def _mm_transpose(ct, x, w, ids, *, rows_per_source):
    if type(ct) is ad.Zero:
        return [None, None, None]
    x_bar = w_bar = None
    if ad.is_undefined_primal(x):  # x̄[t] = Σ_s ct[t*r+s] @ w[ids]ᵀ
        wt = jnp.swapaxes(w, -1, -2)
        rows = moe_matmul_p.bind(ct, wt, ids, rows_per_source=1)
        x_bar = _sum_slots(rows, x.aval.shape[0], x.aval.dtype)
    if ad.is_undefined_primal(w):
        w_bar = moe_matmul_tn_p.bind(x, ct, ids, rows_per_source=rows_per_source,
                                     num_experts=w.aval.shape[0], out_dtype=w.aval.dtype)
    return [x_bar, w_bar, None]


def _tn_jvp(primals, tangents, **params):
    x, dy, ids = primals
    dx, ddy, _ = tangents
    out = moe_matmul_tn_p.bind(x, dy, ids, **params)
    t = None
    if type(dx) is not ad.Zero:
        t = moe_matmul_tn_p.bind(dx, dy, ids, **params)
    if type(ddy) is not ad.Zero:
        u = moe_matmul_tn_p.bind(x, ddy, ids, **params)
        t = u if t is None else t + u
    return out, (_primitive.zero_tangent(out) if t is None else t)


def _tn_transpose(ct, x, dy, ids, *, rows_per_source, num_experts, out_dtype):
    if type(ct) is ad.Zero:
        return [None, None, None]
    x_bar = dy_bar = None
    if ad.is_undefined_primal(dy):  # dȳ[a] = x[a // r] @ ct[ids[a]]
        dy_bar = moe_matmul_p.bind(x, ct.astype(x.dtype), ids, rows_per_source=rows_per_source)
        dy_bar = dy_bar.astype(dy.aval.dtype)
    if ad.is_undefined_primal(x):  # x̄[t] = Σ_s dy[t*r+s] @ ct[ids]ᵀ
        rows = moe_matmul_p.bind(dy, jnp.swapaxes(ct, -1, -2).astype(dy.dtype), ids, rows_per_source=1)
        x_bar = _sum_slots(rows, x.aval.shape[0], x.aval.dtype)
    return [x_bar, dy_bar, None]


ad.primitive_jvps[moe_matmul_p] = _mm_jvp
ad.primitive_transposes[moe_matmul_p] = _mm_transpose
ad.primitive_jvps[moe_matmul_tn_p] = _tn_jvp
ad.primitive_transposes[moe_matmul_tn_p] = _tn_transpose


def _batch_rule(p):
    return lambda args, dims, **params: _primitive.map_over_batch(p, args, dims, params)


# each batch element routes its own tokens: one grouped matmul each
batching.primitive_batchers[moe_matmul_p] = _batch_rule(moe_matmul_p)
batching.primitive_batchers[moe_matmul_tn_p] = _batch_rule(moe_matmul_tn_p)


def moe_matmul(x, w, expert_ids):
    """Grouped expert matmul with on-device routing, dropless.

    x: [T, d] token rows (each is multiplied by each of its k experts) or [T, k, d] rows that
      are already per assignment (e.g. the hidden activations before a down-projection).
    w: [E, d, f] expert weights, same dtype as x (bfloat16, float16 or float32).
    expert_ids: [T, k] integer expert of each (token, slot); ids outside [0, E) are dropped
      (their output rows are zero) — data-dependent, so not checked at trace time.
    Returns [T, k, f], out[t, s] = x[t] @ w[expert_ids[t, s]] (or x[t, s] @ ...), fp32 accumulation.
    """
    _primitive.check_float_matrix("moe_matmul", "x", x)
    if not hasattr(w, "ndim") or w.ndim != 3:
        raise ValueError(f"pit_jax.moe_matmul: w must be [E, d, f], got shape {getattr(w, 'shape', w)}")
    if w.dtype != x.dtype:
        raise TypeError(f"pit_jax.moe_matmul: x and w must have the same dtype, got {x.dtype} and {w.dtype}")
    if not hasattr(expert_ids, "ndim") or expert_ids.ndim != 2 or not jnp.issubdtype(expert_ids.dtype, jnp.integer):
        raise TypeError(f"pit_jax.moe_matmul: expert_ids must be an integer [T, k] array, got "
                        f"{getattr(expert_ids, 'dtype', type(expert_ids).__name__)} "
                        f"{getattr(expert_ids, 'shape', '')}")
    t, k = expert_ids.shape
    if x.ndim == 2 and x.shape[0] == t:
        rows, r = x, k
    elif x.ndim == 3 and x.shape[:2] == (t, k):
        rows, r = x.reshape(t * k, x.shape[-1]), 1
    else:
        raise ValueError(f"pit_jax.moe_matmul: x must be [T, d] or [T, k, d] with (T, k) = {(t, k)} "
                         f"from expert_ids, got shape {x.shape}")
    if rows.shape[-1] != w.shape[1]:
        raise ValueError(f"pit_jax.moe_matmul: x's last dim ({rows.shape[-1]}) must equal w's d "
                         f"({w.shape[1]}); w has shape {w.shape}")
    out = moe_matmul_p.bind(rows, w, expert_ids.reshape(-1).astype(jnp.int32), rows_per_source=r)
    return out.reshape(t, k, w.shape[-1])


def drop_over_capacity(expert_ids, num_experts: int, capacity_factor: float):
    """Switch/flaxformer-style capacity: each expert keeps at most
    C = ceil(capacity_factor · T·k / E) assignments, first come (token order, then slot) first
    served; the rest get id -1, which `moe_matmul` drops (zero rows).

    Returns (expert_ids with drops, number of dropped assignments) — all on device."""
    if not (isinstance(capacity_factor, (int, float)) and capacity_factor > 0):
        raise ValueError(f"pit_jax.drop_over_capacity: capacity_factor must be > 0, got {capacity_factor!r}")
    flat = expert_ids.reshape(-1).astype(jnp.int32)
    capacity = -(-int(capacity_factor * flat.size) // num_experts)  # ceil, static
    valid = (flat >= 0) & (flat < num_experts)
    order, sizes = route(flat, num_experts)  # stable: token order kept within each expert
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(sizes)]).astype(jnp.int32)
    key = jnp.where(valid, flat, num_experts)[order]
    rank_sorted = jnp.arange(flat.size, dtype=jnp.int32) - starts[key]  # position within its expert
    rank = jnp.zeros(flat.size, jnp.int32).at[order].set(rank_sorted)
    keep = valid & (rank < capacity)
    dropped = jnp.sum(valid & ~keep)
    return jnp.where(keep, flat, -1).reshape(expert_ids.shape), dropped
