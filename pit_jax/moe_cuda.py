"""CUDA lowerings of the MoE primitives onto cuda/moe/: the routing kernel (moe_route_cuda.cu,
count -> scan -> scatter, a stable counting sort of the assignments by expert, invalid ids last
as pseudo-group E) and the grouped GEMMs (moe_cuda.cu: forward, with a wgmma kernel on Hopper,
and dW). Checked against the jnp references by tests/test_moe_kernels.py on a GPU."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from . import _ext
from .moe_reference import EPILOGUES, TILE_ROWS, apply_epilogue

ROUTE_CHUNK = 256  # kChunk in moe_route_cuda.cu
MAX_EXPERTS = 8191  # kMaxBins - 1


def check_experts(num_experts):
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"pit_jax.moe_matmul: the CUDA kernels support up to {MAX_EXPERTS} experts, "
                         f"got {num_experts}")


def routing_tables_cuda(expert_ids, *, num_experts):
    """(order [A], group_starts [E + 2], tile_starts [E + 2]), as routing_tables_ref."""
    a = expert_ids.shape[0]
    i32 = jnp.int32
    chunks = -(-a // ROUTE_CHUNK)
    outs = (jax.ShapeDtypeStruct((a,), i32), jax.ShapeDtypeStruct((num_experts + 2,), i32),
            jax.ShapeDtypeStruct((num_experts + 2,), i32),
            jax.ShapeDtypeStruct(((num_experts + 1) * chunks,), i32))  # scratch
    order, group_starts, tile_starts, _ = jax.ffi.ffi_call("pit_moe_route", outs)(
        expert_ids.astype(i32), num_experts=np.int64(num_experts), tile_rows=np.int64(TILE_ROWS))
    return order, group_starts, tile_starts


# The staged forward's default: at least this many rows per expert on average (compute-bound
# shapes; Mixtral has about 1024, the Qwen-like shape 128 — see docs/moe.md "Staged forward").
# Either output layout: since session 21 the GEMM's epilogue scatters the product rows itself.
STAGED_MIN_ROWS_PER_EXPERT = 512
_STAGED_ARGS_BYTES_PER_EXPERT = 256  # kMoeStagedArgsBytesPerExpert, moe_staged_layout.h (per problem)
_STAGED_CUTLASS_BYTES = 1 << 20      # kMoeStagedCutlassBytes
_STAGED_SPLIT_ROWS = 4096            # kMoeStagedSplitRows: problems = E + (A - 1) // this


def _align256(n: int) -> int:
    return -(-n // 256) * 256


def staged_workspace_bytes(num_experts, assignments, d, f, itemsize, x_sorted, out_sorted) -> int:
    """Bytes of a staged call's workspace result (moe_staged_layout.h, the same sections); the
    forward passes out_sorted=True (its epilogue writes the product in place), dW whether dy is
    in routing order."""
    problems = num_experts + max(assignments - 1, 0) // _STAGED_SPLIT_ROWS
    total = _align256(problems * _STAGED_ARGS_BYTES_PER_EXPERT) + _STAGED_CUTLASS_BYTES
    total += 0 if x_sorted else _align256(assignments * d * itemsize)
    total += 0 if out_sorted else _align256(assignments * f * itemsize)
    return total


def _staged_chosen(switch, dtype, d, f, assignments, num_experts) -> bool:
    """The staged kernels' rule, shared by the forward and dW: only where they can serve (built with
    CUTLASS, and where the Hopper kernels serve: fused_epilogue_applies); there the switch's "1"
    forces them, "0" turns them off, and by default they take problems with at least
    STAGED_MIN_ROWS_PER_EXPERT rows per expert on average."""
    mode = os.environ.get(switch, "auto")
    if mode == "0" or not _ext.build_info().get("moe_staged") or not fused_epilogue_applies(dtype, d, f):
        return False
    return mode == "1" or assignments >= STAGED_MIN_ROWS_PER_EXPERT * num_experts


def staged_applies(dtype, d, f, assignments, num_experts, out_sorted) -> bool:
    """Whether pit_moe_matmul lowers to the staged forward (x's rows gathered into routing order,
    CUTLASS's Hopper grouped GEMM whose epilogue writes each product row to its place, in either
    output layout): _staged_chosen under PIT_MOE_STAGED (docs/moe.md, "Staged forward", "Scatter
    epilogue"). Decided when lowering. out_sorted is kept for callers; the rule no longer depends
    on it."""
    del out_sorted
    return _staged_chosen("PIT_MOE_STAGED", dtype, d, f, assignments, num_experts)


def grouped_matmul_cuda(x, w, order, group_starts, tile_starts, *, rows_per_source, w_transposed,
                        x_sorted=False, out_sorted=False):
    f = w.shape[1] if w_transposed else w.shape[2]
    out_type = jax.ShapeDtypeStruct((order.shape[0], f), x.dtype)
    e, a, d = w.shape[0], order.shape[0], x.shape[1]
    if staged_applies(x.dtype, d, f, a, e, out_sorted):
        ws = jax.ShapeDtypeStruct(
            (staged_workspace_bytes(e, a, d, f, jnp.dtype(x.dtype).itemsize, x_sorted, True),), jnp.uint8)
        out, _ = jax.ffi.ffi_call("pit_moe_matmul_staged", (out_type, ws))(
            x, w, order, group_starts, rows_per_source=np.int64(rows_per_source), w_transposed=bool(w_transposed),
            x_sorted=bool(x_sorted), out_sorted=bool(out_sorted))
        return out
    return jax.ffi.ffi_call("pit_moe_matmul", out_type)(
        x, w, order, group_starts, tile_starts, rows_per_source=np.int64(rows_per_source),
        tile_rows=np.int64(TILE_ROWS), w_transposed=bool(w_transposed), x_sorted=bool(x_sorted),
        out_sorted=bool(out_sorted))


def staged_dw_applies(dtype, d, f, assignments, num_experts) -> bool:
    """Whether pit_moe_matmul_tn (dW) lowers to the staged dW (x's and dy's rows gathered into
    routing order where they are not, then CUTLASS's grouped GEMM dw[e] = x_eᵀ dy_e):
    _staged_chosen under PIT_MOE_STAGED_DW. Decided when lowering."""
    return _staged_chosen("PIT_MOE_STAGED_DW", dtype, d, f, assignments, num_experts)


def grouped_matmul_tn_cuda(x, dy, order, group_starts, *, rows_per_source, num_experts, out_dtype,
                           x_sorted=False, out_sorted=False):
    out_type = jax.ShapeDtypeStruct((num_experts, x.shape[-1], dy.shape[-1]), x.dtype)
    d, f, a = x.shape[-1], dy.shape[-1], order.shape[0]
    if staged_dw_applies(x.dtype, d, f, a, num_experts):
        ws = jax.ShapeDtypeStruct(
            (staged_workspace_bytes(num_experts, a, d, f, jnp.dtype(x.dtype).itemsize, x_sorted, out_sorted),),
            jnp.uint8)
        dw, _ = jax.ffi.ffi_call("pit_moe_matmul_tn_staged", (out_type, ws))(
            x, dy.astype(x.dtype), order, group_starts, rows_per_source=np.int64(rows_per_source),
            x_sorted=bool(x_sorted), out_sorted=bool(out_sorted))
        return dw.astype(out_dtype)
    dw = jax.ffi.ffi_call("pit_moe_matmul_tn", out_type)(
        x, dy.astype(x.dtype), order, group_starts, rows_per_source=np.int64(rows_per_source),
        x_sorted=bool(x_sorted), out_sorted=bool(out_sorted))
    return dw.astype(out_dtype)


def fused_epilogue_applies(dtype, d, f) -> bool:
    """Whether the fused-epilogue kernel serves: the Hopper path (bf16/fp16, d and f multiples
    of 8, a compute capability 9.x GPU here, PIT_DISABLE_WGMMA unset). Decided when lowering."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) or d % 8 or f % 8:
        return False
    if os.environ.get("PIT_DISABLE_WGMMA") == "1":
        return False
    try:
        cc = str(getattr(jax.devices("gpu")[0], "compute_capability", ""))
    except RuntimeError:  # lowering for CUDA on a machine without a GPU
        return False
    return cc.startswith("9.")


def fused_matmul_cuda(x, w, *rest, epilogue, rows_per_source, x_sorted, out_sorted):
    """grouped matmul + epilogue (moe_reference.apply_epilogue): one fused kernel on Hopper (also
    where the staged forward takes the plain matmul: its grouped matmuls plus the epilogue in XLA
    measured no faster, docs/moe.md); elsewhere the grouped matmuls and the epilogue in XLA (the same values up to the rounding
    of the products to x's dtype)."""
    *extra, order, group_starts, tile_starts = rest
    f = w.shape[2]
    if fused_epilogue_applies(x.dtype, x.shape[1], f):
        out_type = jax.ShapeDtypeStruct((order.shape[0], f), x.dtype)
        w_up = extra[0] if epilogue == "swiglu" else w  # placeholders where the epilogue has no such operand
        scale = extra[0] if epilogue == "scale" else jnp.zeros((1,), jnp.float32)
        return jax.ffi.ffi_call("pit_moe_fused", out_type)(
            x, w, w_up, scale, order, group_starts, tile_starts, rows_per_source=np.int64(rows_per_source),
            tile_rows=np.int64(TILE_ROWS), epilogue=np.int64(EPILOGUES.index(epilogue) + 1),
            x_sorted=bool(x_sorted), out_sorted=bool(out_sorted))
    mm = lambda w_: grouped_matmul_cuda(x, w_, order, group_starts, tile_starts, rows_per_source=rows_per_source,
                                        w_transposed=False, x_sorted=x_sorted, out_sorted=out_sorted)
    return apply_epilogue(epilogue, mm, w, extra, order, out_sorted).astype(x.dtype)
