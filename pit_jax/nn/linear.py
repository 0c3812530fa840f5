"""flax.nnx linear layers on the k-gather rule: `SparseLinear` (the input is dynamically
sparse, e.g. ReLU outputs) and `PrunedLinear` (the weight is magnitude-pruned by micro-tile at
every call, PIT-style sparse training).

Both keep `nnx.Linear`'s parameters (`kernel` [in, out], `bias` [out]), initialisers and dtype
rules, so a checkpoint of one loads into the other. Leading dims of the input are flattened into
rows before the sparse matmul: 32-row groups then span sequences, which leaves fewer partial
groups than one group set per sequence (same values).
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from flax import nnx

from .._checks import is_positive_int
from ..kgather import dense_sparse, sparse_dense
from ..pruning import check_tile_and_density, tile_magnitude_mask
from ..tile_index import expand_tile_mask, tile_index_from_mask

_default_kernel_init = nnx.initializers.lecun_normal()
_default_bias_init = nnx.initializers.zeros_init()


def _check_features(cls, in_features, out_features):
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if not is_positive_int(v):
            raise ValueError(f"pit_jax.nn.{cls}: {name} must be a positive int, got {v!r}")


class _TileSparseLinear(nnx.Module):
    """nnx.Linear's parameters and dtype handling; subclasses supply the matmul."""
    _name = "_TileSparseLinear"

    def __init__(self, in_features, out_features, *, use_bias, dtype, param_dtype, kernel_init, bias_init, rngs):
        _check_features(self._name, in_features, out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else nnx.data(None)
        self.in_features, self.out_features, self.use_bias = in_features, out_features, use_bias
        self.dtype, self.param_dtype = dtype, param_dtype

    def _operands(self, x):
        if not hasattr(x, "shape") or len(x.shape) < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"pit_jax.nn.{self._name}: x's last dim must be in_features={self.in_features}, got "
                             f"shape {tuple(getattr(x, 'shape', ()))}")
        kernel = self.kernel[...]
        dtype = self.dtype if self.dtype is not None else jnp.result_type(x, kernel)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"pit_jax.nn.{self._name}: the computation dtype must be floating point, got {dtype} "
                            f"(x {x.dtype}, kernel {kernel.dtype})")
        return jnp.asarray(x, dtype).reshape(-1, self.in_features), kernel, dtype

    def _bias(self, dtype):
        """The bias in the computation dtype, or None; the ops add it in their kernel's epilogue
        (before the one rounding of the output), not in a pass over y (dense_sparse under
        differentiation: XLA adds it with its transpose of yᵀ, see dense_sparse)."""
        return None if self.bias is None else self.bias[...].astype(dtype)

    def _finish(self, y, x_shape):
        return y.reshape(*x_shape[:-1], self.out_features)


