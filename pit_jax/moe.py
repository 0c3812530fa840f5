"""MoE m-gather/scatter rule (PIT SRead rows by token, SWrite rows by assignment): primitives,
AD and batching rules, public `moe_routing` and `moe_matmul`.

    moe_matmul(x, w, expert_ids) -> out [T, k, f],  out[t, s] = x[t] @ w[expert_ids[t, s]]

Primitives (no host sync anywhere; the routing tables stay on device):
    pit_moe_route(ids)                     -> order, group_starts, tile_starts   (routing index)
    pit_moe_matmul(x, w, order, gs, ts)    out[a] = x[a // r] @ w[e(a)]   (or @ w[e(a)]ᵀ)
    pit_moe_matmul_tn(x, dy, order, gs)    dw[e] = Σ_{a in e} x[a // r]ᵀ dy[a]   (dW of the above)
    pit_moe_fused(x, w, *extra, order, gs, ts)  pit_moe_matmul with a fused epilogue: relu, gelu,
                                           swiglu (extra = w_up: silu(x @ w) * (x @ w_up)) or scale
                                           (extra = the combine weight of each assignment); its
                                           JVP is the unfused matmuls and jnp epilogue
Both grouped matmuls take x_sorted / out_sorted: x's (and out's or dy's) rows may be in routing
order instead (row p is assignment order[p]) — a layer keeps its intermediate activations that
way, so only its two ends gather and scatter (SRead of the tokens, SWrite of the outputs) and
the rows between them are contiguous per expert.
CPU lowers to the jnp references (moe_reference.py, lax.ragged_dot); CUDA to the kernels of
cuda/moe/ (moe_cuda.py). The routing tables are operands, so a layer routes once and its
forward, dx and dW passes all reuse them.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import export as jax_export
from jax.interpreters import ad, batching, mlir

from . import _primitive, moe_cuda
from ._checks import is_positive_int, is_positive_real
from .pruning import ceil_snapped
from .moe_reference import (EPILOGUES, F32, apply_epilogue, fused_matmul_ref, grouped_matmul_ref, grouped_matmul_tn_ref,
                            routing_tables_ref, tile_starts_of)

moe_route_p = _primitive.make_primitive("pit_moe_route", multiple_results=True)
moe_matmul_p = _primitive.make_primitive("pit_moe_matmul", multiple_results=False)
moe_matmul_tn_p = _primitive.make_primitive("pit_moe_matmul_tn", multiple_results=False)
moe_fused_p = _primitive.make_primitive("pit_moe_fused", multiple_results=False)


def _route_abstract(ids, *, num_experts):
    i32 = jnp.int32
    return (jax.core.ShapedArray(ids.shape, i32), jax.core.ShapedArray((num_experts + 2,), i32),
            jax.core.ShapedArray((num_experts + 2,), i32))


def _mm_abstract(x, w, order, group_starts, tile_starts, *, rows_per_source, w_transposed, x_sorted, out_sorted):
    f = w.shape[1] if w_transposed else w.shape[2]
    return jax.core.ShapedArray((order.shape[0], f), x.dtype)


def _tn_abstract(x, dy, order, group_starts, *, rows_per_source, num_experts, out_dtype, x_sorted, out_sorted):
    return jax.core.ShapedArray((num_experts, x.shape[-1], dy.shape[-1]), out_dtype)


moe_route_p.def_abstract_eval(_route_abstract)
moe_matmul_p.def_abstract_eval(_mm_abstract)
moe_matmul_tn_p.def_abstract_eval(_tn_abstract)
moe_fused_p.def_abstract_eval(
    lambda x, w, *rest, **params: jax.core.ShapedArray((rest[-3].shape[0], w.shape[2]), x.dtype))


def _register(p, reference, kernel, check=None):
    """CPU: the jnp reference; CUDA: the kernel (a clear error where none was built)."""
    def cuda(*args, **params):
        if check is not None:
            check(params)
        return kernel(*args, **params)
    _primitive.register_lowerings(
        p, cpu=mlir.lower_fun(reference, multiple_results=p.multiple_results),
        cuda=mlir.lower_fun(cuda, multiple_results=p.multiple_results))


_register(moe_route_p, routing_tables_ref, moe_cuda.routing_tables_cuda,
          lambda params: moe_cuda.check_experts(params["num_experts"]))
_register(moe_matmul_p, grouped_matmul_ref, moe_cuda.grouped_matmul_cuda)
_register(moe_matmul_tn_p, grouped_matmul_tn_ref, moe_cuda.grouped_matmul_tn_cuda)
_register(moe_fused_p, fused_matmul_ref, moe_cuda.fused_matmul_cuda)
_primitive.integer_outputs_jvp(moe_route_p)


def _sum_slots(rows, n_sources, dtype):
    """[A, d] per-assignment rows -> [R, d] per source row (sum over its r assignments)."""
    return rows.astype(F32).reshape(n_sources, -1, rows.shape[-1]).sum(1).astype(dtype)


def _mm_jvp(primals, tangents, **params):
    x, w, *tables = primals
    dx, dw = tangents[:2]
    out = moe_matmul_p.bind(x, w, *tables, **params)
    t = None
    if type(dx) is not ad.Zero:
        t = moe_matmul_p.bind(dx, w, *tables, **params)
    if type(dw) is not ad.Zero:
        u = moe_matmul_p.bind(x, dw, *tables, **params)
        t = u if t is None else t + u
    return out, (_primitive.zero_tangent(out) if t is None else t)


def _mm_transpose(ct, x, w, order, group_starts, tile_starts, *, rows_per_source, w_transposed, x_sorted,
                  out_sorted):
    if type(ct) is ad.Zero:
        return [None] * 5
    x_bar = w_bar = None
    if ad.is_undefined_primal(x):  # x̄[t] = Σ_s ct[t*r+s] @ w[e]ᵀ: the same weights, transposed read
        rows = moe_matmul_p.bind(ct, w, order, group_starts, tile_starts, rows_per_source=1,
                                 w_transposed=not w_transposed, x_sorted=out_sorted, out_sorted=x_sorted)
        x_bar = rows if x_sorted else _sum_slots(rows, x.aval.shape[0], x.aval.dtype)
    if ad.is_undefined_primal(w):
        e = w.aval.shape[0]
        w_bar = moe_matmul_tn_p.bind(x, ct, order, group_starts, rows_per_source=rows_per_source,
                                     num_experts=e, out_dtype=w.aval.dtype, x_sorted=x_sorted,
                                     out_sorted=out_sorted)
        if w_transposed:  # w was [E, f, d]
            w_bar = jnp.swapaxes(w_bar, -1, -2)
    return [x_bar, w_bar, None, None, None]


def _tn_jvp(primals, tangents, **params):
    x, dy, *tables = primals
    dx, ddy = tangents[:2]
    out = moe_matmul_tn_p.bind(x, dy, *tables, **params)
    t = None
    if type(dx) is not ad.Zero:
        t = moe_matmul_tn_p.bind(dx, dy, *tables, **params)
    if type(ddy) is not ad.Zero:
        u = moe_matmul_tn_p.bind(x, ddy, *tables, **params)
        t = u if t is None else t + u
    return out, (_primitive.zero_tangent(out) if t is None else t)


def _tn_transpose(ct, x, dy, order, group_starts, *, rows_per_source, num_experts, out_dtype, x_sorted,
                  out_sorted):
    if type(ct) is ad.Zero:
        return [None] * 4
    x_bar = dy_bar = None
    # the matmul primitive wants tile offsets too: rebuild them from the group offsets (small)
    tables = (order, group_starts, tile_starts_of(group_starts))
    if ad.is_undefined_primal(dy):  # dȳ[a] = x[a // r] @ ct[e(a)]
        dy_bar = moe_matmul_p.bind(x, ct.astype(x.dtype), *tables, rows_per_source=rows_per_source,
                                   w_transposed=False, x_sorted=x_sorted,
                                   out_sorted=out_sorted).astype(dy.aval.dtype)
    if ad.is_undefined_primal(x):  # x̄[t] = Σ_s dy[t*r+s] @ ct[e]ᵀ
        rows = moe_matmul_p.bind(dy, ct.astype(dy.dtype), *tables, rows_per_source=1, w_transposed=True,
                                 x_sorted=out_sorted, out_sorted=x_sorted)
        x_bar = rows.astype(x.aval.dtype) if x_sorted else _sum_slots(rows, x.aval.shape[0], x.aval.dtype)
    return [x_bar, dy_bar, None, None]


def _fused_jvp(primals, tangents, *, epilogue, rows_per_source, x_sorted, out_sorted):
    """The unfused computation (grouped matmuls, then the epilogue in jnp) and its tangent:
    under differentiation the products are what the backward needs, so nothing is fused there."""
    *operands, order, group_starts, tile_starts = primals
    tables = (order, group_starts, tile_starts)

    def unfused(x, w, *extra):
        mm = lambda w_: moe_matmul_p.bind(x, w_, *tables, rows_per_source=rows_per_source, w_transposed=False,
                                          x_sorted=x_sorted, out_sorted=out_sorted)
        return apply_epilogue(epilogue, mm, w, extra, order, out_sorted).astype(x.dtype)

    return jax.jvp(unfused, tuple(operands), tuple(ad.instantiate_zeros(t) for t in tangents[:len(operands)]))


ad.primitive_jvps[moe_matmul_p] = _mm_jvp
ad.primitive_jvps[moe_fused_p] = _fused_jvp
ad.primitive_transposes[moe_matmul_p] = _mm_transpose
ad.primitive_jvps[moe_matmul_tn_p] = _tn_jvp
ad.primitive_transposes[moe_matmul_tn_p] = _tn_transpose


def _batch_rule(p):
    return lambda args, dims, **params: _primitive.map_over_batch(p, args, dims, params)


# each batch element routes its own tokens: one routing / grouped matmul each
for _p in (moe_route_p, moe_matmul_p, moe_matmul_tn_p, moe_fused_p):
    batching.primitive_batchers[_p] = _batch_rule(_p)


class MoeRouting(NamedTuple):
    """Routing index of T·k assignments over E experts, on device (a pytree: pass it through
    jit, vmap and grad). order [A]: assignment ids grouped by expert, token order kept inside
    a group; group_starts [E + 2]: offsets of groups 0..E, group E holding ids outside [0, E);
    tile_starts [E + 2]: prefix sum of each group's 128-row tiles (the kernels' work list)."""
    order: jax.Array
    group_starts: jax.Array
    tile_starts: jax.Array

    @property
    def num_experts(self) -> int:
        return self.group_starts.shape[-1] - 2

    def group_sizes(self) -> jax.Array:
        """Assignments per expert, [E]."""
        return jnp.diff(self.group_starts)[..., :self.num_experts]

    def dropped_count(self) -> jax.Array:
        """Assignments whose expert id lies outside [0, E): `moe_matmul` drops them (zero output
        rows, no gradient). A device scalar (per batch element under vmap); no host sync."""
        return jnp.diff(self.group_starts)[..., self.num_experts]


# an exported function may take or return a MoeRouting (jax.export serializes its pytree)
jax_export.register_namedtuple_serialization(MoeRouting, serialized_name="pit_jax.MoeRouting")


def _check_ids(fn, expert_ids):
    if not hasattr(expert_ids, "ndim") or expert_ids.ndim != 2 or not jnp.issubdtype(expert_ids.dtype, jnp.integer):
        raise TypeError(f"pit_jax.{fn}: expert_ids must be an integer [T, k] array, got "
                        f"{getattr(expert_ids, 'dtype', type(expert_ids).__name__)} "
                        f"{getattr(expert_ids, 'shape', '')}")


def moe_routing(expert_ids, num_experts: int) -> MoeRouting:
    """Routing index of top-k expert ids [T, k] (count -> scan -> scatter on GPU, a stable sort
    on CPU), dropless: capacity is T·k. Build it once per layer and pass it to every
    `moe_matmul` of the layer (`routing=`); ids outside [0, num_experts) are dropped."""
    _check_ids("moe_routing", expert_ids)
    if not is_positive_int(num_experts):
        raise ValueError(f"pit_jax.moe_routing: num_experts must be a positive int, got {num_experts!r}")
    return MoeRouting(*moe_route_p.bind(expert_ids.reshape(-1).astype(jnp.int32), num_experts=int(num_experts)))


def moe_matmul(x, w, expert_ids, *, routing: MoeRouting | None = None):
    """Grouped expert matmul with on-device routing, dropless.

    x: [T, d] token rows (each is multiplied by each of its k experts) or [T, k, d] rows that
      are already per assignment (e.g. the hidden activations before a down-projection).
    w: [E, d, f] expert weights, same dtype as x (bfloat16, float16 or float32).
    expert_ids: [T, k] integer expert of each (token, slot); ids outside [0, E) are dropped
      (their output rows are zero) — data-dependent, so not checked at trace time.
    routing: `moe_routing(expert_ids, E)` when the caller already built it (a layer with
      several matmuls over the same ids); built here otherwise.
    Returns [T, k, f], out[t, s] = x[t] @ w[expert_ids[t, s]] (or x[t, s] @ ...), fp32 accumulation.
    """
    rows, r, routing = checked_operands(x, w, expert_ids, routing)
    out = moe_matmul_p.bind(rows, w, *routing, rows_per_source=r, w_transposed=False, x_sorted=False,
                            out_sorted=False)
    return out.reshape(*expert_ids.shape, w.shape[-1])


def _check_x_and_w(fn, x, w):
    """x a float array, w [E, d, f] of x's dtype (the checks every grouped-matmul entry shares)."""
    _primitive.check_float_matrix(fn, "x", x)
    if not hasattr(w, "ndim") or w.ndim != 3:
        raise ValueError(f"pit_jax.{fn}: w must be [E, d, f], got shape {getattr(w, 'shape', w)}")
    if w.dtype != x.dtype:
        raise TypeError(f"pit_jax.{fn}: x and w must have the same dtype, got {x.dtype} and {w.dtype}")


