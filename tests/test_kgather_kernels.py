"""k-gather kernels (forward and dW) against float64 on the shapes the kernels care about:
row tiles that map straight onto 32-row groups and ones that are merged, vectorised and
unaligned operands, several column tiles and k-chunks, more than one pass of row groups,
skewed and empty row blocks, and garbage outside the index. Runs on every backend. dW runs
the kernel here (PIT_KGATHER_DW=sparse) except in the test of the dW rule itself."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pit_jax
from helpers import DTYPES, broken_index, random_tile_sparse, stable_seed

TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}  # relative Frobenius error


@pytest.fixture(autouse=True)
def _dw_kernel(monkeypatch):
    """Force the dW kernel (the on-device rule would pick XLA's matmul for most of these)."""
    monkeypatch.setenv("PIT_KGATHER_DW", "sparse")


def _rel_err(got, want):
    got = np.asarray(got, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def _forward_and_dw(x, w, g, tile, index=None):
    """y = sparse_dense(x, w) and dW = ∂/∂w Σ y·g, in one jitted call."""
    def loss(w):
        y = pit_jax.sparse_dense(x, w, tile=tile, index=index)
        return jnp.sum(y.astype(jnp.float32) * g), y
    (_, y), dw = jax.jit(jax.value_and_grad(loss, has_aux=True))(w)
    return y, dw


def _references(x, w, g, mask):
    xm = np.where(mask, np.asarray(x, np.float64), 0.0)
    y = xm @ np.asarray(w, np.float64)
    k, n = xm.shape[-1], g.shape[-1]
    dw = xm.reshape(-1, k).T @ g.astype(np.float64).reshape(-1, n)
    return y, dw


def _check_dw_against_float64(seed, shape, tile, sparsity, dtype):
    """dW of sparse_dense on random tile-sparse x [b, m, k] under the dW path the environment
    chose: within TOL of float64, exactly zero at 100% sparsity and on rows no tile lists."""
    b, m, k, n = shape
    rng = np.random.default_rng(seed)
    x = random_tile_sparse(rng, (b, m, k), tile, sparsity, dtype)
    w = (rng.standard_normal((k, n)) + 0.1).astype(DTYPES[dtype])
    g = rng.standard_normal((b, m, n)).astype(np.float32)
    _, dw = _forward_and_dw(x, w, g, tile)
    _, dw_ref = _references(x, w, g, np.ones(x.shape, bool))
    if sparsity == 1.0:
        np.testing.assert_array_equal(np.asarray(dw, np.float32), 0)
    else:
        assert _rel_err(dw, dw_ref) < TOL[dtype]
    listed = np.abs(dw_ref) > 0
    assert (np.asarray(dw, np.float32)[~listed] == 0).all()


def _check_dw_given_index_with_garbage(seed):
    """dW of sparse_dense on bf16 x with NaN outside a given (32, 4) index: finite, and within
    TOL of float64 over the listed tiles."""
    rng = np.random.default_rng(seed)
    tile = (32, 4)
    x = random_tile_sparse(rng, (2, 80, 200), tile, 0.6, "bfloat16")
    idx = pit_jax.detect(x, tile)
    mask = np.asarray(idx.element_mask())
    x_garbage = np.where(mask, x, np.nan).astype(x.dtype)
    w = (rng.standard_normal((200, 136)) + 0.1).astype(DTYPES["bfloat16"])
    g = rng.standard_normal((2, 80, 136)).astype(np.float32)
    _, dw = _forward_and_dw(x_garbage, w, g, tile, index=idx)
    _, dw_ref = _references(x, w, g, mask)
    assert np.isfinite(np.asarray(dw, np.float32)).all()
    assert _rel_err(dw, dw_ref) < TOL["bfloat16"]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tile", [(32, 1), (64, 8), (32, 32), (16, 1)], ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("shape", [(2, 96, 256, 136), (1, 70, 45, 29)], ids=["aligned", "odd"])
def test_forward_and_dw_match_float64(backend, dtype, tile, sparsity, shape):
    b, m, k, n = shape
    rng = np.random.default_rng(stable_seed(dtype, tile, sparsity, shape))
    x = random_tile_sparse(rng, (b, m, k), tile, sparsity, dtype)
    w = (rng.standard_normal((k, n)) + 0.1).astype(DTYPES[dtype])
    g = rng.standard_normal((b, m, n)).astype(np.float32)
    y, dw = _forward_and_dw(x, w, g, tile)
    y_ref, dw_ref = _references(x, w, g, np.ones(x.shape, bool))
    assert y.shape == (b, m, n) and y.dtype == x.dtype and dw.shape == (k, n) and dw.dtype == w.dtype
    if sparsity == 1.0:
        np.testing.assert_array_equal(np.asarray(y, np.float32), 0)
        np.testing.assert_array_equal(np.asarray(dw, np.float32), 0)
    else:
        assert _rel_err(y, y_ref) < TOL[dtype]
        assert _rel_err(dw, dw_ref) < TOL[dtype]


@pytest.mark.parametrize("tile", [(32, 4), (8, 2)], ids=str)
def test_garbage_outside_index_is_never_read(backend, tile):
    """NaN outside the listed micro-tiles must not reach y or dW (the kernels skip or zero it)."""
    rng = np.random.default_rng(3)
    x = random_tile_sparse(rng, (2, 80, 72), tile, 0.6, "bfloat16")
    idx = pit_jax.detect(x, tile)
    mask = np.asarray(idx.element_mask())
    noisy = np.where(mask, x, np.nan).astype(x.dtype)
    w = (rng.standard_normal((72, 40)) + 0.1).astype(x.dtype)
    g = rng.standard_normal((2, 80, 40)).astype(np.float32)
    y, dw = _forward_and_dw(noisy, w, g, tile, index=idx)
    y_ref, dw_ref = _references(x, w, g, mask)
    assert np.isfinite(np.asarray(y, np.float32)).all() and np.isfinite(np.asarray(dw, np.float32)).all()
    assert _rel_err(y, y_ref) < TOL["bfloat16"] and _rel_err(dw, dw_ref) < TOL["bfloat16"]


def test_many_row_groups_and_skewed_blocks(backend):
    """More than 1024 row groups (several passes of the dW kernel); one dense row block among
    empty ones; long gathered rows (many k-chunks)."""
    rng = np.random.default_rng(4)
    x = random_tile_sparse(rng, (24, 1400, 48), (32, 1), 0.7, "float16")
    w = (rng.standard_normal((48, 24)) + 0.1).astype(np.float16)
    g = rng.standard_normal((24, 1400, 24)).astype(np.float32)
    y, dw = _forward_and_dw(x, w, g, (32, 1))
    y_ref, dw_ref = _references(x, w, g, np.ones(x.shape, bool))
    assert _rel_err(y, y_ref) < TOL["float16"] and _rel_err(dw, dw_ref) < TOL["float16"]

    skew = np.zeros((256, 1000), np.float32)
    skew[64:96] = rng.standard_normal((32, 1000))
    w2 = rng.standard_normal((1000, 264)).astype(np.float32)
    g2 = rng.standard_normal((256, 264)).astype(np.float32)
    y, dw = _forward_and_dw(skew, w2, g2, (32, 1))
    y_ref, dw_ref = _references(skew, w2, g2, np.ones(skew.shape, bool))
    assert _rel_err(y, y_ref) < TOL["float32"] and _rel_err(dw, dw_ref) < TOL["float32"]
    np.testing.assert_array_equal(np.asarray(y)[:64], 0)


def test_dense_sparse_through_kernels(backend):
    """dense_sparse runs the same kernels on the transposed problem."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3, 50, 128)) + 0.1).astype(np.float32)
    w = random_tile_sparse(rng, (128, 96), (1, 32), 0.8, "float32")
    g = rng.standard_normal((3, 50, 96)).astype(np.float32)
    f = lambda x, w: jnp.sum(pit_jax.dense_sparse(x, w, tile=(1, 32)) * g)
    gx, gw = jax.jit(jax.grad(f, (0, 1)))(x, w)
    np.testing.assert_allclose(np.asarray(pit_jax.dense_sparse(x, w, tile=(1, 32))), x @ w, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gx), g @ w.T, rtol=1e-5, atol=1e-4)
    mask = np.asarray(pit_jax.detect(w, (1, 32)).element_mask())
    np.testing.assert_allclose(np.asarray(gw), np.einsum("bmk,bmn->kn", x, g) * mask, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("tile,sparsity", [((32, 1), 0.5), ((32, 1), 0.97), ((32, 8), 0.6), ((64, 3), 0.9)], ids=str)
def test_dw_over_many_column_blocks(backend, dtype, tile, sparsity):
    """dW where K spans many of the dW kernel's column masks and tiles (1100 columns; a column
    block cut by K for tile_k 8 and 3), one row group dense and one empty, N not a multiple of
    the column tile. Unlisted columns' rows of dW must be exactly zero. (Session 33 also ran it
    against a packed dW kernel, not kept: benchmarks/results/2026-11-29_session33/.)"""
    rng = np.random.default_rng(stable_seed("ranges", dtype, tile, sparsity))
    x = random_tile_sparse(rng, (2, 150, 1100), tile, sparsity, dtype)
    x[0, :32] = (rng.standard_normal((32, 1100)) + 0.1).astype(x.dtype)
    x[1, 64:128] = 0
    w = (rng.standard_normal((1100, 100)) + 0.1).astype(DTYPES[dtype])
    g = rng.standard_normal((2, 150, 100)).astype(np.float32)
    y, dw = _forward_and_dw(x, w, g, tile)
    y_ref, dw_ref = _references(x, w, g, np.ones(x.shape, bool))
    assert _rel_err(y, y_ref) < TOL[dtype] and _rel_err(dw, dw_ref) < TOL[dtype]
    listed = np.abs(dw_ref) > 0
    assert (np.asarray(dw, np.float32)[~listed] == 0).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("tile", [(32, 1), (64, 8), (16, 1), (32, 32)], ids=str)
@pytest.mark.parametrize("sparsity", [0.5, 0.97, 1.0])
@pytest.mark.parametrize("shape", [(2, 96, 256, 300), (1, 64, 512, 256), (1, 70, 45, 29)],
                         ids=["slabs", "aligned", "odd"])
def test_dw_products_path_matches_float64(backend, monkeypatch, dtype, tile, sparsity, shape):
    """The products path of the dW kernel (kgather_dw_products.cuh), forced for every density and
    cut into 128-column slabs (300 columns: three slabs, the last partial; 256: two, in 16-byte
    vectors): against float64,
    unlisted rows of dW exactly zero, dW poisoned before the call by the handler."""
    if backend == "cpu":
        pytest.skip("the products path is a CUDA kernel (the CPU path is the reference)")
    monkeypatch.setenv("PIT_KGATHER_DW_PRODUCTS_DENSITY", "1.0")
    monkeypatch.setenv("PIT_KGATHER_DW_SLAB", "128")
    _check_dw_against_float64(stable_seed("products", dtype, tile, sparsity, shape), shape, tile, sparsity, dtype)


@pytest.mark.parametrize("density_cap", ["0.02", "1.0"])
def test_dw_products_path_cap_and_garbage(backend, monkeypatch, density_cap):
    """With a cap below the index's density the masked kernel computes dW (the device picks);
    with the cap above it the products path does. Either way NaN outside the index never reaches
    dW, and both give the same float64-checked result."""
    if backend == "cpu":
        pytest.skip("the products path is a CUDA kernel (the CPU path is the reference)")
    monkeypatch.setenv("PIT_KGATHER_DW_PRODUCTS_DENSITY", density_cap)
    _check_dw_given_index_with_garbage(11)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("tile", [(32, 1), (64, 8), (16, 1)], ids=str)
@pytest.mark.parametrize("sparsity", [0.5, 0.97, 1.0])
@pytest.mark.parametrize("branch", ["products", "dense"])
@pytest.mark.parametrize("shape", [(2, 96, 256, 392), (1, 70, 48, 24), (2, 1030, 200, 136)],
                         ids=["slabs", "odd_m", "fused"])
def test_dw_device_mode_matches_float64(backend, monkeypatch, dtype, tile, sparsity, branch, shape):
    """PIT_KGATHER_DW=device: the products path, or the gated dense GEMM when the index lists more
    than the products cap (the device picks; the cap forces each branch here). Against float64,
    unlisted rows of dW exactly zero; the products call poisons dW first, so the dense branch
    must overwrite all of it. The "dense" cap (1e-9 of the pairs: one row) forces the GEMM wherever
    the index lists more than one column; at 100% sparsity nothing is listed and the products
    path writes the zeros. "fused" has 66 row groups, so with 32x1 tiles the products call
    detects and packs x itself (pit_sparse_tn_products_detect; the last group partial)."""
    if backend == "cpu":
        pytest.skip("PIT_KGATHER_DW=device pairs two CUDA kernels (the CPU path is the reference)")
    if not pit_jax.kgather_cuda.gated_dense_dw_applies(DTYPES[dtype], shape[0] * shape[1], shape[2], shape[3]):
        pytest.skip("the gated dense dW needs a CUTLASS build and a compute capability 9 GPU")
    monkeypatch.setenv("PIT_KGATHER_DW", "device")
    monkeypatch.setenv("PIT_KGATHER_DW_PRODUCTS_DENSITY", "1.0" if branch == "products" else "1e-9")
    monkeypatch.setenv("PIT_KGATHER_DW_SLAB", "128")
    _check_dw_against_float64(stable_seed("device", dtype, tile, sparsity, branch, shape), shape, tile, sparsity,
                              dtype)


@pytest.mark.parametrize("branch", ["products", "dense"])
def test_dw_device_mode_given_index_with_garbage(backend, monkeypatch, branch):
    """With the index passed in (x not zero outside it: NaN there), both branches of
    PIT_KGATHER_DW=device keep to the listed tiles: the dense GEMM runs on x masked to them."""
    if backend == "cpu":
        pytest.skip("PIT_KGATHER_DW=device pairs two CUDA kernels (the CPU path is the reference)")
    if not pit_jax.kgather_cuda.gated_dense_dw_applies(np.dtype(jnp.bfloat16), 160, 200, 136):
        pytest.skip("the gated dense dW needs a CUTLASS build and a compute capability 9 GPU")
    monkeypatch.setenv("PIT_KGATHER_DW", "device")
    monkeypatch.setenv("PIT_KGATHER_DW_PRODUCTS_DENSITY", "1.0" if branch == "products" else "1e-9")
    _check_dw_given_index_with_garbage(12)


@pytest.mark.parametrize("call", ["products", "products_detect"])
def test_products_total_sits_at_the_gate_offset(backend, call):
    """pit_dense_tn_gated reads the products call's index total at products_total_offset of its
    scratch: the int32 there is the number of listed (row group, column) pairs, for both products
    targets. (A wrong offset would not change dW, only run the dense GEMM every time.)"""
    if backend == "cpu":
        pytest.skip("the products path is a CUDA kernel (the CPU path is the reference)")
    from pit_jax import kgather_cuda as kc
    rng = np.random.default_rng(14)
    b, m, k, n = 2, 1030, 200, 136  # 66 row groups of 32, the last partial
    x = random_tile_sparse(rng, (b, m, k), (32, 1), 0.9, "bfloat16")
    dy = rng.standard_normal((b, m, n)).astype(DTYPES["bfloat16"])
    cap_rows, n_slab = 1 << 20, 128
    pws = kc.products_workspace_bytes([b], m, k, 1, 2, cap_rows, n_slab)
    if call == "products":
        idx = pit_jax.detect(x, (32, 1))
        f = jax.jit(lambda x, dy, c, i: jax.ffi.ffi_call(
            "pit_sparse_tn_products", (jax.ShapeDtypeStruct((k, n), x.dtype), jax.ShapeDtypeStruct((pws,), jnp.uint8)))(
            x, dy, c, i, tile_m=np.int64(32), tile_k=np.int64(1), cap_rows=np.int64(cap_rows),
            n_slab=np.int64(n_slab), masked_fallback=False))
        _, ws = f(x, dy, idx.counts, idx.indices)
    else:
        f = jax.jit(lambda x, dy: jax.ffi.ffi_call(
            "pit_sparse_tn_products_detect",
            (jax.ShapeDtypeStruct((k, n), x.dtype), jax.ShapeDtypeStruct((pws + 4 * b * 33,), jnp.uint8)))(
            x, dy, cap_rows=np.int64(cap_rows), n_slab=np.int64(n_slab)))
        _, ws = f(x, dy)
    offset = kc.products_total_offset([b], m, k, 1, 2)
    total = int(np.asarray(ws)[offset:offset + 4].view(np.int32)[0])
    rows = np.pad(np.asarray(x, np.float32) != 0, ((0, 0), (0, 33 * 32 - m), (0, 0)))
    listed = rows.reshape(b, 33, 32, k).any(axis=2).sum()
    assert total == listed > 0


def test_dw_device_mode_warns_where_it_cannot_serve(backend, monkeypatch):
    """PIT_KGATHER_DW=device on shapes the gated GEMM does not take (N = 29, not a multiple of 8)
    or on fp32 (no products plan) says so and computes the dense dW."""
    monkeypatch.setenv("PIT_KGATHER_DW", "device")
    rng = np.random.default_rng(13)
    for dtype, n in (("bfloat16", 29), ("float32", 32)):
        x = random_tile_sparse(rng, (64, 48), (32, 1), 0.9, dtype)
        w = (rng.standard_normal((48, n)) + 0.1).astype(DTYPES[dtype])
        g = rng.standard_normal((64, n)).astype(np.float32)
        if backend == "gpu":
            with pytest.warns(UserWarning, match="PIT_KGATHER_DW=device"):
                _, dw = _forward_and_dw(x, w, g, (32, 1))
        else:  # the CPU lowering is the reference: no device mode to speak of
            _, dw = _forward_and_dw(x, w, g, (32, 1))
        _, dw_ref = _references(x, w, g, np.ones(x.shape, bool))
        assert _rel_err(dw, dw_ref) < TOL[dtype]


@pytest.mark.parametrize("pattern", ["row_groups", "random"])
def test_dw_rule_matches_float64(backend, monkeypatch, pattern):
    """The on-device dW rule (PIT_KGATHER_DW=auto): row-structured sparsity (2 of 16 row groups
    nonzero: the kernel) and random tiles (most column blocks occupied: XLA's matmul on the
    masked x) both give xᵀ·dy over the listed tiles."""
    monkeypatch.setenv("PIT_KGATHER_DW", "auto")
    rng = np.random.default_rng(6)
    if pattern == "row_groups":
        x = np.zeros((512, 192), np.float32)
        x[64:96] = rng.standard_normal((32, 192))
        x[320:352] = rng.standard_normal((32, 192))
        x = x.astype(np.float16)
    else:
        x = random_tile_sparse(rng, (512, 192), (32, 1), 0.7, "float16")
    w = (rng.standard_normal((192, 72)) + 0.1).astype(np.float16)
    g = rng.standard_normal((512, 72)).astype(np.float32)
    y, dw = _forward_and_dw(x, w, g, (32, 1))
    y_ref, dw_ref = _references(x, w, g, np.ones(x.shape, bool))
    assert _rel_err(y, y_ref) < TOL["float16"] and _rel_err(dw, dw_ref) < TOL["float16"]


# ---- pit_sparse_nt: x's masked cotangent, dense_sparse(grad="masked")'s weight gradient ------------

def _nt(dy, w, index, tile):
    from pit_jax.kgather import sparse_nt_p
    params = dict(shape=tuple(index.shape), tile=tuple(tile), layout="row")
    return sparse_nt_p.bind(dy, w, index.counts, index.offsets, index.indices, **params)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tile", [(32, 1), (64, 8), (32, 32), (16, 1), (8, 3)], ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("shape", [(2, 96, 300, 136), (1, 70, 45, 29), (1, 65, 130, 8), (1, 64, 96, 300),
                                   (2, 70, 70, 520)], ids=["aligned", "odd", "thin", "long_odd", "long"])
def test_sparse_nt_matches_float64(backend, dtype, tile, sparsity, shape):
    """(dy @ wᵀ) on the index's tiles, exactly zero elsewhere; several 64-column CTAs per group,
    16-byte and element copies (N = 136 / 29; 300 is whole vectors for fp32 only), contractions
    that wrap the 3-stage ring (N = 300, 520), partial row groups, merged row tiles."""
    b, m, k, n = shape
    rng = np.random.default_rng(stable_seed("nt", dtype, tile, sparsity, shape))
    x = random_tile_sparse(rng, (b, m, k), tile, sparsity, dtype)
    index = pit_jax.detect(x, tile)
    dy = (rng.standard_normal((b, m, n)) + 0.1).astype(DTYPES[dtype])
    w = (rng.standard_normal((k, n)) - 0.1).astype(DTYPES[dtype])
    out = jax.jit(lambda dy, w, index: _nt(dy, w, index, tile))(dy, w, index)
    assert out.shape == (b, m, k) and out.dtype == dy.dtype
    mask = np.asarray(index.element_mask())
    want = np.where(mask, np.asarray(dy, np.float64) @ np.asarray(w, np.float64).T, 0.0)
    got = np.asarray(out, np.float64)
    assert (got[~mask] == 0).all()
    if sparsity == 1.0:
        assert not mask.any()
    else:
        assert _rel_err(got, want) < TOL[dtype]


def test_sparse_nt_autodiff_and_vmap(backend):
    """jvp, both cotangents (dy_bar = (M ⊙ g) w, w_bar = Σ (M ⊙ g)ᵀ dy) and vmap over dy."""
    rng = np.random.default_rng(21)
    tile = (32, 4)
    x = random_tile_sparse(rng, (2, 64, 72), tile, 0.6, "float32")
    index = pit_jax.detect(x, tile)
    mask = np.asarray(index.element_mask())
    dy = rng.standard_normal((2, 64, 40)).astype(np.float32)
    w = rng.standard_normal((72, 40)).astype(np.float32)
    g = rng.standard_normal((2, 64, 72)).astype(np.float32)
    f = lambda dy, w: _nt(dy, w, index, tile)
    gdy, gw = jax.jit(jax.grad(lambda dy, w: jnp.sum(f(dy, w) * g), (0, 1)))(dy, w)
    mg = np.where(mask, g, 0.0)
    np.testing.assert_allclose(np.asarray(gdy), mg @ w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gw), np.einsum("bmk,bmn->kn", mg, dy), rtol=1e-4, atol=1e-4)
    ddy, dw = rng.standard_normal(dy.shape).astype(np.float32), rng.standard_normal(w.shape).astype(np.float32)
    _, tangent = jax.jvp(f, (dy, w), (ddy, dw))
    np.testing.assert_allclose(np.asarray(tangent), np.where(mask, ddy @ w.T + dy @ dw.T, 0.0), rtol=1e-4, atol=1e-4)
    batched = jax.vmap(lambda d: _nt(d, w, pit_jax.detect(x, tile), tile))(np.stack([dy, 2 * dy]))
    for i in range(2):
        np.testing.assert_allclose(np.asarray(batched[i]), (i + 1) * np.where(mask, dy @ w.T, 0.0), rtol=1e-4, atol=1e-4)
    ws = np.stack([w, -0.5 * w])  # a batch of w: one product per w (the mapped path)
    per_w = jax.vmap(lambda w_: _nt(dy, w_, index, tile))(ws)
    for i in range(2):
        np.testing.assert_allclose(np.asarray(per_w[i]), np.where(mask, dy @ ws[i].T, 0.0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_sparse_masked_grad_skips_dense_matmul(backend, dtype):
    """grad="masked" lowers w's gradient to pit_sparse_nt (no dense matmul for it) and matches float64."""
    rng = np.random.default_rng(stable_seed("ds_nt", dtype))
    x = (rng.standard_normal((3, 50, 128)) + 0.1).astype(DTYPES[dtype])
    w = random_tile_sparse(rng, (128, 96), (1, 32), 0.8, dtype)
    g = rng.standard_normal((3, 50, 96)).astype(np.float32)
    loss = lambda w: jnp.sum(pit_jax.dense_sparse(x, w, tile=(1, 32)).astype(jnp.float32) * g)
    if pit_jax.cuda_available():  # the CPU path is the jnp reference, so look at the CUDA lowering
        hlo = jax.jit(jax.grad(loss)).trace(w).lower(lowering_platforms=("cuda",)).as_text()
        assert "pit_sparse_nt" in hlo and hlo.count("dot_general") == 0
    gw = jax.jit(jax.grad(loss))(w)
    mask = np.asarray(pit_jax.detect(w, (1, 32)).element_mask())
    want = np.einsum("bmk,bmn->kn", np.asarray(x, np.float64), g) * mask
    assert _rel_err(gw, want) < TOL[dtype]