class SparseLinear(_TileSparseLinear):
    """`y = x @ kernel + bias` through `pit_jax.sparse_dense`: the zero micro-tiles of `x` are skipped.

    For inputs that are sparse at run time, such as ReLU outputs feeding an FFN's second layer.
    `tile`: `sparse_dense`'s micro-tile of the flattened input [rows, in_features]; None (32x1),
    a pair (tm, tk), or "auto" (the dense matmul when more than 20% of the 32x1 tiles are
    nonzero, decided on device; see the README for what that costs). The kernels beat the dense
    matmul only at high tile sparsity (docs/kgather.md); at 50% they take about twice as long.
    """
    _name = "SparseLinear"

    def __init__(self, in_features: int, out_features: int, *, tile=None, use_bias: bool = True, dtype=None,
                 param_dtype=jnp.float32, kernel_init=_default_kernel_init, bias_init=_default_bias_init,
                 rngs: nnx.Rngs):
        if not (tile is None or (isinstance(tile, str) and tile == "auto") or (
                hasattr(tile, "__len__") and not isinstance(tile, str) and len(tile) == 2 and all(
                    isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in tile))):
            raise ValueError(f"pit_jax.nn.SparseLinear: tile must be None, 'auto' or a pair of positive ints "
                             f"(tm, tk), got {tile!r}")
        super().__init__(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                         kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
        self.tile = tile if isinstance(tile, str) or tile is None else tuple(tile)

    def __call__(self, x: jax.Array) -> jax.Array:
        rows, kernel, dtype = self._operands(x)
        return self._finish(sparse_dense(rows, kernel.astype(dtype), bias=self._bias(dtype), tile=self.tile), x.shape)


GRADS = ("masked", "dense")


class PrunedLinear(_TileSparseLinear):
    """A linear layer whose kernel is magnitude-pruned by micro-tile at every call (sparse training).

    Each call keeps the `density` fraction of the kernel's (tk, tn) tiles with the largest L2 norms
    (`pit_jax.tile_magnitude_mask`, from the current weights, on device) and multiplies through
    `pit_jax.dense_sparse`, which skips the pruned tiles. `density`: a Python float (a compile-time
    constant; assigning another recompiles), or a float scalar array, kept as data so that a
    schedule assigns new arrays under jit without recompiling. `grad`:
      - "masked" (PIT's sparse-training semantics): pruned weights get zero gradient;
      - "dense": every weight gets the gradient of the dense product (xᵀ·dy), a straight-through
        estimator, so pruned weights can grow back into the mask (as RigL- or Top-KAST-style
        training wants); the forward is the same.
    """
    _name = "PrunedLinear"

    def __init__(self, in_features: int, out_features: int, *, density, tile=(1, 32), grad: str = "masked",
                 use_bias: bool = True, dtype=None, param_dtype=jnp.float32, kernel_init=_default_kernel_init,
                 bias_init=_default_bias_init, rngs: nnx.Rngs):
        if grad not in GRADS:
            raise ValueError(f"pit_jax.nn.PrunedLinear: grad must be one of {GRADS}, got {grad!r}")
        check_tile_and_density("nn.PrunedLinear", tile, density)
        super().__init__(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                         kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
        self.tile, self.grad = tuple(int(t) for t in tile), grad
        # a Python number is static (changing it recompiles); an array is data (a schedule under jit)
        self.density = density if isinstance(density, numbers.Real) else nnx.data(jnp.asarray(density, jnp.float32))

    def mask(self) -> jax.Array:
        """The boolean [in, out] mask the next call applies (from the current kernel)."""
        return tile_magnitude_mask(self.kernel[...], self.tile, self.density)

    def __call__(self, x: jax.Array) -> jax.Array:
        rows, kernel, dtype = self._operands(x)
        k, n = kernel.shape
        tile = (min(self.tile[0], k), min(self.tile[1], n))
        keep_tiles = tile_magnitude_mask(kernel, self.tile, self.density, tiles=True)
        keep = expand_tile_mask(keep_tiles, (k, n), tile)
        if self.grad == "dense":  # forward: the pruned kernel; gradient: identity to every weight
            w = kernel - jax.lax.stop_gradient(jnp.where(keep, jnp.zeros((), kernel.dtype), kernel))
        else:
            w = jnp.where(keep, kernel, jnp.zeros((), kernel.dtype))
        # The index is the mask's, not detected from w's values: a kept tile that is zero (a zero
        # init, or small weights rounded to zero in `dtype`) still gets its gradient. It is built
        # from the tile mask itself (no pass over an expanded [K, N] mask).
        index = tile_index_from_mask(keep_tiles, (k, n), tile, "row")
        y = dense_sparse(rows, w.astype(dtype), bias=self._bias(dtype), index=index, grad=self.grad)
        return self._finish(y, x.shape)


def SparseLinearLinen(**kwargs):
    """SparseLinear as a Linen module (flax's nnx->linen bridge); SparseLinear's arguments, no rngs."""
    from flax.nnx import bridge
    return bridge.to_linen(SparseLinear, **kwargs)


def PrunedLinearLinen(**kwargs):
    """PrunedLinear as a Linen module (flax's nnx->linen bridge); PrunedLinear's arguments, no rngs."""
    from flax.nnx import bridge
    return bridge.to_linen(PrunedLinear, **kwargs)
