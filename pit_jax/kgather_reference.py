"""jnp references of the k-gather rule (the CPU path, and the check for the CUDA kernels).

The index is an acceleration structure: `x` must be zero outside the micro-tiles it lists, so
(x ⊙ M) @ w == x @ w. The references apply M explicitly so that results do not depend on x's
values outside the listed tiles, exactly as a kernel that never reads them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .tile_index import element_mask_from_indices

F32 = jnp.float32


def masked_to_index(x, indices, shape, tile, layout):
    """x with every element outside the index's listed micro-tiles set to zero."""
    return jnp.where(element_mask_from_indices(indices, shape, tile, layout), x, jnp.zeros((), x.dtype))


def sparse_dense_ref(x, w, indices, *, shape, tile, layout, bias=None, y_transposed=False):
    """y[..., M, N] = (x ⊙ M) @ w, or its transpose [..., N, M] (y_transposed), plus `bias` along
    the last axis; fp32 accumulation, one rounding to x's dtype."""
    xm = masked_to_index(x, indices, shape, tile, layout)
    y = f32_matmul(xm, w)
    if bias is not None:  # along the output's last axis: the product's rows when transposed
        y = y + (bias.astype(F32)[:, None] if y_transposed else bias.astype(F32))
    # rounded before the transpose: XLA:CPU folded a transpose of the fp32 product into a bf16 x
    # bf16 = f32 dot that its runtime does not implement (jax 0.11.2, under vmap of dense_sparse)
    y = y.astype(x.dtype)
    return jnp.swapaxes(y, -1, -2) if y_transposed else y


def sparse_tn_ref(x, dy, indices, *, shape, tile, layout, out_dtype, widen=False):
    """dw[K, N] = Σ_batch (x ⊙ M)ᵀ @ dy over every leading dim, fp32 accumulation. widen: the CPU
    path's product (f32_matmul); without it a 16-bit product with an fp32 result, which the CUDA
    lowering's dense dW keeps a 16-bit GEMM."""
    return sum_tn(masked_to_index(x, indices, shape, tile, layout), dy, out_dtype, widen)


def sparse_nt_ref(dy, w, indices, *, shape, tile, layout):
    """out[..., M, K] = (dy @ wᵀ) ⊙ M: x's masked cotangent, fp32 accumulation, in dy's dtype."""
    full = f32_matmul(dy, jnp.swapaxes(w, -1, -2)).astype(dy.dtype)
    return masked_to_index(full, indices, shape, tile, layout)


def sum_tn(a, b, out_dtype, widen=False):
    """Σ over leading dims of aᵀ b, for a [..., M, K], b [..., M, N], fp32 accumulation (widen: as
    sparse_tn_ref's)."""
    a, b = a.reshape(-1, a.shape[-1]).T, b.reshape(-1, b.shape[-1])
    product = f32_matmul(a, b) if widen else jnp.matmul(a, b, preferred_element_type=F32)
    return product.astype(out_dtype)


def f32_matmul(a, b):
    """a @ b accumulated in fp32 for the CPU path, 16-bit operands widened first (exact). The
    widened operands pass an optimization barrier: XLA:CPU folds a widening into the dot, and its
    runtime has no bf16 x bf16 = f32 dot in every layout (dense_sparse called outside jit failed
    with "Unsupported element type for DotThunk::Execute", jax 0.11.2)."""
    if a.dtype == F32 and b.dtype == F32:
        return jnp.matmul(a, b)
    a, b = jax.lax.optimization_barrier((a.astype(F32), b.astype(F32)))
    return jnp.matmul(a, b)