def _dense_sparse_step(x, w, g, tile, index, grad):
    """y = dense_sparse(x, w), dx and dw of Σ y·g, in one jitted call (a fresh function, so the
    environment's switches are read when it lowers)."""
    def loss(x, w):
        y = pit_jax.dense_sparse(x, w, tile=tile, index=index, grad=grad)
        return jnp.sum(y.astype(jnp.float32) * g), y
    (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x, w)
    return y, dx, dw


_TPACK_SHAPES = [(2, 40, 136, 256), (1, 33, 70, 75), (1, 8, 512, 1000)]
_TPACK_CASES = (  # (mode, dtype, tile, sparsity, shape): the default mode over the whole grid, the others on bf16
    [("1", d, t, sp, sh) for d in DTYPES for t in [(1, 32), (1, 8), (3, 64)] for sp in [0.0, 0.5, 0.97, 1.0]
     for sh in _TPACK_SHAPES]
    + [(mode, "bfloat16", (1, 32), 0.5, sh) for mode in ["given", "0"] for sh in _TPACK_SHAPES])


@pytest.mark.parametrize("mode,dtype,tile,sparsity,shape", _TPACK_CASES, ids=str)
@pytest.mark.parametrize("given", [False, True], ids=["detected", "given"])
def test_dense_sparse_transposed_pack_matches_float64(backend, monkeypatch, mode, dtype, tile, sparsity, shape, given):
    """dense_sparse passes w itself to the kernels (the sparse operand is wᵀ; pack reads w's rows
    in place, PIT_KGATHER_TRANSPOSED_PACK=1, the default), or a transposed copy (0; "given": the
    copy for a detected index only). Forward and both gradients against float64: N not a multiple
    of 32 or of 8 (pack's partial and unaligned runs), logical row tiles merged into 32-row groups
    ((1, 8) -> 8-row tiles) or taken whole ((3, 64)), a batch of x, outputs poisoned first."""
    monkeypatch.setenv("PIT_KGATHER_TRANSPOSED_PACK", mode)
    b, m, k, n = shape
    rng = np.random.default_rng(stable_seed("ds_tpack", mode, dtype, tile, sparsity, shape, given))
    x = (rng.standard_normal((b, m, k)) + 0.1).astype(DTYPES[dtype])
    w = random_tile_sparse(rng, (k, n), tile, sparsity, dtype)
    g = rng.standard_normal((b, m, n)).astype(np.float32)
    index = pit_jax.detect(w, (min(tile[0], k), min(tile[1], n))) if given else None
    mask = np.asarray(pit_jax.detect(w, (min(tile[0], k), min(tile[1], n))).element_mask())
    y, dx, dw = _dense_sparse_step(x, w, g, tile, index, "masked")
    x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
    y_ref = x64 @ w64
    dw_ref = np.einsum("bmk,bmn->kn", x64, g64) * mask
    if sparsity == 1.0:
        np.testing.assert_array_equal(np.asarray(y, np.float32), 0)
        np.testing.assert_array_equal(np.asarray(dw, np.float32), 0)
    else:
        assert _rel_err(y, y_ref) < TOL[dtype] and _rel_err(dw, dw_ref) < TOL[dtype]
    assert (np.asarray(dw, np.float32)[~mask] == 0).all()
    assert _rel_err(dx, g64 @ w64.T) < TOL[dtype] or sparsity == 1.0


