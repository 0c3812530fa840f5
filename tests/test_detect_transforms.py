"""detect under jit, vmap, grad, jvp, jax.export, and cross-lowered for CUDA."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import pit_jax
from helpers import random_tile_sparse, reference_detect


def _x(shape=(3, 40, 72), tile=(8, 8), sparsity=0.7, dtype="float32", seed=0):
    return random_tile_sparse(np.random.default_rng(seed), shape, tile, sparsity, dtype)


def test_leading_dims_equal_per_slice(backend):
    x = _x((2, 3, 40, 72))
    idx = jax.jit(lambda x: pit_jax.detect(x, (8, 8)))(x)
    for i in range(2):
        for j in range(3):
            c, o, ind = reference_detect(x[i, j], (8, 8))
            np.testing.assert_array_equal(np.asarray(idx.indices[i, j]), ind)
            np.testing.assert_array_equal(np.asarray(idx.offsets[i, j]), o)


@pytest.mark.parametrize("in_axis", [0, 1, 2])
def test_vmap_any_axis(backend, in_axis):
    x = _x((40, 72, 5) if in_axis == 2 else (5, 40, 72) if in_axis == 0 else (40, 5, 72), seed=in_axis)
    f = jax.jit(jax.vmap(lambda s: pit_jax.detect(s, (8, 8), layout="col"), in_axes=in_axis))
    idx = f(x)
    slices = np.moveaxis(x, in_axis, 0)
    for i in range(5):
        c, o, ind = reference_detect(slices[i], (8, 8), "col")
        np.testing.assert_array_equal(np.asarray(idx.indices[i]), ind)
        np.testing.assert_array_equal(np.asarray(idx.counts[i]), c)


def test_nested_vmap(backend):
    x = _x((2, 3, 40, 72))
    f = jax.vmap(jax.vmap(lambda s: pit_jax.detect(s, (8, 8)).counts))
    np.testing.assert_array_equal(np.asarray(f(x)), reference_detect(x, (8, 8))[0])


def test_grad_flows_through_consumer_not_index(backend):
    x = _x((40, 72), tile=(1, 1))

    def loss(x):
        idx = pit_jax.detect(x, (1, 1))
        return jnp.sum(x * idx.to_mask() * idx.nnz.astype(x.dtype))

    g = jax.jit(jax.grad(loss))(x)
    nnz = float(np.count_nonzero(x))
    np.testing.assert_allclose(np.asarray(g), (x != 0) * nnz)


def test_jvp_tangent_is_float0(backend):
    x = jnp.asarray(_x((40, 72)))
    _, t = jax.jvp(lambda x: pit_jax.detect(x, (8, 8)).counts, (x,), (jnp.ones_like(x),))
    assert t.dtype == jax.dtypes.float0


def test_tileindex_through_jit_boundary(backend):
    x = _x()
    idx = jax.jit(lambda x: pit_jax.detect(x, (8, 8)))(x)
    assert isinstance(idx, pit_jax.TileIndex) and idx.tile == (8, 8) and idx.shape == (40, 72)
    total = jax.jit(lambda i: i.nnz.sum())(idx)
    assert int(total) == int(reference_detect(x, (8, 8))[1][..., -1].sum())


def _export(platforms, tile=(8, 8), layout="row"):
    b, = export.symbolic_shape("b")
    fn = jax.jit(lambda x: jax.tree.leaves(pit_jax.detect(x, tile, layout=layout)))
    return export.export(fn, platforms=platforms,
                         disabled_checks=[export.DisabledSafetyCheck.custom_call("pit_detect")])(
        jax.ShapeDtypeStruct((b, 40, 72), jnp.bfloat16))


def test_export_symbolic_batch_roundtrip(backend):
    exp = _export(("cpu", "cuda"))
    assert str(exp.out_avals[2].shape) == "(b, 5, 9)"
    restored = export.deserialize(exp.serialize())
    for n in (1, 4):
        x = _x((n, 40, 72), dtype="bfloat16", seed=n)
        got = restored.call(x)
        for g, w in zip(got, reference_detect(x, (8, 8))):
            np.testing.assert_array_equal(np.asarray(g), w)


def test_cross_lowering_for_cuda_emits_custom_call():
    if not pit_jax.cuda_available():
        pytest.skip("built without CUDA kernels")
    x = jax.ShapeDtypeStruct((4, 256, 512), jnp.bfloat16)
    text = jax.jit(lambda x: pit_jax.detect(x, (32, 1))).trace(x).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.custom_call @pit_detect" in text
    # the CUDA call carries scratch as a 4th result: 4*8 row blocks x 16 mask words, 4*8 chunk
    # counts, 4 counters
    assert "tensor<548xui32>" in text
    assert "tensor<4x8x512xi32>" in text
    exp = _export(("cuda",))
    assert "pit_detect" in exp.mlir_module()
