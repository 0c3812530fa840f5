"""sparse_dense / dense_sparse: values against a float64 reference, autodiff, vmap, export, errors."""
import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import pit_jax
from helpers import DTYPES, broken_index, random_tile_sparse, stable_seed

TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}  # relative Frobenius error


def _rel_err(got, want):
    got = np.asarray(got, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def _dense(rng, shape, dtype):
    return (rng.standard_normal(shape) + 0.1).astype(DTYPES[dtype])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tile", [(32, 1), (8, 8), (1, 1), (3, 5)], ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_sparse_dense_matches_float64(backend, dtype, tile, sparsity):
    rng = np.random.default_rng(stable_seed(dtype, tile, sparsity))
    x = random_tile_sparse(rng, (2, 67, 45), tile, sparsity, dtype)
    w = _dense(rng, (45, 29), dtype)
    y = jax.jit(lambda x, w: pit_jax.sparse_dense(x, w, tile=tile))(x, w)
    assert y.shape == (2, 67, 29) and y.dtype == x.dtype
    want = x.astype(np.float64) @ w.astype(np.float64)
    if sparsity == 1.0:
        np.testing.assert_array_equal(np.asarray(y, np.float32), 0)
    else:
        assert _rel_err(y, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 1.0])
def test_auto_matches_float64_with_gradients(backend, dtype, sparsity):
    """tile="auto" (the kernel below the density threshold, the dense matmul above it): values
    and both gradients against float64, batched, odd shapes."""
    rng = np.random.default_rng(stable_seed("auto", dtype, sparsity))
    x = random_tile_sparse(rng, (2, 67, 45), (32, 1), sparsity, dtype)
    w = _dense(rng, (45, 29), dtype)
    g = rng.standard_normal((2, 67, 29))
    f = lambda x, w: pit_jax.sparse_dense(x, w, tile="auto")
    y, (dx, dw) = jax.jit(lambda x, w: (f(x, w), jax.grad(
        lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * g), (0, 1))(x, w)))(x, w)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    assert y.shape == (2, 67, 29) and y.dtype == x.dtype
    if sparsity == 1.0:
        np.testing.assert_array_equal(np.asarray(y, np.float32), 0)
    else:
        assert _rel_err(y, x64 @ w64) < TOL[dtype]
    assert _rel_err(dx, g @ w64.T) < TOL[dtype]
    want_dw = np.einsum("bmk,bmn->kn", x64, g)
    if sparsity == 1.0:
        np.testing.assert_array_equal(np.asarray(dw, np.float32), 0)
    else:
        assert _rel_err(dw, want_dw) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("sparsity", [0.0, 0.95])
def test_auto_with_bias(backend, dtype, sparsity):
    """tile="auto" with a bias: the kernel branch (95%: its epilogue adds the bias) and the dense
    branch (0%: the matmul plus the bias), values and the bias's gradient against float64."""
    rng = np.random.default_rng(stable_seed("auto_bias", dtype, sparsity))
    x = random_tile_sparse(rng, (2, 67, 45), (32, 1), sparsity, dtype)
    w = _dense(rng, (45, 29), dtype)
    bias = _dense(rng, (29,), dtype)
    g = rng.standard_normal((2, 67, 29))
    f = lambda x, w, b: pit_jax.sparse_dense(x, w, bias=b, tile="auto")
    y, db = jax.jit(lambda x, w, b: (f(x, w, b), jax.grad(
        lambda b: jnp.sum(f(x, w, b).astype(jnp.float32) * g))(b)))(x, w, bias)
    assert _rel_err(y, x.astype(np.float64) @ w.astype(np.float64) + bias.astype(np.float64)) < TOL[dtype]
    assert _rel_err(db, g.sum(axis=(0, 1))) < TOL[dtype]


def test_auto_choice_follows_the_densest_batch_member(backend):
    """The kernel when every member lists at most AUTO_MAX_DENSITY of its 32x1 tiles; the dense
    matmul as soon as one member is denser; the result is x @ w either way (also under vmap)."""
    from pit_jax.kgather import AUTO_MAX_DENSITY, auto_takes_kernel
    rng = np.random.default_rng(7)
    sparse = random_tile_sparse(rng, (128, 300), (32, 1), 0.97, "float32")
    dense = random_tile_sparse(rng, (128, 300), (32, 1), 0.5, "float32")
    density = lambda x: float(pit_jax.detect(x, (32, 1)).density)
    assert density(sparse) <= AUTO_MAX_DENSITY < density(dense)
    assert bool(auto_takes_kernel(pit_jax.detect(sparse, (32, 1))))
    assert not bool(auto_takes_kernel(pit_jax.detect(np.stack([sparse, dense]), (32, 1))))
    w = _dense(rng, (300, 17), "float32")
    for x in (sparse, dense, np.stack([sparse, dense])):
        y = jax.jit(lambda x: pit_jax.sparse_dense(x, w, tile="auto"))(x)
        assert _rel_err(y, x.astype(np.float64) @ w) < TOL["float32"]
    both = np.stack([sparse, dense])
    y = jax.vmap(lambda x: pit_jax.sparse_dense(x, w, tile="auto"))(both)
    assert _rel_err(y, both.astype(np.float64) @ w) < TOL["float32"]


def test_auto_sampled_density_estimates_the_densest_member(backend):
    """The sampled estimate: exact for all-zero and all-dense x, close to the detected density
    for random tiles, and the max over a batch."""
    from pit_jax.kgather import auto_sampled_density
    rng = np.random.default_rng(9)
    zeros = np.zeros((2, 300, 100), np.float32)
    assert float(auto_sampled_density(zeros)) == 0.0
    full = random_tile_sparse(rng, (300, 100), (32, 1), 0.0, "float32")
    assert float(auto_sampled_density(full)) == 1.0
    x = random_tile_sparse(rng, (2048, 512), (32, 1), 0.9, "float32")
    assert abs(float(auto_sampled_density(x)) - float(pit_jax.detect(x, (32, 1)).density)) < 0.03
    dense_member = random_tile_sparse(rng, (2048, 512), (32, 1), 0.0, "float32")
    assert float(auto_sampled_density(np.stack([x, dense_member]))) == 1.0