@pytest.mark.parametrize("mode,copies", [("1", False), ("0", True)])
def test_dense_sparse_transposed_pack_lowering(mode, copies, monkeypatch):
    """With the transposed pack the CUDA lowering hands w to pit_sparse_dense as it is (no
    transpose of w before the call); with PIT_KGATHER_TRANSPOSED_PACK=0 it makes the copy."""
    if not pit_jax.cuda_available():
        pytest.skip("the CUDA lowering needs the CUDA module")
    monkeypatch.setenv("PIT_KGATHER_TRANSPOSED_PACK", mode)
    x = jnp.ones((64, 128), jnp.bfloat16)
    w = jnp.ones((128, 96), jnp.bfloat16)
    index = pit_jax.detect(w, (1, 32))
    hlo = jax.jit(lambda x, w: pit_jax.dense_sparse(x, w, index=index)).trace(x, w).lower(
        lowering_platforms=("cuda",)).as_text()
    call = [line for line in hlo.splitlines() if "pit_sparse_dense" in line and "custom_call" in line]
    assert len(call) == 1 and ("x_transposed = true" in call[0]) != copies
    # the first operand of the call is w itself (%arg1) or a transpose of it
    assert ("stablehlo.transpose %arg1" in hlo) == copies


def test_transposed_pack_switch_rejects_unknown_values(monkeypatch):
    if not pit_jax.cuda_available():
        pytest.skip("the CUDA lowering needs the CUDA module")
    monkeypatch.setenv("PIT_KGATHER_TRANSPOSED_PACK", "yes")
    x = jnp.ones((64, 128), jnp.bfloat16)
    w = jnp.ones((128, 96), jnp.bfloat16)
    with pytest.raises(ValueError, match="PIT_KGATHER_TRANSPOSED_PACK"):
        jax.jit(lambda x, w: pit_jax.dense_sparse(x, w)).trace(x, w).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tile", [(1, 32), (1, 8)], ids=str)
