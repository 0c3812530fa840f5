"""pit_jax.nn.SparseLinear / PrunedLinear and the tile-magnitude pruning functions: values against
float64 numpy, gradients against nnx.Linear's, masks against a numpy ranking of tile norms, odd
shapes, leading dims, jit, vmap, traced densities, optax, Linen, and trace-time errors."""
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import pit_jax
import pit_jax.nn
from helpers import stable_seed


def relu_input(seed, shape, dtype=np.float32, shift=1.0):
    """ReLU(N(0,1) - shift): about 84% zeros at shift 1, never all zero."""
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_normal(shape) - shift, 0.0)
    x.reshape(-1)[0] = 1.5  # at least one nonzero
    return x.astype(dtype)


def linear64(x, kernel, bias):
    y = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)
    return y if bias is None else y + np.asarray(bias, np.float64)


def numpy_tile_mask(w, tile, density):
    """Keep the ceil(density * tiles) tiles of largest L2 norm (edge tiles: their own elements)."""
    w = np.asarray(w, np.float64)
    k, n = w.shape
    tk, tn = min(tile[0], k), min(tile[1], n)
    bk, bn = -(-k // tk), -(-n // tn)
    norms = np.zeros((bk, bn))
    for i in range(bk):
        for j in range(bn):
            norms[i, j] = np.sqrt(np.sum(w[i * tk:(i + 1) * tk, j * tn:(j + 1) * tn] ** 2))
    keep_n = min(max(math.ceil(Fraction(str(density)) * bk * bn), 1), bk * bn)  # exact decimal arithmetic
    cut = np.sort(norms.reshape(-1))[::-1][keep_n - 1]
    keep = norms >= cut
    return np.repeat(np.repeat(keep, tk, 0), tn, 1)[:k, :n]


# ---- SparseLinear -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(70,), (37, 70), (3, 37, 70), (2, 1, 5, 70), (2, 1100, 72)])
@pytest.mark.parametrize("tile", [None, (16, 4), "auto"])
def test_sparse_linear_matches_float64(backend, shape, tile):
    k, n = shape[-1], 45
    layer = pit_jax.nn.SparseLinear(k, n, tile=tile, rngs=nnx.Rngs(stable_seed(shape, tile)))
    layer.bias[...] = jnp.asarray(np.random.default_rng(1).standard_normal(n), jnp.float32)
    x = relu_input(stable_seed("x", shape), shape)
    y = nnx.jit(lambda m, x: m(x))(layer, jnp.asarray(x))
    assert y.shape == (*shape[:-1], n) and y.dtype == jnp.float32
    want = linear64(x, layer.kernel[...], layer.bias[...])
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_sparse_linear_half_precision(backend, dtype):
    layer = pit_jax.nn.SparseLinear(64, 40, dtype=dtype, rngs=nnx.Rngs(3))
    x = relu_input(7, (2, 50, 64))
    y = layer(jnp.asarray(x))
    assert y.dtype == dtype
    xq = np.asarray(jnp.asarray(x, dtype), np.float64)
    kq = np.asarray(layer.kernel[...].astype(dtype), np.float64)
    want = linear64(xq, kq, np.asarray(layer.bias[...].astype(dtype), np.float64))
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=2e-2, atol=2e-2)


def test_sparse_linear_all_zero_and_dense_inputs(backend):
    layer = pit_jax.nn.SparseLinear(33, 17, rngs=nnx.Rngs(0))
    layer.bias[...] = jnp.arange(17, dtype=jnp.float32)
    zeros = jnp.zeros((40, 33))
    np.testing.assert_array_equal(np.asarray(layer(zeros)), np.broadcast_to(np.arange(17.0), (40, 17)))
    dense = np.random.default_rng(2).standard_normal((40, 33)).astype(np.float32)  # no zero tile
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(dense)), np.float64),
                               linear64(dense, layer.kernel[...], layer.bias[...]), rtol=1e-5, atol=1e-5)