def test_auto_lowers_to_a_conditional_over_kernel_and_dense_matmul():
    """On CUDA, tile="auto" is a conditional between the k-gather kernel (which detects inside
    its branch) and XLA's matmul (the lax.cond that docs/kgather.md describes)."""
    if not pit_jax.cuda_available():
        pytest.skip("built without CUDA kernels")
    x = jax.ShapeDtypeStruct((64, 32), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((32, 16), jnp.bfloat16)
    text = jax.jit(lambda x, w: pit_jax.sparse_dense(x, w, tile="auto")).trace(x, w).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "pit_detect" in text and "stablehlo.case" in text
    assert "pit_sparse_dense" in text and "stablehlo.dot_general" in text


def test_auto_rejects_other_strings():
    with pytest.raises(ValueError, match="tile must be a pair of ints or 'auto'"):
        pit_jax.sparse_dense(np.ones((4, 4), np.float32), np.ones((4, 4), np.float32), tile="fast")


def test_bad_input_names_the_argument():
    """Trace-time errors for each kind of bad input, naming the argument (jit: nothing runs)."""
    x = np.ones((2, 8, 16), np.float32)
    w = np.ones((16, 4), np.float32)
    cases = [
        (lambda: pit_jax.sparse_dense(np.ones(16, np.float32), w), ValueError, "x must have rank >= 2"),
        (lambda: pit_jax.sparse_dense(x, np.ones(16, np.float32)), ValueError, "w must have rank >= 2"),
        (lambda: pit_jax.sparse_dense(x, np.ones((2, 16, 4), np.float32)), ValueError, "w must be a matrix"),
        (lambda: pit_jax.sparse_dense(x, w.astype(np.float16)), TypeError, "x and w must have the same dtype"),
        (lambda: pit_jax.sparse_dense(x.astype(np.int32), w), TypeError, "x must be bfloat16, float16 or float32"),
        (lambda: pit_jax.sparse_dense(x, np.ones((15, 4), np.float32)), ValueError, "x's last dim \\(16\\)"),
        (lambda: pit_jax.sparse_dense(x, w, tile=(32,)), TypeError, "tile must be a pair of ints or 'auto'"),
        (lambda: pit_jax.sparse_dense(x, w, tile=(0, 1)), ValueError, "tile sizes must be positive"),
        (lambda: pit_jax.sparse_dense(x, w, tile=(8.0, 1)), TypeError, "tile must be a pair of ints"),
        (lambda: pit_jax.sparse_dense(x, w, index=(1, 2, 3)), TypeError, "index must be a pit_jax.TileIndex"),
        (lambda: pit_jax.sparse_dense(x, w, tile=(8, 1), index=pit_jax.detect(x, (4, 1))), ValueError,
         "index was made for shape \\(8, 16\\), tile \\(4, 1\\)"),
        (lambda: pit_jax.sparse_dense(x, w, index=pit_jax.detect(x[0], (4, 1))), ValueError, "index has batch dims"),
        (lambda: pit_jax.sparse_dense(x, w, index=pit_jax.detect(x[:, :4], (4, 1))), ValueError,
         "index was made for shape \\(4, 16\\)"),
        (lambda: pit_jax.dense_sparse(x, w, tile="auto"), ValueError, "tile='auto' is sparse_dense's only"),
        (lambda: pit_jax.dense_sparse(x, w, tile=(1, -2)), ValueError, "tile sizes must be positive"),
        (lambda: pit_jax.dense_sparse(x, w, grad="exact"), ValueError, "grad must be 'masked' or 'dense'"),
        (lambda: pit_jax.dense_sparse(x, w.astype(np.float16)), TypeError, "x and w must have the same dtype"),
        (lambda: pit_jax.dense_sparse(x, w, index=pit_jax.detect(w.T.copy(), (1, 4))), ValueError,
         "index was made for shape \\(4, 16\\)"),
        # a hand-built index whose arrays do not match its metadata (the kernels size reads by them)
        (lambda: pit_jax.sparse_dense(x, w, index=_with_field(pit_jax.detect(x, (4, 1)), "indices", slice(0, 3))),
         ValueError, "index.indices must be int32 of shape \\(2, 2, 16\\)"),
        (lambda: pit_jax.sparse_dense(x, w, index=_with_field(pit_jax.detect(x, (4, 1)), "counts", jnp.float32)),
         ValueError, "index.counts must be int32 of shape \\(2, 2\\)"),
        (lambda: pit_jax.dense_sparse(x, w, index=_with_field(pit_jax.detect(w, (1, 4)), "offsets", slice(0, 2))),
         ValueError, "index.offsets must be int32 of shape \\(17,\\)"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def _with_field(index, field, change):
    """`index` with one array cut along its last axis (a slice) or cast (a dtype)."""
    a = getattr(index, field)
    a = a[..., change] if isinstance(change, slice) else a.astype(change)
    return pit_jax.TileIndex(**{**{f: getattr(index, f) for f in
                                   ("counts", "offsets", "indices", "shape", "tile", "layout")}, field: a})


@pytest.mark.parametrize("x_shape, w_shape", [((0, 48), (48, 16)), ((5, 0), (0, 16)), ((5, 48), (48, 0)),
                                              ((2, 0, 48), (48, 16))], ids=["M0", "K0", "N0", "batch_M0"])
def test_empty_dims_give_the_dense_result(backend, x_shape, w_shape):
    """M, K or N of 0: x @ w (+ bias) as jnp gives it (empty, or zeros plus the bias), gradients
    of the operands' shapes; detect refuses empty dims, so no index is built."""
    x, w = np.ones(x_shape, np.float32), np.ones(w_shape, np.float32)
    b = np.arange(w_shape[1], dtype=np.float32)
    cases = [(lambda x, w, b: pit_jax.sparse_dense(x, w, bias=b), x @ w + b),
             (lambda x, w, b: pit_jax.sparse_dense(x, w), x @ w),
             (lambda x, w, b: pit_jax.sparse_dense(x, w, bias=b, tile="auto"), x @ w + b),
             (lambda x, w, b: pit_jax.dense_sparse(x, w, bias=b), x @ w + b)]
    for f, want in cases:
        y = jax.jit(f)(x, w, b)
        assert y.shape == want.shape and y.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(y), want)
        gx, gw = jax.grad(lambda x, w: jnp.sum(f(x, w, b)), (0, 1))(x, w)
        assert gx.shape == x.shape and gw.shape == w.shape


def test_index_crosses_a_serialized_export(backend):
    """A TileIndex returned by, and passed into, an exported function that is serialized (its
    pytree is registered with jax.export), with a symbolic batch dim."""
    b, = export.symbolic_shape("b")
    checks = [export.DisabledSafetyCheck.custom_call(t) for t in ("pit_detect", "pit_sparse_dense")]
    rng = np.random.default_rng(12)
    x = random_tile_sparse(rng, (3, 16, 8), (8, 1), 0.5, "float32")
    w = _dense(rng, (8, 5), "float32")
    exp = export.export(jax.jit(lambda x: pit_jax.detect(x, (8, 1))), platforms=("cpu", "cuda"),
                        disabled_checks=checks)(jax.ShapeDtypeStruct((b, 16, 8), jnp.float32))
    index = export.deserialize(exp.serialize()).call(x)
    want = pit_jax.detect(x, (8, 1))
    assert (index.shape, index.tile, index.layout) == (want.shape, want.tile, want.layout)
    np.testing.assert_array_equal(np.asarray(index.indices), np.asarray(want.indices))
    spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct((b, *a.shape[1:]), a.dtype), want)
    exp = export.export(jax.jit(lambda x, i: pit_jax.sparse_dense(x, w, index=i)), platforms=("cpu", "cuda"),
                        disabled_checks=checks)(jax.ShapeDtypeStruct((b, 16, 8), jnp.float32), spec)
    np.testing.assert_allclose(np.asarray(export.deserialize(exp.serialize()).call(x, index)), x @ w,
                               rtol=1e-5, atol=1e-5)


def test_tile_defaults_to_the_index_tile(backend):
    """With `index` given and no `tile`, both functions take the index's tile."""
    rng = np.random.default_rng(7)
    x = random_tile_sparse(rng, (40, 24), (8, 4), 0.5, "float32")
    w = (rng.standard_normal((24, 16)) + 0.1).astype(np.float32)
    got = pit_jax.sparse_dense(x, w, index=pit_jax.detect(x, (8, 4)))
    np.testing.assert_allclose(np.asarray(got), x @ w, rtol=1e-5, atol=1e-4)
    ws = random_tile_sparse(rng, (24, 16), (2, 8), 0.5, "float32")
    got = pit_jax.dense_sparse(x, ws, index=pit_jax.detect(ws, (2, 8)))
    np.testing.assert_allclose(np.asarray(got), x @ ws, rtol=1e-5, atol=1e-4)


def test_values_outside_index_are_ignored(backend):
    """A caller's index is a promise; values outside it are never read (as in the kernels)."""
    rng = np.random.default_rng(1)
    x = random_tile_sparse(rng, (40, 24), (8, 4), 0.6, "float32")
    idx = pit_jax.detect(x, (8, 4))
    noisy = np.where(np.asarray(idx.element_mask()), x, 123.0).astype(np.float32)
    w = _dense(rng, (24, 7), "float32")
    y = pit_jax.sparse_dense(noisy, w, tile=(8, 4), index=idx)
    np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-5, atol=1e-5)