@pytest.mark.parametrize("n", [75, 256])
def test_dense_sparse_transposed_pack_under_vmap_of_w(backend, dtype, tile, n):
    """A batch of weights under vmap: the transposed operand gets a leading batch dim (pack's batch
    offsets over w's [B, K, N] buffer), each member with its own detected index; forward and the
    gradients of Σ c·y with respect to x and the batch of w (masked), against float64."""
    rng = np.random.default_rng(stable_seed("ds_tpack_vmap", dtype, tile, n))
    x = (rng.standard_normal((2, 24, 136)) + 0.1).astype(DTYPES[dtype])
    ws = np.stack([random_tile_sparse(rng, (136, n), tile, sp, dtype) for sp in (0.3, 0.9, 1.0)])
    c = rng.standard_normal((3, 2, 24, n)).astype(np.float32)
    f = jax.vmap(lambda w: pit_jax.dense_sparse(x, w, tile=tile))
    ys = jax.jit(f)(ws)
    loss = lambda x_, ws_: jnp.sum(c * jax.vmap(lambda w: pit_jax.dense_sparse(x_, w, tile=tile))(ws_)
                                   .astype(jnp.float32))
    gx, gws = jax.jit(jax.grad(loss, (0, 1)))(x, ws)
    x64 = np.asarray(x, np.float64)
    gx_want = np.zeros_like(x64)
    for i in range(len(ws)):
        w64 = np.asarray(ws[i], np.float64)
        mask = np.asarray(pit_jax.detect(ws[i], tile).element_mask())
        gx_want += c[i] @ w64.T
        gw_want = np.einsum("bmk,bmn->kn", x64, c[i]) * mask
        if i == 2:
            np.testing.assert_array_equal(np.asarray(ys[i], np.float32), 0)
            np.testing.assert_array_equal(np.asarray(gws[i], np.float32), 0)
        else:
            assert _rel_err(ys[i], x64 @ w64) < TOL[dtype]
            assert _rel_err(gws[i], gw_want) < TOL[dtype]
    assert _rel_err(gx, gx_want) < TOL[dtype]


