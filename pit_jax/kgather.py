"""k-gather rule (PIT SRead on the reduction dim): primitives, AD/batching rules, public API.

    sparse_dense(x, w)   y = x @ w, x [..., M, K] dynamically tile-sparse, w [K, N] dense
    dense_sparse(x, w)   y = x @ w, w [K, N] dynamically tile-sparse (sparse training)

Primitives (the index arrays are operands, so one index can be reused across calls):
    pit_sparse_dense(x, w, counts, offsets, indices, bias) -> (x ⊙ M) @ w + bias
    pit_sparse_tn(x, dy, counts, offsets, indices)   -> Σ_batch (x ⊙ M)ᵀ @ dy   (dW of the above)
    pit_sparse_nt(dy, w, counts, offsets, indices)   -> (dy @ wᵀ) ⊙ M           (x's masked cotangent)

Gradients: sparse_dense is the function x @ w (the index only promises where x is zero), so
dx = dy @ wᵀ is dense and dW = xᵀ dy is computed on x's nonzero tiles only (pit_sparse_tn).
Parameter `exact`: the index was detected from this very x, so x is zero outside it and a dense
fallback may use x as it is (no masking pass). Parameter `masked_grad`: the caller keeps only
x's cotangent on its listed tiles (dense_sparse(grad="masked"), whose sparse operand is the
weight), so the transpose computes it there only (pit_sparse_nt) instead of densely. Parameter
`x_transposed`: operand 0 holds xᵀ (dense_sparse passes its weight w as it is, the sparse operand
being wᵀ), so no transposed copy is made before the kernel; tangents and cotangents of that
operand are in the same transposed layout. Parameter `y_transposed`: the primitive returns
((x ⊙ M) @ w)ᵀ [..., N, M] (dense_sparse's y, written by the kernel's epilogue instead of a
transposed copy). Operand `bias`: empty (shape (0,), no bias) or a vector along the output's last
axis, added in fp32 before the kernel's one rounding (a dense layer's bias without an elementwise
pass over y). Tangent and transpose rules bind the primitive without a bias (the bias's tangent
is a broadcast), so the transpose rule never sees one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.interpreters import ad, batching, mlir

from . import _primitive, kgather_cuda
from .detect import detect
from .kgather_reference import F32, sparse_dense_ref, sparse_nt_ref, sparse_tn_ref, sum_tn
from .tile_index import TileIndex, ceil_div, clamp_tile, is_int_pair, tile_index_from_mask

sparse_dense_p = _primitive.make_primitive("pit_sparse_dense", multiple_results=False)
sparse_tn_p = _primitive.make_primitive("pit_sparse_tn", multiple_results=False)
sparse_nt_p = _primitive.make_primitive("pit_sparse_nt", multiple_results=False)


# ---- abstract evaluation ---------------------------------------------------------------------

def _sparse_dense_abstract(x, w, counts, offsets, indices, bias, *, shape, tile, layout, exact, masked_grad,
                           x_transposed, y_transposed):
    rows = x.shape[-1] if x_transposed else x.shape[-2]
    out = (w.shape[-1], rows) if y_transposed else (rows, w.shape[-1])
    if tuple(bias.shape) not in (NO_BIAS_SHAPE, (out[-1],)):
        raise ValueError(f"pit_sparse_dense: the bias must be empty or [{out[-1]}] (the output's last dim), "
                         f"got shape {tuple(bias.shape)}")
    return jax.core.ShapedArray((*x.shape[:-2], *out), x.dtype)


def _logical(x, x_transposed):
    """The sparse operand x [..., M, K] from the buffer the primitive holds (xᵀ when x_transposed)
    (and the product [..., M, N] from the output when y_transposed: the same swap)."""
    return jnp.swapaxes(x, -1, -2) if x_transposed else x


NO_BIAS_SHAPE = (0,)


def no_bias(dtype):
    """The bias operand of a product without one."""
    return jnp.zeros(NO_BIAS_SHAPE, dtype)


def _has_bias(bias):
    return tuple(bias.shape) != NO_BIAS_SHAPE


def _sparse_nt_abstract(dy, w, counts, offsets, indices, *, shape, tile, layout):
    return jax.core.ShapedArray((*dy.shape[:-1], w.shape[0]), dy.dtype)


def _sparse_tn_abstract(x, dy, counts, offsets, indices, *, shape, tile, layout, exact, out_dtype):
    return jax.core.ShapedArray((x.shape[-1], dy.shape[-1]), out_dtype)


sparse_dense_p.def_abstract_eval(_sparse_dense_abstract)
sparse_tn_p.def_abstract_eval(_sparse_tn_abstract)
sparse_nt_p.def_abstract_eval(_sparse_nt_abstract)


# ---- lowering: jnp reference on CPU, the k-gather kernels (kgather_cuda.py) on CUDA -----------

def _ref_sparse_dense(x, w, counts, offsets, indices, bias, *, exact, masked_grad, x_transposed, y_transposed,
                      **params):
    return sparse_dense_ref(_logical(x, x_transposed), w, indices, **params, bias=bias if _has_bias(bias) else None,
                            y_transposed=y_transposed)


def _ref_sparse_tn(x, dy, counts, offsets, indices, *, exact, **params):
    return sparse_tn_ref(x, dy, indices, **params, widen=True)


def _ref_sparse_nt(dy, w, counts, offsets, indices, **params):
    return sparse_nt_ref(dy, w, indices, **params)


_primitive.register_lowerings(
    sparse_dense_p, cpu=mlir.lower_fun(_ref_sparse_dense, multiple_results=False),
    cuda=mlir.lower_fun(kgather_cuda.sparse_dense_cuda, multiple_results=False))
_primitive.register_lowerings(
    sparse_tn_p, cpu=mlir.lower_fun(_ref_sparse_tn, multiple_results=False),
    cuda=mlir.lower_fun(kgather_cuda.sparse_tn_cuda, multiple_results=False))
_primitive.register_lowerings(
    sparse_nt_p, cpu=mlir.lower_fun(_ref_sparse_nt, multiple_results=False),
    cuda=mlir.lower_fun(kgather_cuda.sparse_nt_cuda, multiple_results=False))


# ---- autodiff ----------------------------------------------------------------------------------

def _dense_matmul(a, b, out_dtype):
    return jnp.matmul(a, b, preferred_element_type=F32).astype(out_dtype)


def _dense_layer_matmul(a, b, out_dtype):
    """a @ b as a dense layer computes it. On CUDA a 16-bit product stays in its dtype (XLA's GPU
    GEMM accumulates in fp32 and rounds once, as nnx.Linear's dot). The fp32-output matmul rounded
    afterwards cost 9% more on OPT fc2 (H200, benchmarks/results/2026-11-26_session8/
    auto_dense_branch_probe_h200/), and on a tangent, which JAX transposes by itself (dx = dy @ bᵀ
    under grad), it made the transpose multiply an fp32 cotangent by b promoted to fp32: an fp32
    GEMM on the GPU (session 37 found SparseLinear's dx lowered that way). Elsewhere fp32
    accumulation is asked for (XLA:CPU's bf16 dot in jax 0.11.2 missed the float64 tolerance on a
    gradient)."""
    if jnp.dtype(a.dtype).itemsize != 2 or a.dtype != b.dtype:
        return _dense_matmul(a, b, out_dtype)
    return jax.lax.platform_dependent(a, b, cuda=lambda a, b: jnp.matmul(a, b).astype(out_dtype),
                                      default=lambda a, b: _dense_matmul(a, b, out_dtype))


def _sparse_dense_jvp(primals, tangents, **params):
    x, w, counts, offsets, indices, bias = primals
    dx, dw = tangents[:2]
    dbias = tangents[5]
    unbiased, kparams = no_bias(x.dtype), {**params, "y_transposed": False}
    if params["y_transposed"]:
        # Under differentiation the product stays in the kernel's layout and XLA transposes it (with
        # the bias): the backward needs dyᵀ, which XLA then computes in that layout with no transpose
        # of its own. With the kernel writing y, the backward's transpose of dy cost more than the
        # forward saved (dense_sparse 4096² at 95%, H200, session 38: step 537 µs of kernels against
        # 474, forward 112 against 126). So the fused layout serves inference only.
        y = _logical(sparse_dense_p.bind(x, w, counts, offsets, indices, unbiased, **kparams), True)
        if _has_bias(bias):
            y = y + bias
    else:
        y = sparse_dense_p.bind(x, w, counts, offsets, indices, bias, **params)
    dy = None
    if type(dx) is not ad.Zero and params["masked_grad"]:  # the caller keeps x's tangent on its tiles
        dy = sparse_dense_p.bind(dx, w, counts, offsets, indices, unbiased, **{**kparams, "exact": False})
    elif type(dx) is not ad.Zero:  # a tangent of x need not be zero where x is: dense
        dy = _dense_layer_matmul(_logical(dx, params["x_transposed"]), w, y.dtype)
    if type(dw) is not ad.Zero:
        t = sparse_dense_p.bind(x, dw, counts, offsets, indices, unbiased, **kparams)
        dy = t if dy is None else dy + t
    if dy is not None:  # summed in the product's layout, transposed once
        dy = _logical(dy, params["y_transposed"])
    if type(dbias) is not ad.Zero and _has_bias(bias):
        t = jnp.broadcast_to(dbias.astype(y.dtype), y.shape)
        dy = t if dy is None else dy + t
    return y, (_primitive.zero_tangent(y) if dy is None else dy)


def _sparse_dense_transpose(ct, x, w, counts, offsets, indices, bias, *, masked_grad, x_transposed, y_transposed,
                            **params):
    if type(ct) is ad.Zero:
        return [None] * 6
    if ad.is_undefined_primal(bias) or _has_bias(bias):  # the JVP binds tangents without a bias
        raise NotImplementedError("pit_sparse_dense is transposed without a bias operand")
    ct = _logical(ct, y_transposed)  # the product's layout [..., M, N]
    x_bar = w_bar = None
    if ad.is_undefined_primal(w):
        w_bar = sparse_tn_p.bind(_logical(x, x_transposed), ct, counts, offsets, indices, out_dtype=w.aval.dtype,
                                 **params)
    if ad.is_undefined_primal(x):
        if masked_grad:  # only x's listed tiles of the cotangent are kept downstream: compute only those
            params.pop("exact")
            x_bar = sparse_nt_p.bind(ct.astype(x.aval.dtype), w, counts, offsets, indices, **params)
        else:
            x_bar = _dense_matmul(ct, jnp.swapaxes(w, -1, -2), x.aval.dtype)
        x_bar = _logical(x_bar, x_transposed)  # back to the operand's layout
    return [x_bar, w_bar, None, None, None, None]


def _sparse_tn_jvp(primals, tangents, *, out_dtype, **params):
    x, dy, counts, offsets, indices = primals
    dx, ddy = tangents[:2]
    out = sparse_tn_p.bind(x, dy, counts, offsets, indices, out_dtype=out_dtype, **params)
    t = None
    if type(ddy) is not ad.Zero:
        t = sparse_tn_p.bind(x, ddy, counts, offsets, indices, out_dtype=out_dtype, **params)
    if type(dx) is not ad.Zero:
        u = sum_tn(dx, dy, out_dtype)
        t = u if t is None else t + u
    return out, (_primitive.zero_tangent(out) if t is None else t)


def _sparse_tn_transpose(ct, x, dy, counts, offsets, indices, *, out_dtype, **params):
    if type(ct) is ad.Zero:
        return [None] * 5
    x_bar = dy_bar = None
    if ad.is_undefined_primal(dy):
        dy_bar = sparse_dense_p.bind(x, ct.astype(dy.aval.dtype), counts, offsets, indices, no_bias(dy.aval.dtype),
                                     masked_grad=False, x_transposed=False, y_transposed=False, **params)
    if ad.is_undefined_primal(x):
        x_bar = _dense_matmul(dy, ct.T.astype(dy.dtype), x.aval.dtype)
    return [x_bar, dy_bar, None, None, None]


ad.primitive_jvps[sparse_dense_p] = _sparse_dense_jvp
ad.primitive_transposes[sparse_dense_p] = _sparse_dense_transpose
ad.primitive_jvps[sparse_tn_p] = _sparse_tn_jvp
ad.primitive_transposes[sparse_tn_p] = _sparse_tn_transpose


def _sparse_nt_jvp(primals, tangents, **params):
    dy, w, counts, offsets, indices = primals
    ddy, dw = tangents[:2]
    out = sparse_nt_p.bind(dy, w, counts, offsets, indices, **params)
    t = None
    if type(ddy) is not ad.Zero:
        t = sparse_nt_p.bind(ddy, w, counts, offsets, indices, **params)
    if type(dw) is not ad.Zero:
        u = sparse_nt_p.bind(dy, dw, counts, offsets, indices, **params)
        t = u if t is None else t + u
    return out, (_primitive.zero_tangent(out) if t is None else t)


def _sparse_nt_transpose(ct, dy, w, counts, offsets, indices, **params):
    # out = M ⊙ (dy wᵀ): dy_bar = (M ⊙ ct) w, w_bar = Σ_batch (M ⊙ ct)ᵀ dy (the index is not ct's own)
    if type(ct) is ad.Zero:
        return [None] * 5
    dy_bar = w_bar = None
    if ad.is_undefined_primal(dy):
        dy_bar = sparse_dense_p.bind(ct, w, counts, offsets, indices, no_bias(ct.dtype), exact=False,
                                     masked_grad=False, x_transposed=False, y_transposed=False, **params)
    if ad.is_undefined_primal(w):
        w_bar = sparse_tn_p.bind(ct, dy, counts, offsets, indices, exact=False, out_dtype=w.aval.dtype, **params)
    return [dy_bar, w_bar, None, None, None]


ad.primitive_jvps[sparse_nt_p] = _sparse_nt_jvp
ad.primitive_transposes[sparse_nt_p] = _sparse_nt_transpose


# ---- batching ----------------------------------------------------------------------------------

def _batch_rows_with_index(p, trailing=()):
    """Batching of a product whose first operand's leading dims (and the index's) are batch and
    whose second operand is one matrix (pit_sparse_dense: x and w; pit_sparse_nt: dy and w).
    `trailing`: unbatched operands bound after the index (pit_sparse_dense's bias)."""
    def rule(args, dims, **params):
        x, w, *index = args
        xd, wd, *index_dims = dims
        if wd is not None:  # a batch of weights: one product per weight
            return _primitive.map_over_batch(p, (*args, *trailing), (*dims, *[None] * len(trailing)), params)
        # the leading dims are batch already: put the mapped axis in front of x and the index
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        lead = [jnp.moveaxis(a, d, 0) if d is not None else jnp.broadcast_to(a, (size, *a.shape))
                for a, d in zip([x, *index], [xd, *index_dims])]
        return p.bind(lead[0], w, *lead[1:], *trailing, **params), 0
    return rule


def _sparse_tn_batch(args, dims, **params):
    return _primitive.map_over_batch(sparse_tn_p, args, dims, params)  # leading dims are summed: keep apart


def _sparse_dense_batch(args, dims, **params):
    """The bias is the last operand: unbatched, the rows rule; batched, one product per member
    (a kernel call each, even where x and w are shared: the bias stays in the epilogue)."""
    if dims[-1] is not None:
        return _primitive.map_over_batch(sparse_dense_p, args, dims, params)
    return _batch_rows_with_index(sparse_dense_p, trailing=(args[-1],))(args[:-1], dims[:-1], **params)


batching.primitive_batchers[sparse_dense_p] = _sparse_dense_batch
batching.primitive_batchers[sparse_nt_p] = _batch_rows_with_index(sparse_nt_p)
batching.primitive_batchers[sparse_tn_p] = _sparse_tn_batch


# ---- public API --------------------------------------------------------------------------------

def _check_operands(fn, x, w):
    _primitive.check_float_matrix(fn, "x", x)
    _primitive.check_float_matrix(fn, "w", w)
    if w.ndim != 2:
        raise ValueError(f"pit_jax.{fn}: w must be a matrix [K, N], got shape {w.shape}")
    if x.dtype != w.dtype:
        raise TypeError(f"pit_jax.{fn}: x and w must have the same dtype, got {x.dtype} and {w.dtype}")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"pit_jax.{fn}: x's last dim ({x.shape[-1]}) must equal w's first dim "
                         f"({w.shape[0]}); shapes {x.shape} and {w.shape}")


def _bias_operand(fn, bias, x, n):
    """The primitive's bias operand: the caller's bias [N] in x's dtype, checked, or an empty one."""
    if bias is None:
        return no_bias(x.dtype)
    if not hasattr(bias, "shape") or not hasattr(bias, "dtype"):
        raise TypeError(f"pit_jax.{fn}: bias must be an array [N] or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (n,):
        raise ValueError(f"pit_jax.{fn}: bias must have shape ({n},) (w's last dim), got {tuple(bias.shape)}")
    if bias.dtype != x.dtype:
        raise TypeError(f"pit_jax.{fn}: bias must have x's dtype {x.dtype}, got {bias.dtype}")
    return bias


def _resolve_tile(fn, tile, index, default):
    """`tile` as a checked pair of positive ints; None: the index's tile, else `default`."""
    if tile is None:
        return tuple(index.tile) if isinstance(index, TileIndex) else default
    if not is_int_pair(tile):
        choices = "a pair of ints or 'auto'" if fn == "sparse_dense" else "a pair of ints"
        raise TypeError(f"pit_jax.{fn}: tile must be {choices}, got {tile!r}")
    if min(tile) <= 0:
        raise ValueError(f"pit_jax.{fn}: tile sizes must be positive, got tile={tuple(tile)!r}")
    return (int(tile[0]), int(tile[1]))


def _check_index(fn, name, index, shape, tile, layout, lead):
    if not isinstance(index, TileIndex):
        raise TypeError(f"pit_jax.{fn}: {name} must be a pit_jax.TileIndex, got {type(index).__name__}")
    if tuple(index.shape) != tuple(shape) or tuple(index.tile) != tuple(tile) or index.layout != layout:
        raise ValueError(f"pit_jax.{fn}: {name} was made for shape {index.shape}, tile {index.tile}, "
                         f"layout {index.layout!r}, but this call needs shape {tuple(shape)}, tile "
                         f"{tuple(tile)}, layout {layout!r}")
    if tuple(index.counts.shape[:-1]) != tuple(lead):
        raise ValueError(f"pit_jax.{fn}: {name} has batch dims {index.counts.shape[:-1]}, "
                         f"but the sparse operand has {tuple(lead)}")
    # the kernels size their reads by these shapes: a hand-built index must match them exactly
    n_outer, n_inner = index.grid if layout == "row" else index.grid[::-1]
    want = {"counts": (*lead, n_outer), "offsets": (*lead, n_outer + 1), "indices": (*lead, n_outer, n_inner)}
    for field, field_shape in want.items():
        a = getattr(index, field)
        if not hasattr(a, "shape") or tuple(a.shape) != field_shape or a.dtype != jnp.int32:
            raise ValueError(f"pit_jax.{fn}: {name}.{field} must be int32 of shape {field_shape} for "
                             f"its shape and tile, got {getattr(a, 'dtype', type(a).__name__)}"
                             f"{tuple(getattr(a, 'shape', ()))}")


# tile="auto": 32x1 micro-tiles, and the dense matmul when more than this fraction of them is
# nonzero. Since the forward's swizzled shared-memory rows (session 30) it crosses the dense
# matmul between density 0.25 and 0.20 on 4096³ and OPT fc2 (H200, 2026-11-29, detection
# included: 0.86-0.88x dense at 0.25, 1.04-1.09x at 0.20 in two runs, 1.34-1.36x at 0.15), so the rule
# stops at 0.20 (docs/kgather.md; 0.125 before, the crossover of the older forward). Session 40
# re-checked it against one dense GEMM per call (the earlier baseline was merged by XLA): 1.06x /
# 1.20x at 0.20, 1.15x / 1.35x at 0.175 (4096³ / fc2).
AUTO_TILE = (32, 1)
AUTO_MAX_DENSITY = 0.2


def sparse_dense(x, w, *, bias=None, tile=None, index: TileIndex | None = None):
    """y = x @ w (+ bias) where x [..., M, K] is dynamically sparse in micro-tiles of `tile` = (tm, tk).

    bias: None or [N] in x's dtype, added in the kernel's epilogue (fp32, before the output is
    rounded once) rather than by a pass over y; its gradient is dy summed over the rows.

    The nonzero micro-tiles of x are detected on device (`pit_jax.detect(x, tile)`) unless a
    `TileIndex` for x (row layout) is passed as `index`; x must then be zero outside the tiles it
    lists. Differentiable in x and w: dx = dy @ wᵀ (dense), dw = xᵀ dy on x's nonzero tiles.
    tile=None (the default): 32x1 micro-tiles, or the tile `index` was made with.

    tile="auto": 32x1 micro-tiles; the kernel runs when at most AUTO_MAX_DENSITY of them are
    nonzero (the largest density over x's batch), else the dense matmul — a `lax.cond` on a
    device value (no transfer to Python; XLA's GPU runtime reads the predicate on its own
    execution thread and waits for it there, unless XLA_FLAGS enables CONDITIONAL command
    buffers: docs/kgather.md). Under `vmap` a cond becomes a select and both paths run.
    """
    auto = isinstance(tile, str)
    if auto and tile != "auto":
        raise ValueError(f"pit_jax.sparse_dense: tile must be a pair of ints or 'auto', got {tile!r}")
    if not auto:
        tile = _resolve_tile("sparse_dense", tile, index, (32, 1))
    _check_operands("sparse_dense", x, w)
    bias = _bias_operand("sparse_dense", bias, x, w.shape[1])
    if _is_empty_product(x, w):
        return _auto_dense_branch(x, w, bias)
    if auto:
        return _sparse_dense_auto(x, w, bias, index)
    return _sparse_dense_indexed(x, w, bias, tile, index, exact=index is None)


def _is_empty_product(x, w):
    """M, K or N is 0: no tile to detect (detect refuses empty dims), and x @ w (+ bias) is XLA's
    empty or all-zero product, which the dense matmul gives directly."""
    return any(isinstance(d, int) and d == 0 for d in (*x.shape[-2:], w.shape[1]))


def _sparse_dense_indexed(x, w, bias, tile, index, exact):
    """The primitive on x's row index (detected here when None); exact: x is zero outside it."""
    tile, index = _row_index_of_x(x, tile, index)
    params = dict(shape=tuple(x.shape[-2:]), tile=tuple(tile), layout="row", exact=exact, masked_grad=False,
                  x_transposed=False, y_transposed=False)
    return sparse_dense_p.bind(x, w, index.counts, index.offsets, index.indices, bias, **params)


def _row_index_of_x(x, tile, index):
    """(clamped tile, row-layout TileIndex of x): detected on device, or the caller's, checked."""
    m, k = x.shape[-2:]
    tile = clamp_tile(tile, (m, k))  # detect rejects a tile larger than a concrete dim
    if index is None:
        index = detect(jax.lax.stop_gradient(x), tile, layout="row")
    else:
        _check_index("sparse_dense", "index", index, (m, k), tile, "row", x.shape[:-2])
    return tile, index


def auto_takes_kernel(index: TileIndex):
    """tile="auto"'s choice, a device scalar: True (the kernel) when the densest member of the
    batch lists at most AUTO_MAX_DENSITY of its micro-tiles, False (the dense matmul) otherwise."""
    return jnp.max(index.density) <= AUTO_MAX_DENSITY


# tile="auto" without an index estimates the density from every AUTO_SAMPLE_STRIDE-th 32-row
# group of x (one strided read of 1/8 of x) and detects only in the kernel branch, so the dense
# branch pays no detection (OPT fc2 at 0% sparsity: auto cost 1.24x dense with detection first).
AUTO_SAMPLE_STRIDE = 8


def auto_sampled_density(x):
    """Estimated fraction of nonzero 32x1 micro-tiles of x [..., M, K] (its densest batch
    member), from every AUTO_SAMPLE_STRIDE-th group of 32 rows (at least the first group)."""
    tm = AUTO_TILE[0]
    *lead, m, k = x.shape
    if isinstance(m, int):  # whole groups only (a slice, no copy), or the one partial group
        groups = max(m // tm, 1)
        rows = x[..., : groups * tm, :] if m >= tm else x
    else:  # symbolic M (jax.export): the same groups; zero rows complete a first group shorter than tm
        groups = jax.core.max_dim(m // tm, 1)
        rows = jnp.pad(x, [(0, 0)] * len(lead) + [(0, ceil_div(m, tm) * tm - m), (0, 0)])[..., : groups * tm, :]
    grouped = rows.reshape(*lead, groups, -1, k)[..., ::AUTO_SAMPLE_STRIDE, :, :]
    nonzero_tiles = jnp.any(grouped != 0, axis=-2)
    per_member = jnp.mean(nonzero_tiles.astype(jnp.float32), axis=(-2, -1))
    return jnp.max(per_member)


def _auto_dense_branch(x, w, bias):
    y = _dense_layer_matmul(x, w, x.dtype)  # exactly what a dense caller runs
    return y + bias if _has_bias(bias) else y


def _sparse_dense_auto(x, w, bias, index):
    """tile="auto" on checked operands (bias: the primitive's operand)."""
    if index is not None:  # the caller's index gives the exact density
        tile, index = _row_index_of_x(x, AUTO_TILE, index)
        takes_kernel = auto_takes_kernel(index)
        kernel = lambda x, w, b: _sparse_dense_indexed(x, w, b, tile, index, False)
    else:  # sampled estimate; the kernel branch detects
        takes_kernel = auto_sampled_density(jax.lax.stop_gradient(x)) <= AUTO_MAX_DENSITY
        kernel = lambda x, w, b: _sparse_dense_indexed(x, w, b, AUTO_TILE, None, True)
    return jax.lax.cond(takes_kernel, kernel, _auto_dense_branch, x, w, bias)


@jax.custom_jvp
def _mask_tangent(w, mask):
    return w


@_mask_tangent.defjvp
def _mask_tangent_jvp(primals, tangents):
    w, mask = primals
    dw, _ = tangents
    return w, jnp.where(mask, dw, jnp.zeros((), dw.dtype))


def dense_sparse(x, w, *, bias=None, tile=None, index: TileIndex | None = None, grad: str = "masked"):
    """y = x @ w (+ bias) where the weight w [K, N] is dynamically sparse in micro-tiles `tile` = (tk, tn).

    bias: None or [N] in x's dtype. Without differentiation it is added in the kernel's epilogue
    (fp32, one rounding), which also writes y in its layout (the kernels compute yᵀ = wᵀ xᵀ; no
    transposed copy of it is made). Under jvp/grad the kernel writes yᵀ and XLA transposes it and
    adds the bias after the product's rounding (as an unfused dense layer does): the backward
    then gets dyᵀ without a transpose of its own, which measured faster (docs/kgather.md).

    grad="masked" (PIT sparse training): pruned weights (outside w's nonzero tiles) get zero
    gradient, as if y = x @ (w ⊙ M) with the mask M held constant. grad="dense": the exact
    gradient of x @ w. dx = dy @ (w ⊙ M)ᵀ either way. tile=None (the default): 1x32 micro-tiles,
    or the tile `index` was made with. (tile="auto" is sparse_dense's only.)
    """
    if isinstance(tile, str):
        raise ValueError(f"pit_jax.dense_sparse: tile must be a pair of ints (tile='auto' is sparse_dense's "
                         f"only), got {tile!r}")
    tile = _resolve_tile("dense_sparse", tile, index, (1, 32))
    _check_operands("dense_sparse", x, w)
    bias = _bias_operand("dense_sparse", bias, x, w.shape[1])
    if grad not in ("masked", "dense"):
        raise ValueError(f"pit_jax.dense_sparse: grad must be 'masked' or 'dense', got {grad!r}")
    if _is_empty_product(x, w):
        return _auto_dense_branch(x, w, bias)
    k, n = w.shape
    tile = clamp_tile(tile, (k, n))
    exact = index is None
    if index is None:
        index = detect(jax.lax.stop_gradient(w), tile, layout="row")
    else:
        _check_index("dense_sparse", "index", index, (k, n), tile, "row", ())
    if grad == "masked":
        w = _mask_tangent(w, jax.lax.stop_gradient(index.element_mask()))
    # y = x @ w  <=>  yᵀ = wᵀ xᵀ: the sparse operand goes first, its index transposed. w itself is
    # the operand (x_transposed): the kernels read wᵀ's packed columns straight from w's rows, and
    # write y, not yᵀ (y_transposed), with the bias along its last axis.
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    idx_t = _transpose_index(index)
    # grad="masked": w's cotangent is kept on its listed tiles only, so only those are computed
    params = dict(shape=(n, k), tile=(tile[1], tile[0]), layout="row", exact=exact, masked_grad=grad == "masked",
                  x_transposed=True, y_transposed=True)
    y = sparse_dense_p.bind(w, x2.T, idx_t.counts, idx_t.offsets, idx_t.indices, bias, **params)
    return y.reshape(*lead, n)


def _transpose_index(index: TileIndex) -> TileIndex:
    """The index of the transposed matrix (row layout), rebuilt from the tile mask on device."""
    (m, k), (tm, tk) = index.shape, index.tile
    return tile_index_from_mask(jnp.swapaxes(index.to_mask(), -1, -2), (k, m), (tk, tm), "row")