def test_index_reuse_and_clamped_tile(backend):
    rng = np.random.default_rng(2)
    x = random_tile_sparse(rng, (5, 30), (5, 1), 0.5, "float32")  # tm=32 > M=5: one row block
    w = _dense(rng, (30, 6), "float32")
    y = pit_jax.sparse_dense(x, w)  # default tile (32, 1) is clamped to (5, 1)
    np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-5, atol=1e-5)
    idx = pit_jax.detect(x, (5, 1))
    y2 = jax.jit(lambda x, w, i: pit_jax.sparse_dense(x, w, index=i))(x, w, idx)
    np.testing.assert_allclose(np.asarray(y2), np.asarray(y))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grad_matches_dense_matmul(backend, dtype):
    rng = np.random.default_rng(3)
    x = random_tile_sparse(rng, (3, 37, 26), (8, 1), 0.7, dtype)
    w = _dense(rng, (26, 11), dtype)
    g = rng.standard_normal((3, 37, 11)).astype(np.float32)

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * g)

    got = jax.jit(jax.grad(loss(lambda x, w: pit_jax.sparse_dense(x, w, tile=(8, 1))), (0, 1)))(x, w)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    want_dx = g @ w64.T
    want_dw = np.einsum("bmk,bmn->kn", x64, g)
    assert _rel_err(got[0], want_dx) < TOL[dtype]
    assert _rel_err(got[1], want_dw) < TOL[dtype]


