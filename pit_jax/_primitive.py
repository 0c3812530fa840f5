"""Helpers shared by every pit_jax primitive: per-platform lowering, batching, AD of indices."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from . import _ext


FLOAT_DTYPES = ("bfloat16", "float16", "float32")


def check_float_matrix(fn: str, name: str, a) -> None:
    """Trace-time check of an operand [..., rows, cols] in a supported float dtype."""
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"pit_jax.{fn}: {name} must be an array, got {type(a).__name__}")
    if a.ndim < 2:
        raise ValueError(f"pit_jax.{fn}: {name} must have rank >= 2 ([..., M, K]), got shape {a.shape}")
    if str(a.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"pit_jax.{fn}: {name} must be bfloat16, float16 or float32, got {a.dtype}")


def make_primitive(name: str, multiple_results: bool = True) -> Primitive:
    p = Primitive(name)
    p.multiple_results = multiple_results
    p.def_impl(lambda *args, **params: jax.jit(lambda *a: p.bind(*a, **params))(*args))
    return p


def register_lowerings(p: Primitive, *, cpu: Callable, cuda: Callable) -> None:
    """CPU lowering (the C++ handler) and CUDA lowering, which fails loudly without kernels."""
    mlir.register_lowering(p, cpu, platform="cpu")

    def cuda_checked(ctx, *args, **params):
        _ext.require_cuda(p.name)
        return cuda(ctx, *args, **params)

    mlir.register_lowering(p, cuda_checked, platform="cuda")


def batch_at_front(p: Primitive) -> None:
    """Batching for primitives that treat every leading dimension as batch."""

    def rule(args, dims, **params):
        args = [jnp.moveaxis(a, d, 0) if d is not None else a
                for a, d in zip(args, dims)]
        out = p.bind(*args, **params)
        return out, [0] * len(out) if p.multiple_results else 0

    batching.primitive_batchers[p] = rule


def zero_tangent(primal_out) -> ad.Zero:
    """A symbolic zero tangent for an output value."""
    return ad.Zero(primal_out.aval.to_tangent_aval())


def integer_outputs_jvp(p: Primitive) -> None:
    """Outputs are integer indices: their tangents are symbolic zeros (float0), so gradients
    flow through the ops that consume the index, never into it."""

    def jvp(primals, tangents, **params):
        out = p.bind(*primals, **params)
        return out, [zero_tangent(o) for o in out]

    ad.primitive_jvps[p] = jvp


def map_over_batch(p: Primitive, args, dims, params):
    """Batching by a loop: move each batched operand's axis to the front (broadcast the rest)
    and map the primitive over it. For rules whose leading dims already mean something else."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    moved = tuple(jnp.moveaxis(a, d, 0) if d is not None else jnp.broadcast_to(a, (size, *a.shape))
                  for a, d in zip(args, dims))
    out = jax.lax.map(lambda xs: p.bind(*xs, **params), moved)
    return out, ([0] * len(out) if p.multiple_results else 0)