def test_sparse_linear_gradients_match_nnx_linear(backend):
    sparse = pit_jax.nn.SparseLinear(48, 30, rngs=nnx.Rngs(5))
    dense = nnx.Linear(48, 30, rngs=nnx.Rngs(5))  # same initialisers and key order: same parameters
    np.testing.assert_array_equal(np.asarray(sparse.kernel[...]), np.asarray(dense.kernel[...]))
    dense.bias[...] = sparse.bias[...] = jnp.linspace(-1, 1, 30)
    x = jnp.asarray(relu_input(11, (3, 21, 48)))
    loss = lambda m, x: jnp.sum(jnp.sin(m(x)))
    gs, gxs = nnx.grad(loss, argnums=(0, 1))(sparse, x)
    gd, gxd = nnx.grad(loss, argnums=(0, 1))(dense, x)
    for a, b in ((gs.kernel[...], gd.kernel[...]), (gs.bias[...], gd.bias[...]), (gxs, gxd)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_sparse_linear_under_vmap(backend):
    layer = pit_jax.nn.SparseLinear(24, 10, use_bias=False, rngs=nnx.Rngs(0))
    x = jnp.asarray(relu_input(4, (5, 9, 24)))
    y = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(layer, x)
    np.testing.assert_allclose(np.asarray(y, np.float64), linear64(x, layer.kernel[...], None), rtol=1e-5, atol=1e-5)


def test_sparse_linear_exports_with_a_symbolic_batch(backend):
    """SparseLinear folds leading dims into sparse_dense's row count: exported for cpu and cuda
    with symbolic (batch, sequence) dims, the serialized call matches float64 at several sizes."""
    from jax import export
    layer = pit_jax.nn.SparseLinear(40, 24, rngs=nnx.Rngs(2))
    graph, state = nnx.split(layer)
    b, s = export.symbolic_shape("b, s")
    targets = ("pit_detect", "pit_sparse_dense", "pit_sparse_dense_detect")
    exp = export.export(jax.jit(lambda x: nnx.merge(graph, state)(x)), platforms=("cpu", "cuda"),
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(t) for t in targets])(
        jax.ShapeDtypeStruct((b, s, 40), jnp.float32))
    loaded = export.deserialize(exp.serialize())
    for seed, shape in enumerate(((1, 1, 40), (3, 13, 40), (2, 50, 40))):
        x = relu_input(seed, shape)
        y = loaded.call(x)
        assert y.shape == (*shape[:-1], 24)
        np.testing.assert_allclose(np.asarray(y, np.float64), linear64(x, layer.kernel[...], layer.bias[...]),
                                   rtol=1e-5, atol=1e-5)


# ---- PrunedLinear and the pruning functions ---------------------------------------------------------

@pytest.mark.parametrize("wshape, tile", [((70, 45), (1, 8)), ((64, 96), (1, 32)), ((33, 20), (4, 3)),
                                          ((10, 7), (16, 64)), ((128, 64), (8, 8))])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.71, 1.0])
def test_tile_magnitude_mask_keeps_largest_tiles(wshape, tile, density):
    w = np.random.default_rng(stable_seed(wshape, tile)).standard_normal(wshape).astype(np.float32)
    mask = jax.jit(pit_jax.tile_magnitude_mask, static_argnums=(1,))(w, tile, density)
    assert mask.dtype == jnp.bool_ and mask.shape == wshape
    np.testing.assert_array_equal(np.asarray(mask), numpy_tile_mask(w, tile, density))
    pruned = pit_jax.prune_tiles_by_magnitude(w, tile, density)
    np.testing.assert_array_equal(np.asarray(pruned), np.where(np.asarray(mask), w, 0))


def test_traced_density_changes_the_mask_without_retracing():
    w = np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32)
    traces = []

    @jax.jit
    def kept(w, density):
        traces.append(1)
        return jnp.sum(pit_jax.tile_magnitude_mask(w, (1, 8), density))

    counts = [int(kept(w, jnp.float32(d))) for d in (0.1, 0.5, 1.0, 0.0, 2.0)]
    assert len(traces) == 1
    assert counts == [int(numpy_tile_mask(w, (1, 8), d).sum()) for d in (0.1, 0.5, 1.0)] + [8, 40 * 64]