def test_jvp_and_linear_transpose(backend):
    rng = np.random.default_rng(4)
    x = random_tile_sparse(rng, (21, 18), (4, 2), 0.5, "float32")
    w, dw = _dense(rng, (18, 5), "float32"), _dense(rng, (18, 5), "float32")
    dx = rng.standard_normal(x.shape).astype(np.float32)  # dense tangent: dy gets dx @ w in full
    f = lambda x, w: pit_jax.sparse_dense(x, w, tile=(4, 2))
    _, t = jax.jvp(f, (x, w), (dx, dw))
    np.testing.assert_allclose(np.asarray(t), dx @ w + x @ dw, rtol=1e-4, atol=1e-4)
    ct = rng.standard_normal((21, 5)).astype(np.float32)
    (w_bar,) = jax.linear_transpose(lambda w: f(x, w), w)(ct)
    np.testing.assert_allclose(np.asarray(w_bar), x.T @ ct, rtol=1e-4, atol=1e-4)
    idx = pit_jax.detect(x, (4, 2))  # linear in x only for a fixed index (detection is not linear)
    (x_bar,) = jax.linear_transpose(lambda x: pit_jax.sparse_dense(x, w, tile=(4, 2), index=idx), x)(ct)
    np.testing.assert_allclose(np.asarray(x_bar), ct @ w.T, rtol=1e-4, atol=1e-4)


def test_second_order(backend):
    rng = np.random.default_rng(5)
    x = random_tile_sparse(rng, (12, 10), (2, 1), 0.5, "float32")
    w = _dense(rng, (10, 3), "float32")
    f = lambda w: jnp.sum(pit_jax.sparse_dense(x, w, tile=(2, 1)) ** 2)
    h = jax.hessian(f)(w)
    want = jax.hessian(lambda w: jnp.sum((x @ w) ** 2))(w)
    np.testing.assert_allclose(np.asarray(h), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_vmap_over_x_w_and_grad(backend):
    rng = np.random.default_rng(6)
    xs = random_tile_sparse(rng, (4, 20, 16), (4, 1), 0.6, "float32")
    ws = _dense(rng, (4, 16, 6), "float32")
    f = lambda x, w: pit_jax.sparse_dense(x, w, tile=(4, 1))
    np.testing.assert_allclose(np.asarray(jax.vmap(f, (1, None))(np.moveaxis(xs, 0, 1), ws[0])),
                               xs @ ws[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.vmap(f)(xs, ws)), xs @ ws, rtol=1e-5, atol=1e-5)
    gw = jax.vmap(jax.grad(lambda x, w: f(x, w).sum(), 1))(xs, ws)
    np.testing.assert_allclose(np.asarray(gw), np.einsum("bmk,bmn->bkn", xs, np.ones((4, 20, 6))),
                               rtol=1e-5, atol=1e-5)


def test_export_symbolic_batch(backend):
    b, = export.symbolic_shape("b")
    fn = jax.jit(lambda x, w: pit_jax.sparse_dense(x, w, tile=(8, 1)))
    exp = export.export(fn, platforms=("cpu", "cuda"),
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(t) for t in
                                         ("pit_detect", "pit_sparse_dense")])(
        jax.ShapeDtypeStruct((b, 24, 16), jnp.float32), jax.ShapeDtypeStruct((16, 5), jnp.float32))
    rng = np.random.default_rng(7)
    x = random_tile_sparse(rng, (3, 24, 16), (8, 1), 0.5, "float32")
    w = _dense(rng, (16, 5), "float32")
    got = export.deserialize(exp.serialize()).call(x, w)
    np.testing.assert_allclose(np.asarray(got), x @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["sparse_dense", "dense_sparse"])
def test_export_with_bias_symbolic_batch(backend, op):
    """Both ops with a bias, exported for cpu and cuda with a symbolic batch dim: the serialized
    round trip computes x @ w + bias."""
    b, = export.symbolic_shape("b")
    tile = (8, 1) if op == "sparse_dense" else (1, 8)
    fn = jax.jit(lambda x, w, bias: getattr(pit_jax, op)(x, w, bias=bias, tile=tile))
    exp = export.export(fn, platforms=("cpu", "cuda"),
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(t) for t in
                                         ("pit_detect", "pit_sparse_dense", "pit_sparse_dense_detect")])(
        jax.ShapeDtypeStruct((b, 24, 16), jnp.float32), jax.ShapeDtypeStruct((16, 12), jnp.float32),
        jax.ShapeDtypeStruct((12,), jnp.float32))
    rng = np.random.default_rng(stable_seed("export_bias", op))
    if op == "sparse_dense":
        x, w = random_tile_sparse(rng, (3, 24, 16), tile, 0.5, "float32"), _dense(rng, (16, 12), "float32")
    else:
        x, w = _dense(rng, (3, 24, 16), "float32"), random_tile_sparse(rng, (16, 12), tile, 0.5, "float32")
    bias = _dense(rng, (12,), "float32")
    loaded = export.deserialize(exp.serialize())
    np.testing.assert_allclose(np.asarray(loaded.call(x, w, bias)), x @ w + bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile", [(32, 1), (8, 2), (64, 4)], ids=str)
@pytest.mark.parametrize("dw", ["dense", "sparse"])
def test_out_of_range_index_stays_in_bounds(backend, tile, dw, monkeypatch):
    """A hand-built index with counts past n_inner and ids out of range: no read or write leaves the
    buffers (the CUDA kernels clamp counts and skip such ids; run it under compute-sanitizer), and
    both ops compute x @ w over the in-range ids, with their gradients (dW's kernel included)."""
    monkeypatch.setenv("PIT_KGATHER_DW", dw)
    rng = np.random.default_rng(stable_seed("bad_index", tile, dw))
    x = random_tile_sparse(rng, (2, 70, 45), tile, 0.4, "bfloat16")
    w = _dense(rng, (45, 37), "bfloat16")
    bad, kept = broken_index(pit_jax.detect(x, tile), rng)
    xk = np.where(kept, x.astype(np.float64), 0)
    g = rng.standard_normal((2, 70, 37))
    f = lambda x, w: pit_jax.sparse_dense(x, w, index=bad)
    y, (gx, gw) = jax.jit(lambda x, w: (f(x, w), jax.grad(
        lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * g), (0, 1))(x, w)))(x, w)
    assert _rel_err(y, xk @ w.astype(np.float64)) < TOL["bfloat16"]
    assert _rel_err(gw, np.einsum("bmk,bmn->kn", xk, g)) < TOL["bfloat16"]
    assert _rel_err(gx, g @ w.astype(np.float64).T) < TOL["bfloat16"]
    # dense_sparse: the weight's index broken the same way (read in place, transposed)
    w_tile = (tile[1], min(tile[0], 37))
    ws = random_tile_sparse(rng, (45, 37), w_tile, 0.4, "bfloat16")
    bad_w, kept_w = broken_index(pit_jax.detect(ws, w_tile), rng)
    wk = np.where(kept_w, ws.astype(np.float64), 0)
    f2 = lambda x, w: pit_jax.dense_sparse(x, w, index=bad_w)
    y2, (gx2, gw2) = jax.jit(lambda x, w: (f2(x, w), jax.grad(
        lambda x, w: jnp.sum(f2(x, w).astype(jnp.float32) * g), (0, 1))(x, w)))(x, ws)
    x64 = x.astype(np.float64)
    assert _rel_err(y2, x64 @ wk) < TOL["bfloat16"]
    assert _rel_err(gx2, g @ wk.T) < TOL["bfloat16"]
    assert _rel_err(gw2, np.einsum("bmk,bmn->kn", x64, g) * kept_w) < TOL["bfloat16"]  # masked