def _check_routing_type(fn, routing):
    if not isinstance(routing, MoeRouting):
        raise TypeError(f"pit_jax.{fn}: routing must be a MoeRouting from pit_jax.moe_routing, "
                        f"got {type(routing).__name__}")


def checked_operands(x, w, expert_ids, routing):
    """moe_matmul's argument checks: (x as [R, d] rows, rows per source r, the routing index —
    built when None); a clear error naming the argument otherwise."""
    _check_x_and_w("moe_matmul", x, w)
    _check_ids("moe_matmul", expert_ids)
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
    if routing is None:
        return rows, r, moe_routing(expert_ids, w.shape[0])
    _check_routing_type("moe_matmul", routing)
    if routing.num_experts != w.shape[0] or routing.order.shape != (t * k,):
        raise ValueError(f"pit_jax.moe_matmul: routing was built for {routing.order.shape[0]} assignments "
                         f"over {routing.num_experts} experts; these expert_ids have {t * k} and w has "
                         f"{w.shape[0]} experts")
    return rows, r, routing


def check_layout_operands(fn, x, w, routing, rows_per_source, x_sorted):
    """Trace-time checks of grouped_matmul's / fused_matmul's operands, naming the argument."""
    _check_x_and_w(fn, x, w)
    if x.ndim != 2:
        raise ValueError(f"pit_jax.{fn}: x must be [rows, d], got shape {x.shape}")
    _check_routing_type(fn, routing)
    a = routing.order.shape[0]
    if w.shape[0] != routing.num_experts or w.shape[1] != x.shape[1]:
        raise ValueError(f"pit_jax.{fn}: w must be [E={routing.num_experts}, d={x.shape[1]}, f] for this routing "
                         f"and x, got shape {w.shape}")
    if not is_positive_int(rows_per_source):
        raise ValueError(f"pit_jax.{fn}: rows_per_source must be a positive int, got {rows_per_source!r}")
    if x_sorted and (rows_per_source != 1 or x.shape[0] != a):
        raise ValueError(f"pit_jax.{fn}: x in routing order (x_sorted) must have one row per assignment "
                         f"({a}) and rows_per_source=1, got {x.shape[0]} rows and {rows_per_source}")
    if not x_sorted and x.shape[0] * rows_per_source != a:
        raise ValueError(f"pit_jax.{fn}: x's {x.shape[0]} rows × rows_per_source={rows_per_source} must equal "
                         f"the routing's {a} assignments")