@pytest.mark.parametrize("grad", ["masked", "dense"])
@pytest.mark.parametrize("tile", [(1, 32), (2, 8)])
def test_pruned_linear_values_and_gradients(backend, grad, tile):
    layer = pit_jax.nn.PrunedLinear(50, 70, density=0.25, tile=tile, grad=grad, rngs=nnx.Rngs(9))
    layer.bias[...] = jnp.linspace(0, 1, 70)
    x = np.random.default_rng(3).standard_normal((2, 19, 50)).astype(np.float32)
    mask = np.asarray(layer.mask())
    np.testing.assert_array_equal(mask, numpy_tile_mask(layer.kernel[...], tile, 0.25))
    pruned = np.where(mask, np.asarray(layer.kernel[...]), 0)
    y = nnx.jit(lambda m, x: m(x))(layer, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y, np.float64), linear64(x, pruned, layer.bias[...]), rtol=1e-5, atol=1e-5)

    def loss(m):
        return jnp.sum(jnp.cos(m(jnp.asarray(x))))
    g = nnx.grad(loss)(layer).kernel[...]
    # the dense gradient of sum(cos(x @ pruned + b)) with respect to the pruned weight matrix
    dy = -np.sin(linear64(x, pruned, layer.bias[...]))
    full = np.einsum("bmk,bmn->kn", np.asarray(x, np.float64), dy)
    want = full if grad == "dense" else np.where(mask, full, 0.0)
    np.testing.assert_allclose(np.asarray(g, np.float64), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grad", ["masked", "dense"])
def test_pruned_linear_zero_kept_tiles_get_their_gradient(backend, grad):
    """A zero kernel keeps every tile (all norms tie) and must still train: the gradient mask is
    the magnitude mask, not the nonzero tiles of the kernel's values."""
    layer = pit_jax.nn.PrunedLinear(40, 24, density=0.5, tile=(1, 8), grad=grad,
                                    kernel_init=nnx.initializers.zeros_init(), rngs=nnx.Rngs(0))
    assert np.asarray(layer.mask()).all()
    x = np.random.default_rng(1).standard_normal((30, 40)).astype(np.float32)
    g = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(x)) * jnp.arange(24.0)))(layer).kernel[...]
    want = x.astype(np.float64).T @ np.broadcast_to(np.arange(24.0), (30, 24))
    np.testing.assert_allclose(np.asarray(g, np.float64), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_pruned_linear_half_precision(backend, dtype):
    layer = pit_jax.nn.PrunedLinear(64, 48, density=0.3, tile=(1, 16), dtype=dtype, rngs=nnx.Rngs(4))
    x = np.random.default_rng(5).standard_normal((2, 40, 64)).astype(np.float32)
    mask = np.asarray(layer.mask())
    kq = np.where(mask, np.asarray(layer.kernel[...].astype(dtype), np.float64), 0.0)
    xq = np.asarray(jnp.asarray(x, dtype), np.float64)
    y = nnx.jit(lambda m, x: m(x))(layer, jnp.asarray(x))
    assert y.dtype == dtype
    want = xq @ kq + np.asarray(layer.bias[...].astype(dtype), np.float64)
    assert np.linalg.norm(np.asarray(y, np.float64) - want) <= 2e-2 * np.linalg.norm(want)
    g = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(x)).astype(jnp.float32)))(layer).kernel[...]
    gwant = np.where(mask, xq.reshape(-1, 64).T @ np.ones((80, 48)), 0.0)
    assert np.linalg.norm(np.asarray(g, np.float64) - gwant) <= 2e-2 * np.linalg.norm(gwant)


def test_pruned_linear_density_schedule_without_retracing():
    layer = pit_jax.nn.PrunedLinear(64, 64, density=jnp.float32(0.5), tile=(1, 8), rngs=nnx.Rngs(2))
    x = jnp.ones((3, 64))
    traces = []

    @nnx.jit
    def call(m, x):
        traces.append(1)
        return m(x), jnp.sum(m.mask())

    for d in (0.5, 0.25, 0.1):
        layer.density = jnp.float32(d)
        y, kept = call(layer, x)
        mask = numpy_tile_mask(layer.kernel[...], (1, 8), d)
        assert int(kept) == int(mask.sum())
        np.testing.assert_allclose(np.asarray(y, np.float64), linear64(
            np.ones((3, 64)), mask * np.asarray(layer.kernel[...]), layer.bias[...]), rtol=1e-5, atol=1e-5)
    assert len(traces) == 1


@pytest.mark.parametrize("density, tiles, want", [
    (0.3, 420, 126), (np.float32(0.3), 420, 126), (0.5, 2 ** 21, 2 ** 20), (0.3, 10 ** 7, 3 * 10 ** 6),
    (0.3001, 420, 127), (1e-9, 50, 1), (1.0, 7, 7)])
def test_kept_tile_count_python_and_traced(density, tiles, want):
    from pit_jax.pruning import kept_tile_count
    assert kept_tile_count(density, tiles) == want
    assert int(jax.jit(lambda d: kept_tile_count(d, tiles))(jnp.float32(density))) == want