def test_negative_counts_stay_in_bounds(backend):
    """Negative counts (values unspecified: the kernels list nothing there, the masks of the CPU path
    and of finer row tiles every in-range id) finish without an error and with finite values."""
    rng = np.random.default_rng(stable_seed("negative_counts"))
    x = random_tile_sparse(rng, (70, 45), (32, 1), 0.4, "float16")
    w = _dense(rng, (45, 37), "float16")
    index = pit_jax.detect(x, (32, 1))
    bad = pit_jax.TileIndex(jnp.full_like(index.counts, -3), index.offsets, index.indices, index.shape,
                            index.tile, index.layout)
    y = jax.jit(lambda x, w: pit_jax.sparse_dense(x, w, index=bad))(x, w)
    assert y.shape == (70, 37) and bool(jnp.all(jnp.isfinite(y)))
    if backend == "gpu":  # the CUDA kernels clamp each count to 0: nothing listed
        np.testing.assert_array_equal(np.asarray(y, np.float32), 0)


_EXPORT_TARGETS = ("pit_detect", "pit_sparse_dense", "pit_sparse_dense_detect", "pit_sparse_nt", "pit_sparse_tn",
                   "pit_sparse_tn_products")


@pytest.mark.parametrize("tile", [(32, 1), (8, 1), (64, 4), "auto"], ids=str)
def test_export_symbolic_rows(backend, tile):
    """sparse_dense exported for cpu and cuda with a symbolic row count M: the tile is kept (not
    clamped to M), so one partial row block covers M < tm; the serialized round trip gives x @ w
    and both gradients against float64 at M below, across and above the tile."""
    m, = export.symbolic_shape("m")
    g_of = lambda y: jnp.cos(y.astype(jnp.float32))  # a cotangent that varies over y
    f = lambda x, w: pit_jax.sparse_dense(x, w, tile=tile)
    fn = jax.jit(lambda x, w: (f(x, w), jax.grad(lambda x, w: jnp.sum(f(x, w) * g_of(f(x, w))), (0, 1))(x, w)))
    exp = export.export(fn, platforms=("cpu", "cuda"),
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(t) for t in _EXPORT_TARGETS])(
        jax.ShapeDtypeStruct((m, 72), jnp.float32), jax.ShapeDtypeStruct((72, 40), jnp.float32))
    loaded = export.deserialize(exp.serialize())
    rng = np.random.default_rng(stable_seed("export_rows", tile))
    w = _dense(rng, (72, 40), "float32")
    for rows in (5, 33, 100):
        # auto: 8x1 tiles at 97% leave about 11% of 32x1 tiles nonzero, so its kernel branch runs
        x = random_tile_sparse(rng, (rows, 72), (8, 1), 0.97 if tile == "auto" else 0.5, "float32")
        y, (dx, dw) = loaded.call(x, w)
        want = x.astype(np.float64) @ w.astype(np.float64)
        assert y.shape == (rows, 40) and _rel_err(y, want) < TOL["float32"]
        # d/dy of sum(y cos y) = cos y - y sin y
        dy = np.cos(np.asarray(y, np.float64)) - np.asarray(y, np.float64) * np.sin(np.asarray(y, np.float64))
        assert _rel_err(dw, x.astype(np.float64).T @ dy) < 1e-4
        assert _rel_err(dx, dy @ w.astype(np.float64).T) < 1e-4


def test_auto_sampled_density_is_the_same_exported():
    """tile="auto"'s density sample with a symbolic M (zero rows pad only a first group shorter
    than 32) equals the traced one at each size, so an exported function takes the same branch:
    a last partial group is left out both ways (M=261: its nonzeros are not sampled)."""
    from pit_jax.kgather import auto_sampled_density
    m, = export.symbolic_shape("m")
    exp = export.export(jax.jit(auto_sampled_density), platforms=("cpu", "cuda"))(
        jax.ShapeDtypeStruct((m, 16), jnp.float32))
    for rows in (5, 31, 32, 33, 261, 300):
        x = np.zeros((rows, 16), np.float32)
        x[rows - 5:, :8] = 1.0
        x[0, 0] = 1.0
        assert float(exp.call(x)) == float(jax.jit(auto_sampled_density)(x))