_EPILOGUE_SHAPES = [(2, 40, 136, 75), (1, 33, 70, 256), (1, 8, 512, 1000)]  # (b, m, k, n)
_EPILOGUE_PATHS = ["sparse_dense", "sparse_dense_fused", "sparse_dense_given", "dense_sparse", "dense_sparse_given",
                   "dense_sparse_copy"]


def _epilogue_env(path, monkeypatch):
    """sparse_dense_fused: the fused detect+pack target at any group count (where x's rows are whole
    16-byte vectors: not K = 70 in 16-bit); dense_sparse_copy: w's transposed copy, then that fused
    target with the output transposed (PIT_KGATHER_TRANSPOSED_PACK=0)."""
    if path in ("sparse_dense_fused", "dense_sparse_copy"):
        monkeypatch.setenv("PIT_KGATHER_FUSED_MIN_GROUPS", "1")
    if path == "dense_sparse_copy":
        monkeypatch.setenv("PIT_KGATHER_TRANSPOSED_PACK", "0")


def _epilogue_call(path, x, w, bias):
    """The op on `path` with a bias: sparse_dense with its own index (separate kernels below 64
    groups), the fused detect+pack kernel (its group threshold lowered), a given index; dense_sparse,
    whose kernel writes y transposed back to y's layout."""
    if path.startswith("sparse_dense"):
        index = pit_jax.detect(x, (min(32, x.shape[-2]), 1)) if path.endswith("given") else None
        return pit_jax.sparse_dense(x, w, bias=bias, index=index)
    index = pit_jax.detect(w, (1, 32)) if path.endswith("given") else None
    return pit_jax.dense_sparse(x, w, bias=bias, index=index)