def grouped_matmul(x, w, routing: MoeRouting, *, rows_per_source: int, x_sorted: bool, out_sorted: bool):
    """The grouped matmul primitive on rows laid out either way. x: [A // rows_per_source, d]
    source rows in assignment order, or [A, d] in routing order (x_sorted); returns [A, f] in
    assignment order, or in routing order (out_sorted: row p belongs to assignment
    routing.order[p])."""
    check_layout_operands("moe.grouped_matmul", x, w, routing, rows_per_source, x_sorted)
    return moe_matmul_p.bind(x, w, *routing, rows_per_source=rows_per_source, w_transposed=False,
                             x_sorted=x_sorted, out_sorted=out_sorted)


def fused_matmul(x, w, routing: MoeRouting, *, epilogue: str, rows_per_source: int, x_sorted: bool,
                 out_sorted: bool, w_up=None, scale=None):
    """`grouped_matmul` with a fused epilogue, applied to the fp32 products and rounded once:
      "relu" / "gelu" (tanh approximation, jax.nn.gelu's default): the activation of x @ w[e];
      "swiglu": silu(x @ w[e]) * (x @ w_up[e]) (w is the gate);
      "scale": (x @ w[e]) * scale[a], scale [A] the top-k combine weight of each assignment a
      (by assignment id, whatever the row layout).
    One kernel on the Hopper path (bf16/fp16, d and f multiples of 8); elsewhere the grouped
    matmuls and the epilogue in XLA (the products rounded to x's dtype first). Differentiating
    it runs the unfused matmuls, whose products the backward needs."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"pit_jax.moe.fused_matmul: epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    check_layout_operands("moe.fused_matmul", x, w, routing, rows_per_source, x_sorted)
    extra = ()
    if epilogue == "swiglu":
        if w_up is None or w_up.shape != w.shape or w_up.dtype != w.dtype:
            raise ValueError(f"pit_jax.moe.fused_matmul: swiglu needs w_up with w's shape {w.shape} and dtype "
                             f"{w.dtype}, got {None if w_up is None else (w_up.shape, w_up.dtype)}")
        extra = (w_up,)
    elif epilogue == "scale":
        if scale is None or scale.shape != routing.order.shape:
            raise ValueError(f"pit_jax.moe.fused_matmul: scale must be [A] = {routing.order.shape}, one factor "
                             f"per assignment, got {None if scale is None else scale.shape}")
        extra = (scale.astype(F32),)
    return moe_fused_p.bind(x, w, *extra, *routing, epilogue=epilogue, rows_per_source=rows_per_source,
                            x_sorted=x_sorted, out_sorted=out_sorted)


def swiglu_matmul(x, w_gate, w_up, routing: MoeRouting, *, rows_per_source: int, x_sorted: bool,
                  out_sorted: bool):
    """silu(x @ w_gate[e]) * (x @ w_up[e]) per assignment: `fused_matmul(epilogue="swiglu")`."""
    return fused_matmul(x, w_gate, routing, epilogue="swiglu", rows_per_source=rows_per_source, x_sorted=x_sorted,
                        out_sorted=out_sorted, w_up=w_up)


def _capacity(capacity_factor, assignments, num_experts):
    """ceil(capacity_factor · assignments / num_experts): a Python int (rounded to 9 decimals
    first: 1.1 · 10 is 11, not 12), or, for jax.export's symbolic token count, a device value in
    float32 with products within 1e-6 (relative) of an integer taken as that integer."""
    if isinstance(assignments, int):
        return math.ceil(round(capacity_factor * assignments / num_experts, 9))
    p = jnp.float32(capacity_factor) * jnp.asarray(assignments, jnp.float32) / num_experts
    return ceil_snapped(p).astype(jnp.int32)


def drop_over_capacity(expert_ids, num_experts: int, capacity_factor: float, *, priority=None):
    """Capacity dropping: each expert keeps at most C = ceil(capacity_factor · T·k / E)
    assignments of `expert_ids` [..., k] (T = the product of the leading dims; flaxformer's
    capacity differs: round(c·T/E) per group of tokens, at least its min_expert_capacity). All of
    the call's tokens form one group (one per sequence under vmap). Priority goes slot by slot, as
    in flaxformer: every token's first choice before any token's second choice. Within a slot, tokens go in token order, or, with
    `priority` (one score per token, shape expert_ids.shape[:-1], e.g. its top router
    probability), highest score first with ties in token order: V-MoE's batch-prioritised
    routing (flaxformer's `batch_prioritized_routing`). The rest get id -1, which `moe_matmul`
    drops (zero rows).

    Returns (expert_ids with drops, number of dropped assignments) — all on device. Ids outside
    [0, E) are dropped by `moe_matmul` too but are not counted here (see
    `MoeRouting.dropped_count`)."""
    if (not hasattr(expert_ids, "ndim") or expert_ids.ndim == 0 or not jnp.issubdtype(expert_ids.dtype, jnp.integer)
            or (expert_ids.ndim >= 2 and expert_ids.shape[-1] == 0)):
        raise TypeError(f"pit_jax.drop_over_capacity: expert_ids must be an integer [..., k] array with k >= 1, got "
                        f"{getattr(expert_ids, 'dtype', type(expert_ids).__name__)} {getattr(expert_ids, 'shape', '')}")
    if not is_positive_int(num_experts):
        raise ValueError(f"pit_jax.drop_over_capacity: num_experts must be a positive int, got {num_experts!r}")
    if not is_positive_real(capacity_factor):
        raise ValueError(f"pit_jax.drop_over_capacity: capacity_factor must be > 0, got {capacity_factor!r}")
    k = expert_ids.shape[-1] if expert_ids.ndim >= 2 else 1
    token_shape = expert_ids.shape[:-1] if expert_ids.ndim >= 2 else expert_ids.shape
    by_token = expert_ids.reshape(-1, k).astype(jnp.int32)  # [T, k]
    if priority is not None:
        priority = jnp.asarray(priority)
        if priority.shape != token_shape or not jnp.issubdtype(priority.dtype, jnp.number):
            raise ValueError(f"pit_jax.drop_over_capacity: priority must be numbers of shape {token_shape} (one score "
                             f"per token of expert_ids {expert_ids.shape}), got {priority.dtype}{priority.shape}")
        # tokens by descending score; a stable sort keeps token order among equal scores
        token_order = jnp.argsort(-priority.reshape(-1).astype(jnp.float32), stable=True)
        by_token = by_token[token_order]
    by_slot = by_token.T.reshape(-1)  # slot-major priority order
    capacity = _capacity(capacity_factor, by_slot.size, num_experts)
    valid = (by_slot >= 0) & (by_slot < num_experts)
    order, starts, _ = moe_route_p.bind(by_slot, num_experts=num_experts)  # stable: priority order kept
    key = jnp.where(valid, by_slot, num_experts)[order]
    rank_sorted = jnp.arange(by_slot.size, dtype=jnp.int32) - starts[key]  # position within its expert
    rank = jnp.zeros(by_slot.size, jnp.int32).at[order].set(rank_sorted)
    keep = valid & (rank < capacity)
    dropped = jnp.sum(valid & ~keep)
    kept = jnp.where(keep, by_slot, -1).reshape(k, -1).T
    if priority is not None:
        kept = jnp.zeros_like(kept).at[token_order].set(kept)  # back to token order
    return kept.reshape(expert_ids.shape), dropped