def test_export_every_dim_symbolic(backend):
    """Both ops with batch, M, K and N all symbolic (the index grids of detect and of
    tile_index_from_mask must be the same symbolic expressions), values and dense_sparse's
    masked gradient against float64 at two sets of sizes."""
    b, m, k, n = export.symbolic_shape("b, m, k, n")
    ds = lambda x, w: pit_jax.dense_sparse(x, w, tile=(8, 8))
    fn = jax.jit(lambda x, w: (pit_jax.sparse_dense(x, w), ds(x, w), jax.grad(lambda w: ds(x, w).sum())(w)))
    exp = export.export(fn, platforms=("cpu", "cuda"),
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(t) for t in _EXPORT_TARGETS])(
        jax.ShapeDtypeStruct((b, m, k), jnp.float32), jax.ShapeDtypeStruct((k, n), jnp.float32))
    rng = np.random.default_rng(stable_seed("export_every_dim"))
    loaded = export.deserialize(exp.serialize())
    for (bb, mm, kk, nn) in ((1, 3, 5, 2), (2, 45, 48, 24)):
        x = random_tile_sparse(rng, (bb, mm, kk), (32, 1), 0.5, "float32")
        w = random_tile_sparse(rng, (kk, nn), (8, 8), 0.5, "float32")
        want = x.astype(np.float64) @ w.astype(np.float64)
        y_sd, y_ds, dw = loaded.call(x, w)
        for got in (y_sd, y_ds):
            assert got.shape == want.shape and _rel_err(got, want) < TOL["float32"]
        padded = np.pad(w != 0, [(0, -kk % 8), (0, -nn % 8)])
        kept = padded.reshape(-(-kk // 8), 8, -(-nn // 8), 8).any((1, 3)).repeat(8, 0).repeat(8, 1)[:kk, :nn]
        want_dw = x.reshape(-1, kk).astype(np.float64).sum(0)[:, None] * kept  # masked: zero on pruned tiles
        assert _rel_err(dw, want_dw) < 1e-5


@pytest.mark.parametrize("grad", ["masked", "dense"])
def test_dense_sparse(backend, grad):
    rng = np.random.default_rng(8)
    x = _dense(rng, (2, 19, 40), "float32")
    w = random_tile_sparse(rng, (40, 24), (1, 8), 0.6, "float32")
    f = lambda x, w: pit_jax.dense_sparse(x, w, tile=(1, 8), grad=grad)
    np.testing.assert_allclose(np.asarray(jax.jit(f)(x, w)), x @ w, rtol=1e-5, atol=1e-5)
    g = rng.standard_normal((2, 19, 24)).astype(np.float32)
    gx, gw = jax.grad(lambda x, w: jnp.sum(f(x, w) * g), (0, 1))(x, w)
    np.testing.assert_allclose(np.asarray(gx), g @ w.T, rtol=1e-4, atol=1e-4)
    dense_gw = np.einsum("bmk,bmn->kn", x, g)
    mask = np.asarray(pit_jax.detect(w, (1, 8)).element_mask())
    want = dense_gw * mask if grad == "masked" else dense_gw
    np.testing.assert_allclose(np.asarray(gw), want, rtol=1e-4, atol=1e-4)
    if grad == "masked":
        assert np.all(np.asarray(gw)[~mask] == 0)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n", [16, 40])  # 16: one tile of w's columns (XLA:CPU's failing layout)
def test_ops_outside_jit_match_float64(backend, dtype, n):
    """Called op by op (no jit), as an nnx layer usually is: both ops, with and without a bias,
    their gradients and vmap, against float64 (bf16 dense_sparse failed on XLA:CPU until session
    39: its reference's widened dot became a bf16 x bf16 = f32 dot that the CPU runtime lacks)."""
    rng = np.random.default_rng(stable_seed("outside_jit", dtype, n))
    x = random_tile_sparse(rng, (2, 37, 48), (1, 1), 0.3, dtype)
    w = random_tile_sparse(rng, (48, n), (1, 8), 0.5, dtype)
    b = _dense(rng, (n,), dtype)
    x64, w64, b64 = (np.asarray(a, np.float64) for a in (x, w, b))
    g = rng.standard_normal((2, 37, n)).astype(np.float32)
    for op in (pit_jax.sparse_dense, pit_jax.dense_sparse):
        y = op(x, w)
        assert y.dtype == x.dtype and _rel_err(y, x64 @ w64) < TOL[dtype]
        assert _rel_err(op(x, w, bias=b), x64 @ w64 + b64) < TOL[dtype]
        assert _rel_err(jax.vmap(lambda x: op(x, w, bias=b))(x), x64 @ w64 + b64) < TOL[dtype]
        gx, gw, gb = jax.grad(lambda x, w, b: jnp.sum(op(x, w, bias=b).astype(jnp.float32) * g), (0, 1, 2))(x, w, b)
        assert _rel_err(gx, g @ w64.T) < TOL[dtype] and _rel_err(gb, g.sum((0, 1))) < TOL[dtype]
        dense_gw = np.einsum("bmk,bmn->kn", x64, g)
        if op is pit_jax.dense_sparse:  # masked: only w's listed tiles
            dense_gw = dense_gw * np.asarray(pit_jax.detect(w, (1, min(32, n))).element_mask())
        assert _rel_err(gw, dense_gw) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dense_sparse_half_precision_transforms(backend, dtype):
    """dense_sparse (sparse training) in bf16/fp16 against float64: value, both masked gradients,
    vmap over a batch of x, jvp in w, and an exported round trip."""
    rng = np.random.default_rng(stable_seed("dense_sparse_half", dtype))
    tol = {"bfloat16": 2e-2, "float16": 3e-3}[dtype]
    x = _dense(rng, (3, 21, 48), dtype)
    w = random_tile_sparse(rng, (48, 40), (1, 8), 0.7, dtype)
    mask = np.asarray(pit_jax.detect(w, (1, 8)).element_mask())
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    f = lambda x, w: pit_jax.dense_sparse(x, w, tile=(1, 8))

    def close(got, want):
        got = np.asarray(got, np.float64)
        assert np.linalg.norm(got - want) <= tol * max(np.linalg.norm(want), 1e-30)

    close(jax.jit(f)(x, w), x64 @ w64)
    g = rng.standard_normal((3, 21, 40)).astype(np.float32)
    gx, gw = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * g), (0, 1)))(x, w)
    assert gx.dtype == x.dtype and gw.dtype == w.dtype
    close(gx, g @ w64.T)
    close(gw, np.einsum("bmk,bmn->kn", x64, g) * mask)
    assert np.all(np.asarray(gw, np.float32)[~mask] == 0)
    close(jax.jit(jax.vmap(f, in_axes=(0, None)))(x, w), x64 @ w64)
    dw = _dense(rng, (48, 40), dtype)
    _, tangent = jax.jvp(lambda w: f(x, w), (w,), (dw,))
    close(tangent, x64 @ (np.asarray(dw, np.float64) * mask))  # masked: pruned weights do not move y
    exp = export.export(jax.jit(f), platforms=("cpu", "cuda"),
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(t) for t in
                                         ("pit_detect", "pit_sparse_dense")])(x, w)
    close(export.deserialize(exp.serialize()).call(x, w), x64 @ w64)