@pytest.mark.parametrize("shape", _EPILOGUE_SHAPES, ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("path", _EPILOGUE_PATHS)
def test_bias_epilogue_matches_float64(backend, monkeypatch, path, dtype, sparsity, shape):
    """y = x @ w + bias with the bias added in the forward kernel's epilogue (and, for dense_sparse,
    y written in its own layout by the kernel that computes yᵀ), against float64: N not a multiple
    of 8 (the transposed store's scalar tail) or of 128, every tile zero (y is the bias alone),
    outputs poisoned first (conftest); gradients of x, w and the bias. The forward alone (no AD)
    as well: under differentiation dense_sparse's kernel writes yᵀ and XLA transposes it, so only
    the plain call reaches the kernel's transposed store with the bias."""
    _epilogue_env(path, monkeypatch)
    b, m, k, n = shape
    rng = np.random.default_rng(stable_seed("bias_epilogue", path, dtype, sparsity, shape))
    if path.startswith("sparse_dense"):
        x = random_tile_sparse(rng, (b, m, k), (32, 1), sparsity, dtype)
        w = (rng.standard_normal((k, n)) + 0.1).astype(DTYPES[dtype])
        mask = np.ones((k, n), bool)
    else:
        x = (rng.standard_normal((b, m, k)) + 0.1).astype(DTYPES[dtype])
        w = random_tile_sparse(rng, (k, n), (1, 32), sparsity, dtype)
        mask = np.asarray(pit_jax.detect(w, (1, 32)).element_mask())
    bias = (rng.standard_normal(n) + 0.5).astype(DTYPES[dtype])
    g = rng.standard_normal((b, m, n)).astype(np.float32)

    def loss(x, w, bias):
        y = _epilogue_call(path, x, w, bias)
        return jnp.sum(y.astype(jnp.float32) * g), y

    (_, y), (gx, gw, gb) = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(x, w, bias)
    y_plain = jax.jit(lambda x, w, bias: _epilogue_call(path, x, w, bias))(x, w, bias)
    x64, w64, b64, g64 = (np.asarray(a, np.float64) for a in (x, w, bias, g))
    for got in (y, y_plain):
        assert got.shape == (b, m, n) and got.dtype == x.dtype
        assert _rel_err(got, x64 @ w64 + b64) < TOL[dtype]
    assert _rel_err(gb, g64.sum(axis=(0, 1))) < TOL[dtype]
    assert _rel_err(gx, g64 @ w64.T) < TOL[dtype]
    if sparsity < 1.0:
        assert _rel_err(gw, np.einsum("bmk,bmn->kn", x64, g64) * mask) < TOL[dtype]
    else:  # x all zero (sparse_dense), or w's every tile pruned (dense_sparse's masked gradient)
        np.testing.assert_array_equal(np.asarray(gw, np.float32), 0)


@pytest.mark.parametrize("path", _EPILOGUE_PATHS)
def test_bias_epilogue_under_vmap(backend, monkeypatch, path):
    """vmap over a batch of x with one bias, and over a batch of biases with one x (one product
    per bias), against float64."""
    _epilogue_env(path, monkeypatch)
    rng = np.random.default_rng(stable_seed("bias_vmap", path))
    if path.startswith("sparse_dense"):
        xs = random_tile_sparse(rng, (3, 40, 96), (32, 1), 0.6, "bfloat16")
        w = (rng.standard_normal((96, 72)) + 0.1).astype(DTYPES["bfloat16"])
    else:
        xs = (rng.standard_normal((3, 40, 96)) + 0.1).astype(DTYPES["bfloat16"])
        w = random_tile_sparse(rng, (96, 72), (1, 32), 0.6, "bfloat16")
    biases = (rng.standard_normal((2, 72)) + 0.5).astype(DTYPES["bfloat16"])
    f = lambda x, bias: _epilogue_call(path, x, w, bias)
    w64 = np.asarray(w, np.float64)
    y = jax.jit(jax.vmap(f, in_axes=(0, None)))(xs, biases[0])
    assert _rel_err(y, np.asarray(xs, np.float64) @ w64 + np.asarray(biases[0], np.float64)) < TOL["bfloat16"]
    y = jax.jit(jax.vmap(f, in_axes=(None, 0)))(xs[0], biases)
    want = (np.asarray(xs[0], np.float64) @ w64)[None] + np.asarray(biases, np.float64)[:, None, :]
    assert y.shape == (2, 40, 72) and _rel_err(y, want) < TOL["bfloat16"]


def test_bias_is_checked():
    """A bias of the wrong shape, dtype or type is refused at trace time, naming the argument."""
    x = jnp.ones((64, 128), jnp.bfloat16)
    w = jnp.ones((128, 96), jnp.bfloat16)
    for op in (pit_jax.sparse_dense, pit_jax.dense_sparse):
        with pytest.raises(ValueError, match=r"bias must have shape \(96,\)"):
            op(x, w, bias=jnp.ones((95,), jnp.bfloat16))
        with pytest.raises(ValueError, match=r"bias must have shape"):
            op(x, w, bias=jnp.ones((1, 96), jnp.bfloat16))
        with pytest.raises(TypeError, match="bias must have x's dtype"):
            op(x, w, bias=jnp.ones((96,), jnp.float32))
        with pytest.raises(TypeError, match="bias must be an array"):
            op(x, w, bias=[1.0] * 96)
    with pytest.raises(ValueError, match=r"bias must have shape"):
        pit_jax.sparse_dense(x, w, bias=jnp.ones((95,), jnp.bfloat16), tile="auto")


@pytest.mark.parametrize("op", ["sparse_dense", "dense_sparse"])
def test_bias_and_layout_in_the_kernel_on_cuda(op):
    """On CUDA the bias is an operand of the forward's custom call and nothing adds to or
    transposes its result: dense_sparse's kernel writes y (not yᵀ) with the bias added."""
    if not pit_jax.cuda_available():
        pytest.skip("the CUDA lowering needs the CUDA module")
    x = jnp.ones((4096, 256), jnp.bfloat16)  # 128 groups: sparse_dense takes the fused detect+pack target
    w = jnp.ones((256, 96), jnp.bfloat16)
    bias = jnp.ones((96,), jnp.bfloat16)
    f = getattr(pit_jax, op)
    hlo = jax.jit(lambda x, w, b: f(x, w, bias=b)).trace(x, w, bias).lower(lowering_platforms=("cuda",)).as_text()
    target = "pit_sparse_dense_detect" if op == "sparse_dense" else "pit_sparse_dense"
    calls = [line for line in hlo.splitlines() if f"@{target}(" in line]
    assert len(calls) == 1 and "%arg2" in calls[0], calls  # the bias goes in as it is
    assert ("y_transposed = true" in calls[0]) == (op == "dense_sparse")
    result = calls[0].split("=")[0].strip().split(":")[0]  # %N
    users = [line for line in hlo.splitlines() if f"{result}#0" in line and "custom_call" not in line]
    assert all("stablehlo.add" not in u and "stablehlo.transpose" not in u for u in users), users


def test_dense_sparse_under_grad_keeps_the_kernel_layout_on_cuda():
    """Under differentiation dense_sparse's forward writes yᵀ and XLA transposes it with the bias
    (the backward consumes dyᵀ, which XLA then computes in that layout); without AD the kernel
    writes y itself. docs/kgather.md, "Session 38", has the step and forward times behind this."""
    if not pit_jax.cuda_available():
        pytest.skip("the CUDA lowering needs the CUDA module")
    x = jnp.ones((256, 128), jnp.bfloat16)
    w = jnp.ones((128, 96), jnp.bfloat16)
    bias = jnp.ones((96,), jnp.bfloat16)
    loss = lambda x, w, b: jnp.sum(jnp.square(pit_jax.dense_sparse(x, w, bias=b).astype(jnp.float32)))
    hlo = jax.jit(jax.grad(loss, (0, 1, 2))).trace(x, w, bias).lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in hlo.splitlines() if "@pit_sparse_dense(" in line]
    assert calls and all("y_transposed = false" in c for c in calls), calls