def test_pruned_linear_trains_with_optax():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 32)).astype(np.float32)
    y = x @ rng.standard_normal((32, 16)).astype(np.float32)
    layer = pit_jax.nn.PrunedLinear(32, 16, density=0.5, tile=(1, 4), rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(layer, optax.adam(3e-2), wrt=nnx.Param)

    @nnx.jit
    def step(layer, opt):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(layer)
        opt.update(layer, g)
        return loss

    losses = [float(step(layer, opt)) for _ in range(60)]
    assert losses[-1] < 0.6 * losses[0]
    kept = np.asarray(layer.mask()).mean()
    assert abs(kept - 0.5) < 1e-6


def test_linen_wrappers():
    x = jnp.asarray(relu_input(0, (6, 20)))
    for layer in (pit_jax.nn.SparseLinearLinen(in_features=20, out_features=9),
                  pit_jax.nn.PrunedLinearLinen(in_features=20, out_features=9, density=0.5, tile=(1, 3))):
        variables = layer.init(jax.random.PRNGKey(0), x)
        y = layer.apply(variables, x)
        assert y.shape == (6, 9) and bool(jnp.all(jnp.isfinite(y)))


# ---- errors at trace time, naming the argument ------------------------------------------------------

@pytest.mark.parametrize("cls, kwargs, exc, words", [
    (pit_jax.nn.SparseLinear, dict(in_features=0, out_features=3), ValueError, "in_features"),
    (pit_jax.nn.SparseLinear, dict(in_features=4, out_features=3, tile=(32, 0)), ValueError, "tile"),
    (pit_jax.nn.SparseLinear, dict(in_features=4, out_features=3, tile="dense"), ValueError, "tile"),
    (pit_jax.nn.PrunedLinear, dict(in_features=4, out_features=3, density=0.0), ValueError, "density"),
    (pit_jax.nn.PrunedLinear, dict(in_features=4, out_features=3, density=1.5), ValueError, "density"),
    (pit_jax.nn.PrunedLinear, dict(in_features=4, out_features=3, density="half"), TypeError, "density"),
    (pit_jax.nn.PrunedLinear, dict(in_features=4, out_features=3, density=0.5, tile=(1,)), ValueError, "tile"),
    (pit_jax.nn.PrunedLinear, dict(in_features=4, out_features=3, density=0.5, grad="straight"), ValueError, "grad"),
    (pit_jax.nn.PrunedLinear, dict(in_features=4, out_features=-1, density=0.5), ValueError, "out_features"),
])
def test_bad_config(cls, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        cls(rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("layer", [
    lambda: pit_jax.nn.SparseLinear(16, 4, rngs=nnx.Rngs(0)),
    lambda: pit_jax.nn.PrunedLinear(16, 4, density=0.5, rngs=nnx.Rngs(0)),
])
def test_bad_input(layer):
    m = layer()
    with pytest.raises(ValueError, match="in_features=16"):
        m(jnp.ones((3, 15)))
    with pytest.raises(ValueError, match="in_features=16"):
        m(jnp.ones(()))
    with pytest.raises(TypeError, match="floating point"):
        pit_jax.nn.SparseLinear(16, 4, dtype=jnp.int32, rngs=nnx.Rngs(0))(jnp.ones((2, 16), jnp.int32))


@pytest.mark.parametrize("args, exc, words", [
    ((np.ones((3, 4, 5), np.float32), (1, 2), 0.5), ValueError, "w must be a matrix"),
    ((np.ones((4, 5), np.int32), (1, 2), 0.5), TypeError, "floating-point"),
    ((np.ones((4, 5), np.float32), (0, 2), 0.5), ValueError, "tile"),
    ((np.ones((4, 5), np.float32), (1, 2), -0.1), ValueError, "density"),
    ((np.ones((4, 5), np.float32), (1, 2), jnp.ones(3)), TypeError, "density"),
])
def test_pruning_bad_input(args, exc, words):
    with pytest.raises(exc, match=words):
        pit_jax.tile_magnitude_mask(*args)
    with pytest.raises(exc, match=words):
        pit_jax.prune_tiles_by_magnitude(*args)


@pytest.mark.parametrize("wshape, tile", [((70, 45), (1, 8)), ((64, 96), (1, 32)), ((33, 20), (4, 3))], ids=str)
@pytest.mark.parametrize("density", [0.05, 0.71, 1.0])
def test_tile_magnitude_mask_tiles_expand_to_the_mask(wshape, tile, density):
    """tiles=True gives the tile grid whose expansion is the element mask."""
    w = np.random.default_rng(stable_seed("tiles", wshape, tile, density)).standard_normal(wshape).astype(np.float32)
    keep = np.asarray(pit_jax.tile_magnitude_mask(w, tile, density, tiles=True))
    tk, tn = min(tile[0], wshape[0]), min(tile[1], wshape[1])
    assert keep.shape == (-(-wshape[0] // tk), -(-wshape[1] // tn))
    expanded = np.repeat(np.repeat(keep, tk, 0), tn, 1)[:wshape[0], :wshape[1]]
    np.testing.assert_array_equal(expanded, np.asarray(pit_jax.tile_magnitude_mask(w, tile, density)))


@pytest.mark.parametrize("shape, tile", [((70, 45), (1, 8)), ((64, 96), (32, 1)), ((33, 20), (4, 3)),
                                         ((5, 7), (2, 3))], ids=str)
@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("lead", [(), (3,)], ids=str)
def test_tile_index_from_mask_is_detects_index(backend, shape, tile, layout, lead):
    """The index built from a tile mask equals detect's on an array nonzero exactly on those tiles
    (under jit, with leading dims, empty and full rows of tiles)."""
    rng = np.random.default_rng(stable_seed("from_mask", shape, tile, layout, lead))
    grid = (-(-shape[0] // tile[0]), -(-shape[1] // tile[1]))
    mask = rng.random((*lead, *grid)) < 0.4
    mask[..., 0, :] = True
    mask[..., -1, :] = False
    x = np.repeat(np.repeat(mask, tile[0], -2), tile[1], -1)[..., :shape[0], :shape[1]].astype(np.float32)
    x *= rng.standard_normal(x.shape).astype(np.float32) + 3.0
    got = jax.jit(lambda m: pit_jax.tile_index_from_mask(m, shape, tile, layout))(mask)
    want = pit_jax.detect(x, tile, layout=layout)
    assert (got.shape, got.tile, got.layout) == (want.shape, want.tile, want.layout)
    for a, b in ((got.counts, want.counts), (got.offsets, want.offsets), (got.indices, want.indices)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("args, words", [
    ((np.ones((3, 4), bool), (10, 10), (4, 4)), "mask must have shape"),
    ((np.ones((3, 3), bool), (10, 10), (4, 0)), "tile must be"),
    ((np.ones((3, 3), bool), (10, 10), (4, 4), "diag"), "layout"),
    ((np.ones(3, bool), (10, 10), (4, 4)), "mask must have shape"),
    ((np.ones((3, 3), bool), (10,), (4, 4)), "shape must be a pair of positive ints"),
    ((np.ones((3, 3), bool), 10, (4, 4)), "shape must be a pair of positive ints"),
    ((np.ones((3, 3), bool), None, (4, 4)), "shape must be a pair of positive ints"),
    ((np.ones((3, 3), bool), (10.0, 10.0), (4, 4)), "shape must be a pair of positive ints"),
    ((np.ones((3, 3), bool), (-1, 10), (4, 4)), "shape must be a pair of positive ints"),
    ((np.ones((3, 3), bool), (None, 10), (4, 4)), "shape must be a pair of positive ints"),
    ((np.ones((3, 3), bool), (10, object()), (4, 4)), "shape must be a pair of positive ints"),
    ((np.ones((3, 3), bool), (10, 10), None), "tile must be"),
    ((np.ones((3, 3), bool), (10, 10), 4), "tile must be"),
])
def test_tile_index_from_mask_bad_input(args, words):
    with pytest.raises(ValueError, match=words):
        pit_jax.tile_index_from_mask(*args)


def test_tile_index_from_mask_clamps_a_tile_larger_than_shape(backend):
    """As detect, the ops and tile_magnitude_mask clamp theirs (same grid), so the index of a
    tiles=True mask fits dense_sparse's own clamped tile."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((48, 16)).astype(np.float32)
    x = rng.standard_normal((5, 48)).astype(np.float32)
    keep = pit_jax.tile_magnitude_mask(w, (1, 32), 0.5, tiles=True)
    index = pit_jax.tile_index_from_mask(keep, (48, 16), (1, 32))
    assert index.tile == (1, 16)
    pruned = np.asarray(pit_jax.prune_tiles_by_magnitude(w, (1, 32), 0.5))
    np.testing.assert_allclose(np.asarray(pit_jax.dense_sparse(x, pruned, index=index)), x @ pruned,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wshape", [(0, 16), (16, 0)])
def test_tile_magnitude_mask_of_an_empty_weight(wshape):
    w = jnp.ones(wshape)
    assert pit_jax.tile_magnitude_mask(w, (1, 32), 0.5).shape == wshape
    assert pit_jax.prune_tiles_by_magnitude(w, (1, 32), 0.5).shape == wshape