def test_cuda_lowering_calls_kernels():
    """On CUDA the forward lowers to the detect and k-gather kernels, not to the jnp reference;
    dW by default to XLA's matmul, with no conditional (no predicate read on the host)."""
    if not pit_jax.cuda_available():
        pytest.skip("built without CUDA kernels")
    x = jax.ShapeDtypeStruct((64, 32), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((32, 16), jnp.bfloat16)
    f = lambda x, w: jnp.sum(pit_jax.sparse_dense(x, w).astype(jnp.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = jax.jit(jax.value_and_grad(f, 1)).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    for target in ("pit_detect", "pit_sparse_dense"):
        assert target in text
    assert "pit_sparse_tn" not in text and "stablehlo.case" not in text


@pytest.mark.parametrize("mode, kernel, cond", [("sparse", True, False), ("dense", False, False),
                                               ("auto", True, True)])  # device: the test below
def test_dw_mode_forces_one_path(monkeypatch, mode, kernel, cond):
    """PIT_KGATHER_DW=sparse|dense lowers dW to the kernel alone or to XLA's matmul alone; auto
    to both behind a conditional (the rule, decided on device)."""
    if not pit_jax.cuda_available():
        pytest.skip("built without CUDA kernels")
    monkeypatch.setenv("PIT_KGATHER_DW", mode)
    x = jax.ShapeDtypeStruct((64, 32), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((32, 16), jnp.bfloat16)
    f = lambda x, w: jnp.sum(pit_jax.sparse_dense(x, w).astype(jnp.float32))
    text = jax.jit(jax.grad(f, 1)).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert ("pit_sparse_tn" in text) == kernel and ("stablehlo.case" in text) == cond
    monkeypatch.setenv("PIT_KGATHER_DW", "sometimes")
    with pytest.raises(ValueError, match="PIT_KGATHER_DW"):
        jax.jit(jax.grad(f, 1)).trace(x, w).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("exact", [True, False], ids=["detected", "given"])
def test_dw_device_mode_lowers_to_the_gated_pair(monkeypatch, exact):
    """PIT_KGATHER_DW=device lowers dW to the products call without its masked fallback (on x alone,
    detecting inside, when sparse_dense detected its own 32x1 index), then the gated dense GEMM on
    dW aliased in place, with the total's offset in the products scratch; no conditional, no XLA
    matmul for dW. With the index given, the GEMM's x is masked to it."""
    if not pit_jax.cuda_available():
        pytest.skip("built without CUDA kernels")
    from pit_jax import kgather_cuda
    monkeypatch.setenv("PIT_KGATHER_DW", "device")
    monkeypatch.setattr(kgather_cuda, "gated_dense_dw_applies", lambda *a: True)  # no Hopper GPU needed to lower
    x = jax.ShapeDtypeStruct((2, 1024, 256), jnp.bfloat16)  # 64 row groups: the fused detect+pack applies
    w = jax.ShapeDtypeStruct((256, 136), jnp.bfloat16)
    if exact:
        f, args = (lambda x, w: jnp.sum(pit_jax.sparse_dense(x, w).astype(jnp.float32))), (x, w)
    else:
        f = lambda x, w, i: jnp.sum(pit_jax.sparse_dense(x, w, index=i).astype(jnp.float32))
        args = (x, w, jax.eval_shape(lambda x: pit_jax.detect(x, (32, 1)), x))
    text = jax.jit(jax.grad(f, 1)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    if exact:  # the fused detect+pack inside the products call: no separate detection left for dW
        assert "pit_sparse_tn_products_detect" in text and "masked_fallback" not in text
    else:
        assert "pit_sparse_tn_products(" in text and "masked_fallback = false" in text
    assert "pit_dense_tn_gated" in text and "output_operand_aliases" in text
    offset = kgather_cuda.products_total_offset([2], 1024, 256, 1, 2)
    assert f"gate_offset = {offset} : i64" in text
    assert "stablehlo.case" not in text and "stablehlo.dot_general" not in text.split("pit_sparse_tn_products")[1]
    assert ("stablehlo.scatter" in text) == (not exact)  # the element mask of a given index


def test_products_plan_sizes_the_scratch(monkeypatch):
    """The dW products path's plan (read when lowering): cap_rows = 2% of the (group, column)
    pairs, equal slabs of at most 1024 columns (a multiple of 128) that keep cap_rows·n_slab fp32
    within max(64 MB, an fp32 dW), and no plan where the path does not apply (fp32, > 1024 row groups, a table or a
    128-column slab over the cap, density 0) or for symbolic shapes."""
    from pit_jax.kgather_cuda import products_plan
    bf16 = jnp.bfloat16
    assert products_plan((4096, 4096), 4096, 1, bf16) == (10486, 1024)  # 4 slabs (at most 1024 columns)
    assert products_plan((4096, 4096), 2200, 1, bf16) == (10486, 768)   # 2200: 3 slabs of 768, not 1024 + 1024 + 152
    cap, slab = products_plan((4096, 16384), 4096, 1, bf16)
    assert cap == 41944 and slab % 128 == 0 and cap * slab * 4 <= 4 * 16384 * 4096
    assert products_plan((2, 150, 1100), 104, 8, jnp.float16) == (math.ceil(0.02 * 10 * 1104), 128)
    assert products_plan((4096, 4096), 4096, 1, jnp.float32) is None
    assert products_plan((32768 + 32, 64), 64, 1, bf16) is None  # 1025 row groups
    assert products_plan((32768, 16384), 256, 1, bf16) is None   # 128-column slabs over the cap
    (m,) = jax.export.symbolic_shape("m")
    assert products_plan((m, 4096), 4096, 1, bf16) is None
    monkeypatch.setenv("PIT_KGATHER_DW_PRODUCTS_DENSITY", "0")
    assert products_plan((4096, 4096), 4096, 1, bf16) is None
    monkeypatch.setenv("PIT_KGATHER_DW_PRODUCTS_DENSITY", "1.0")
    monkeypatch.setenv("PIT_KGATHER_DW_SLAB", "256")
    assert products_plan((2, 96, 256), 300, 1, bf16) == (6 * 256, 256)
    monkeypatch.setenv("PIT_KGATHER_DW_SLAB", "100")
    with pytest.raises(ValueError, match="PIT_KGATHER_DW_SLAB"):
        products_plan((2, 96, 256), 300, 1, bf16)


def test_count_occupancy_estimates_occupied_blocks():
    """The dW rule's statistic: empty and full groups exactly, uniformly spread tiles close to
    the occupied fraction of (group, 64-column) blocks counted directly."""
    from pit_jax.kgather_cuda import count_occupancy
    assert float(count_occupancy(jnp.array([0, 0, 4096, 0]), 4096, 1)) == pytest.approx(0.25)
    rng = np.random.default_rng(11)
    groups, k = 64, 4096
    for density in (0.002, 0.01, 0.05):
        listed = rng.random((groups, k)) < density
        blocks = listed.reshape(groups, k // 64, 64).any(-1)
        got = float(count_occupancy(jnp.asarray(listed.sum(-1)), k, 1))
        assert got == pytest.approx(blocks.mean(), abs=0.03)


def test_dense_dw_skips_the_mask_when_the_index_is_from_x(monkeypatch):
    """dW's dense path uses x as it is when sparse_dense detected the index from x itself (x is
    zero outside it), and masks x to the index when the caller passed one."""
    if not pit_jax.cuda_available():
        pytest.skip("built without CUDA kernels")
    monkeypatch.setenv("PIT_KGATHER_DW", "dense")
    x = jax.ShapeDtypeStruct((64, 32), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((32, 16), jnp.bfloat16)
    lower = lambda f, *a: jax.jit(jax.grad(f, 1)).trace(*a).lower(lowering_platforms=("cuda",)).as_text()
    own = lower(lambda x, w: jnp.sum(pit_jax.sparse_dense(x, w).astype(jnp.float32)), x, w)
    assert "pit_detect" in own and "stablehlo.scatter" not in own
    given = lower(lambda x, w, i: jnp.sum(pit_jax.sparse_dense(x, w, index=i).astype(jnp.float32)), x, w,
                  jax.eval_shape(lambda x: pit_jax.detect(x, (32, 1)), x))
    assert "stablehlo.scatter" in given


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("op", ["sparse_dense", "dense_sparse_dense_grad"])
def test_half_gradients_lower_to_half_gemms_on_cuda(op, dtype):
    """The dense dx of a 16-bit sparse_dense (and w's gradient under dense_sparse(grad="dense"))
    is a GEMM in that dtype on CUDA, like a dense layer's: no dot_general of fp32 operands. Until
    session 37 the tangent's fp32-accumulated product made JAX's transpose of it multiply an fp32
    cotangent by w promoted to fp32. The values (CPU path) agree with float64."""
    if not pit_jax.cuda_available():
        pytest.skip("the CUDA lowering needs the CUDA module")
    rng = np.random.default_rng(stable_seed("half_grads", op, dtype))
    if op == "sparse_dense":
        x = random_tile_sparse(rng, (256, 1024), (32, 1), 0.7, dtype)
        w = (rng.standard_normal((1024, 256)) + 0.1).astype(DTYPES[dtype])
        f = lambda x, w: pit_jax.sparse_dense(x, w)
    else:
        x = (rng.standard_normal((256, 1024)) + 0.1).astype(DTYPES[dtype])
        w = random_tile_sparse(rng, (1024, 256), (1, 32), 0.7, dtype)
        f = lambda x, w: pit_jax.dense_sparse(x, w, grad="dense")
    c = rng.standard_normal(256).astype(np.float32)
    loss = lambda x, w: 0.5 * jnp.sum(c * jnp.square(f(x, w).astype(jnp.float32)))
    hlo = jax.jit(jax.grad(loss, (0, 1))).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert dots and not any(re.search(r":\s*\(tensor<[0-9x]*xf32>, tensor<[0-9x]*xf32>\)", d) for d in dots), dots
    gx, gw = jax.jit(jax.grad(loss, (0, 1)))(x, w)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    dy = c * (x64 @ w64)
    for got, want in ((gx, dy @ w64.T), (gw, x64.T @ dy)):
        assert got.dtype == jnp.dtype(dtype)
        err = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
        assert err < 2e-2, err


def test_half_gradient_platform_choice_compiles_away(backend):
    """_dense_layer_matmul chooses its product with lax.platform_dependent: the compiled step
    for this backend keeps no conditional (the choice is a constant once lowered)."""
    x = jnp.ones((64, 128), jnp.bfloat16)
    w = jnp.ones((128, 96), jnp.bfloat16)
    loss = lambda x, w: jnp.sum(jnp.square(pit_jax.sparse_dense(x, w).astype(jnp.float32)))
    compiled = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).compile().as_text()
    assert "conditional" not in compiled