@pytest.mark.parametrize("tile", [(32, 1), (64, 8)], ids=str)
def test_nt_kernel_stays_in_bounds_on_broken_counts(backend, tile):
    """pit_sparse_nt bound directly on an index with counts past n_inner and out-of-range ids (the
    public ops rebuild or merge such an index before it reaches this kernel): (dy @ wᵀ) on the
    in-range ids' tiles, zero elsewhere. Run under compute-sanitizer on the GPU."""
    rng = np.random.default_rng(stable_seed("nt_broken", tile))
    x = random_tile_sparse(rng, (2, 70, 45), tile, 0.5, "bfloat16")
    broken, kept = broken_index(pit_jax.detect(x, tile), rng)
    dy = (rng.standard_normal((2, 70, 37)) + 0.1).astype(DTYPES["bfloat16"])
    w = (rng.standard_normal((45, 37)) - 0.1).astype(DTYPES["bfloat16"])
    got = np.asarray(jax.jit(lambda dy, w, i: _nt(dy, w, i, tile))(dy, w, broken), np.float64)
    want = np.where(kept, np.asarray(dy, np.float64) @ np.asarray(w, np.float64).T, 0.0)
    assert (got[~kept] == 0).all() and _rel_err(got, want) < TOL["bfloat16"]


@pytest.mark.parametrize("tile", [(32, 1), (64, 8)], ids=str)
def test_transposed_pack_stays_in_bounds_on_broken_counts(backend, tile):
    """pit_sparse_dense bound directly with x_transposed (dense_sparse's path: pack reads the sparse
    operand's columns from the rows of its transpose) on an index with counts past n_inner and
    out-of-range ids: the product over the in-range ids' tiles, y written transposed."""
    from pit_jax.kgather import no_bias, sparse_dense_p
    rng = np.random.default_rng(stable_seed("tpack_broken", tile))
    s = random_tile_sparse(rng, (70, 45), tile, 0.5, "bfloat16")  # the sparse operand [N, K]
    d = (rng.standard_normal((45, 29)) + 0.1).astype(DTYPES["bfloat16"])  # dense [K, M]
    broken, kept = broken_index(pit_jax.detect(s, tile), rng)
    params = dict(shape=(70, 45), tile=tile, layout="row", exact=False, masked_grad=False, x_transposed=True,
                  y_transposed=True)
    y = jax.jit(lambda st, d, i: sparse_dense_p.bind(st, d, i.counts, i.offsets, i.indices, no_bias(st.dtype),
                                                     **params))(np.ascontiguousarray(s.T), d, broken)
    want = (np.where(kept, np.asarray(s, np.float64), 0.0) @ np.asarray(d, np.float64)).T
    assert y.shape == (29, 70) and _rel_err(y, want) < TOL["bfloat16"]
