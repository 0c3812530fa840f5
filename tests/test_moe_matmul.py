"""pit_jax.moe_matmul: values against float64, AD against a dense formulation, vmap, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import pit_jax
from helpers import DTYPES, moe_layouts_want

TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}


def _data(rng, t, k, e, d, f, dtype, ids=None):
    x = rng.standard_normal((t, d)).astype(DTYPES[dtype])
    w = (rng.standard_normal((e, d, f)) / np.sqrt(d)).astype(DTYPES[dtype])
    if ids is None:
        ids = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    return x, w, ids


def _want(x, w, ids):
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    return np.einsum("td,tkdf->tkf", x64, w64[ids])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("t, k, e, d, f", [(1, 1, 1, 5, 3), (37, 2, 8, 24, 40), (20, 4, 4, 13, 7),
                                           (64, 8, 256, 16, 9)])
def test_values(backend, dtype, t, k, e, d, f):
    rng = np.random.default_rng(t * k + e)
    x, w, ids = _data(rng, t, k, e, d, f, dtype)
    out = jax.jit(pit_jax.moe_matmul)(x, w, ids)
    assert out.shape == (t, k, f) and out.dtype == x.dtype
    want = _want(x, w, ids)
    err = np.linalg.norm(np.asarray(out, np.float64) - want) / np.linalg.norm(want)
    assert err < TOL[dtype]


def test_per_assignment_rows_and_skew(backend):
    rng = np.random.default_rng(1)
    x3 = rng.standard_normal((10, 3, 6)).astype(np.float32)
    w = rng.standard_normal((5, 6, 4)).astype(np.float32)
    ids = np.full((10, 3), 2, np.int32)  # every token on one expert, the others empty
    out = pit_jax.moe_matmul(x3, w, ids)
    np.testing.assert_allclose(np.asarray(out), np.einsum("tkd,df->tkf", x3, w[2]), rtol=1e-5, atol=1e-5)
    ids[0, 0], ids[1, 2] = -1, 9  # invalid ids: dropped, their rows are zero
    out = np.asarray(pit_jax.moe_matmul(x3, w, ids))
    assert np.all(out[0, 0] == 0) and np.all(out[1, 2] == 0)
    np.testing.assert_allclose(out[2], x3[2] @ w[2], rtol=1e-5, atol=1e-5)


def test_grad_and_jvp_match_dense(backend):
    rng = np.random.default_rng(2)
    x, w, ids = _data(rng, 15, 2, 6, 7, 5, "float32")
    g = rng.standard_normal((15, 2, 5)).astype(np.float32)
    dense = lambda x, w: jnp.einsum("td,tkdf->tkf", x, w[ids])
    got = jax.grad(lambda x, w: jnp.sum(pit_jax.moe_matmul(x, w, ids) * g), (0, 1))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(dense(x, w) * g), (0, 1))(x, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    dx, dw = rng.standard_normal(x.shape).astype(np.float32), rng.standard_normal(w.shape).astype(np.float32)
    _, t1 = jax.jvp(lambda x, w: pit_jax.moe_matmul(x, w, ids), (x, w), (dx, dw))
    _, t2 = jax.jvp(dense, (x, w), (dx, dw))
    np.testing.assert_allclose(np.asarray(t1), np.asarray(t2), rtol=1e-4, atol=1e-5)


def test_second_order_through_tn(backend):
    rng = np.random.default_rng(3)
    x, w, ids = _data(rng, 6, 2, 3, 3, 2, "float32")
    f = lambda x: jnp.sum(jax.grad(lambda w: jnp.sum(pit_jax.moe_matmul(x, w, ids) ** 2))(w) ** 2)
    d = lambda x: jnp.sum(jax.grad(lambda w: jnp.sum(jnp.einsum("td,tkdf->tkf", x, w[ids]) ** 2))(w) ** 2)
    np.testing.assert_allclose(np.asarray(jax.grad(f)(x)), np.asarray(jax.grad(d)(x)), rtol=1e-4, atol=1e-4)


def test_vmap(backend):
    rng = np.random.default_rng(4)
    xs = rng.standard_normal((3, 9, 6)).astype(np.float32)
    w = rng.standard_normal((4, 6, 5)).astype(np.float32)
    ids = rng.integers(0, 4, (3, 9, 2)).astype(np.int32)
    out = jax.vmap(pit_jax.moe_matmul, (0, None, 0))(xs, w, ids)
    want = np.stack([_want(xs[i], w, ids[i]) for i in range(3)])
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape, w_shape, ids, exc, words", [
    ((4, 6), (3, 6), np.zeros((4, 2), np.int32), ValueError, "w must be"),
    ((4, 6), (3, 7, 5), np.zeros((4, 2), np.int32), ValueError, "must equal w's d"),
    ((5, 6), (3, 6, 5), np.zeros((4, 2), np.int32), ValueError, "x must be"),
    ((4, 6), (3, 6, 5), np.zeros((4, 2), np.float32), TypeError, "integer"),
    ((4, 6), (3, 6, 5), np.zeros((8,), np.int32), TypeError, "integer"),
])
def test_bad_input(x_shape, w_shape, ids, exc, words):
    with pytest.raises(exc, match=words):
        pit_jax.moe_matmul(jnp.ones(x_shape), jnp.ones(w_shape), ids)


def test_dtype_mismatch():
    with pytest.raises(TypeError, match="same dtype"):
        pit_jax.moe_matmul(jnp.ones((4, 6)), jnp.ones((3, 6, 5), jnp.bfloat16), np.zeros((4, 2), np.int32))


def test_routing_reuse_and_errors():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((12, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 6, 5)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 4, (12, 2)), jnp.int32)
    routing = pit_jax.moe_routing(ids, 4)
    np.testing.assert_array_equal(np.asarray(routing.group_sizes()), np.bincount(np.asarray(ids).ravel(), minlength=4))
    np.testing.assert_allclose(pit_jax.moe_matmul(x, w, ids, routing=routing), pit_jax.moe_matmul(x, w, ids),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="routing was built"):
        pit_jax.moe_matmul(x, w, ids, routing=pit_jax.moe_routing(ids, 3))
    with pytest.raises(ValueError, match="routing was built"):
        pit_jax.moe_matmul(x[:6], w, ids[:6], routing=routing)
    with pytest.raises(TypeError, match="MoeRouting"):
        pit_jax.moe_matmul(x, w, ids, routing=tuple(routing))
    with pytest.raises(ValueError, match="num_experts"):
        pit_jax.moe_routing(ids, 0)
    with pytest.raises(TypeError, match="integer"):
        pit_jax.moe_routing(ids.astype(jnp.float32), 4)
    with pytest.raises(ValueError, match="num_experts must be a positive int, got True"):
        pit_jax.moe_routing(ids, True)
    assert pit_jax.moe_routing(ids, np.int64(4)).num_experts == 4  # numpy ints are ints


@pytest.mark.parametrize("ids", [jnp.zeros((4, 0), jnp.int32), jnp.asarray([[0.9, 1.7]]), [[0, 1]], jnp.int32(3)],
                         ids=["k0", "float", "list", "0d"])
def test_drop_over_capacity_rejects_bad_ids(ids):
    with pytest.raises(TypeError, match="drop_over_capacity: expert_ids must be an integer"):
        pit_jax.drop_over_capacity(ids, 4, 1.0)


def test_routing_crosses_a_serialized_export(backend):
    """A MoeRouting returned by an exported, serialized function (symbolic token count)."""
    t, = export.symbolic_shape("t")
    exp = export.export(jax.jit(lambda i: pit_jax.moe_routing(i, 4)), platforms=("cpu", "cuda"),
                        disabled_checks=[export.DisabledSafetyCheck.custom_call("pit_moe_route")])(
        jax.ShapeDtypeStruct((t, 2), jnp.int32))
    ids = jnp.asarray([[0, 1], [3, 3], [2, 0]], jnp.int32)
    got = export.deserialize(exp.serialize()).call(ids)
    assert type(got) is pit_jax.moe.MoeRouting
    for a, b in zip(got, pit_jax.moe_routing(ids, 4)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("capacity_factor", [0.5, 1.1, 1.25, 2.0])
def test_drop_over_capacity_exports_with_symbolic_tokens(backend, capacity_factor):
    """With a symbolic token count the capacity is computed on device (float32, snapped to an
    integer within 1e-6): the same drops as the Python capacity at each concrete count."""
    t, = export.symbolic_shape("t")
    f = lambda ids: pit_jax.drop_over_capacity(ids, 4, capacity_factor)
    exp = export.export(jax.jit(f), platforms=("cpu", "cuda"),
                        disabled_checks=[export.DisabledSafetyCheck.custom_call("pit_moe_route")])(
        jax.ShapeDtypeStruct((t, 2), jnp.int32))
    call = export.deserialize(exp.serialize()).call
    rng = np.random.default_rng(13)
    for tokens in (1, 5, 10, 20):
        ids = jnp.asarray(rng.integers(0, 4, (tokens, 2)), jnp.int32)
        (got, got_dropped), (want, want_dropped) = call(ids), f(ids)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert int(got_dropped) == int(want_dropped)


def test_drop_over_capacity_takes_numpy_scalars():
    ids = jnp.asarray([[0, 1], [1, 1]], jnp.int32)
    kept, dropped = pit_jax.drop_over_capacity(ids, np.int64(4), np.float32(1.0))  # capacity ceil(4/4) = 1
    np.testing.assert_array_equal(np.asarray(kept), [[0, -1], [1, -1]])
    assert int(dropped) == 2


def test_export_symbolic_tokens(backend):
    """moe_matmul and its gradient exported for cpu and cuda with a symbolic token count, then
    called: the same values as the live function (the pit_ targets waived, as the README says)."""
    from jax import export
    t, = export.symbolic_shape("t")
    targets = ("pit_moe_route", "pit_moe_matmul", "pit_moe_matmul_tn", "pit_moe_matmul_staged",
               "pit_moe_matmul_tn_staged", "pit_moe_fused")

    def loss(x, w, ids):
        return jnp.sum(pit_jax.moe_matmul(x, w, ids) ** 2)

    fn = jax.jit(jax.value_and_grad(loss, (0, 1)))
    exp = export.export(fn, platforms=("cpu", "cuda"),
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(c) for c in targets])(
        jax.ShapeDtypeStruct((t, 16), jnp.float32), jax.ShapeDtypeStruct((4, 16, 8), jnp.float32),
        jax.ShapeDtypeStruct((t, 2), jnp.int32))
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.standard_normal((9, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 16, 8)), jnp.float32)
    ids = jnp.asarray(rng.integers(-1, 4, (9, 2)), jnp.int32)
    got = export.deserialize(exp.serialize()).call(x, w, ids)
    want = fn(x, w, ids)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_routing_counts_invalid_ids(backend):
    """Ids outside [0, E) are dropped (zero rows) and counted on device by the routing."""
    rng = np.random.default_rng(11)
    ids = rng.integers(-3, 7, (37, 3)).astype(np.int32)  # E = 5: about 40% out of range
    x = jnp.asarray(rng.standard_normal((37, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((5, 8, 4)), jnp.float32)
    routing = jax.jit(pit_jax.moe_routing, static_argnums=1)(jnp.asarray(ids), 5)
    invalid = (ids < 0) | (ids >= 5)
    assert int(routing.dropped_count()) == int(invalid.sum()) > 0
    out = np.asarray(pit_jax.moe_matmul(x, w, jnp.asarray(ids), routing=routing))
    np.testing.assert_array_equal(out[invalid], 0)
    batched = jax.vmap(lambda i: pit_jax.moe_routing(i, 5).dropped_count())(jnp.asarray(ids.reshape(1, 37, 3)))
    np.testing.assert_array_equal(np.asarray(batched), [invalid.sum()])


def test_drop_over_capacity():
    ids = jnp.asarray([[0, 1], [0, 2], [0, 1], [0, 3], [5, -1]], jnp.int32)  # E = 4
    kept, dropped = pit_jax.drop_over_capacity(ids, 4, 1.0)  # capacity ceil(10/4) = 3
    np.testing.assert_array_equal(np.asarray(kept), [[0, 1], [0, 2], [0, 1], [-1, 3], [-1, -1]])
    assert int(dropped) == 1  # the 4th token on expert 0; invalid ids are not counted as drops
    kept, dropped = pit_jax.drop_over_capacity(ids, 4, 2.0)
    assert int(dropped) == 0
    with pytest.raises(ValueError, match="capacity_factor"):
        pit_jax.drop_over_capacity(ids, 4, 0.0)
    with pytest.raises(ValueError, match="num_experts"):
        pit_jax.drop_over_capacity(ids, 0, 1.0)


def test_drop_over_capacity_prefers_first_choices():
    """flaxformer's priority: every token's first choice before any second choice. With one slot
    per expert, both first choices stay and both second choices go, whatever the token order."""
    ids = jnp.asarray([[0, 1], [1, 0]], jnp.int32)
    kept, dropped = pit_jax.drop_over_capacity(ids, 2, 0.5)  # capacity ceil(0.5 * 4 / 2) = 1
    np.testing.assert_array_equal(np.asarray(kept), [[0, -1], [1, -1]])
    assert int(dropped) == 2
    ids3 = jnp.asarray([[[2, 0, 1], [2, 1, 0]], [[0, 2, 1], [1, 2, 0]]], jnp.int32)  # leading dims kept
    kept, dropped = pit_jax.drop_over_capacity(ids3, 3, 0.25)  # capacity ceil(0.25 * 12 / 3) = 1
    np.testing.assert_array_equal(np.asarray(kept), [[[2, -1, -1], [-1, -1, -1]], [[0, -1, -1], [1, -1, -1]]])
    assert int(dropped) == 9


def test_drop_over_capacity_batch_prioritized():
    """priority= reorders tokens within each slot (highest score first, ties in token order);
    first choices still come before second choices, and the result is in token order."""
    ids = jnp.asarray([[0, 1], [0, 1], [0, 1], [1, 0]], jnp.int32)  # E = 2, capacity ceil(0.5 * 8 / 2) = 2
    score = jnp.asarray([0.1, 0.9, 0.5, 0.5], jnp.float32)
    kept, dropped = pit_jax.drop_over_capacity(ids, 2, 0.5, priority=score)
    # slot 0 in score order: token 1 (e0), token 2 (e0), token 3 (e1), token 0 (e0: full)
    # slot 1: token 1 (e1: second on e1), then every other second choice is over capacity
    np.testing.assert_array_equal(np.asarray(kept), [[-1, -1], [0, 1], [0, -1], [1, -1]])
    assert int(dropped) == 4
    plain, _ = pit_jax.drop_over_capacity(ids, 2, 0.5)
    np.testing.assert_array_equal(np.asarray(plain), [[0, 1], [0, -1], [-1, -1], [1, -1]])  # token order
    # equal scores: token order, the same as no priority
    same, _ = pit_jax.drop_over_capacity(ids, 2, 0.5, priority=jnp.ones(4))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(plain))
    # leading dims: one score per token; under jit and vmap (per sequence)
    ids3 = jnp.stack([ids, ids[::-1]])
    score3 = jnp.stack([score, score[::-1]])
    fn = jax.jit(jax.vmap(lambda i, p: pit_jax.drop_over_capacity(i, 2, 0.5, priority=p)))
    kept3, dropped3 = fn(ids3, score3)
    np.testing.assert_array_equal(np.asarray(kept3[0]), np.asarray(kept))
    np.testing.assert_array_equal(np.asarray(kept3[1]), np.asarray(kept)[::-1])
    np.testing.assert_array_equal(np.asarray(dropped3), [4, 4])
    with pytest.raises(ValueError, match="priority"):
        pit_jax.drop_over_capacity(ids, 2, 0.5, priority=jnp.ones((4, 2)))


def test_drop_over_capacity_rounds_the_capacity_up():
    """C = ceil(c · T·k / E) on the product, not on a truncated T·k: c = 0.5, T·k = 5, E = 2 keeps 2
    per expert; and 1.1 · 50 / 5 is 11, not 12 (floating-point)."""
    ids = jnp.asarray([[0], [0], [0], [1], [1]], jnp.int32)
    kept, dropped = pit_jax.drop_over_capacity(ids, 2, 0.5)
    np.testing.assert_array_equal(np.asarray(kept)[:, 0], [0, 0, -1, 1, 1])
    assert int(dropped) == 1
    assert 1.1 * 50 / 5 > 11  # 11.000000000000002: a plain ceil would give 12
    ids = jnp.asarray([0] * 13 + [1, 2, 3, 4] * 9 + [1], jnp.int32)[:, None]
    _, dropped = pit_jax.drop_over_capacity(ids, 5, 1.1)  # capacity 11: 2 of expert 0's 13 dropped
    assert int(dropped) == 2


@pytest.mark.parametrize("x_sorted, out_sorted", [(False, True), (True, False), (True, True)])
def test_rows_in_routing_order(backend, x_sorted, out_sorted):
    """The grouped matmul with input and/or output rows in routing order (what moe_ffn keeps
    between its projections): values and both gradients against float64, invalid ids included."""
    from pit_jax.moe import grouped_matmul
    rng = np.random.default_rng(4 + 2 * x_sorted + out_sorted)
    t, k, e, d, f = 23, 3, 5, 9, 6
    ids = rng.integers(-1, e + 1, (t, k)).astype(np.int32)
    routing = pit_jax.moe_routing(ids, e)
    x = rng.standard_normal((t * k if x_sorted else t, d)).astype(np.float32)
    w = rng.standard_normal((e, d, f)).astype(np.float32)
    g = rng.standard_normal((t * k, f)).astype(np.float32)
    fn = lambda x, w: grouped_matmul(x, w, routing, rows_per_source=1 if x_sorted else k, x_sorted=x_sorted,
                                     out_sorted=out_sorted)
    out, vjp = jax.vjp(fn, x, w)
    got = (out, *vjp(g))
    want = moe_layouts_want(x, w, ids, np.asarray(routing.order), g, x_sorted=x_sorted, out_sorted=out_sorted)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=1e-4, atol=1e-4)


def _epilogue_want(epilogue, product, up, scale_rows):
    """The fused epilogues in float64 (numpy), on products laid out as the output."""
    if epilogue == "relu":
        return np.maximum(product, 0)
    if epilogue == "gelu":
        return 0.5 * product * (1 + np.tanh(np.sqrt(2 / np.pi) * (product + 0.044715 * product ** 3)))
    if epilogue == "swiglu":
        return product / (1 + np.exp(-product)) * up
    return product * scale_rows[:, None]


@pytest.mark.parametrize("epilogue", ["relu", "gelu", "swiglu", "scale"])
@pytest.mark.parametrize("x_sorted, out_sorted", [(False, False), (False, True), (True, True), (True, False)])
def test_fused_matmul_values_and_grad(backend, epilogue, x_sorted, out_sorted):
    """Grouped matmul with a fused epilogue: values against float64, gradients (the combine
    weights' too) and tangents against the same layer written with grouped matmuls and jnp
    (its JVP rule), invalid ids included."""
    from pit_jax.moe import fused_matmul, grouped_matmul
    rng = np.random.default_rng(7 + 2 * x_sorted + out_sorted)
    t, k, e, d, f = 19, 2, 4, 8, 16
    ids = rng.integers(-1, e + 1, (t, k)).astype(np.int32)
    routing = pit_jax.moe_routing(ids, e)
    order = np.asarray(routing.order)
    kw = dict(rows_per_source=1 if x_sorted else k, x_sorted=x_sorted, out_sorted=out_sorted)
    x = rng.standard_normal((t * k if x_sorted else t, d)).astype(np.float32)
    w, w_up = (rng.standard_normal((e, d, f)).astype(np.float32) for _ in range(2))
    scale = rng.uniform(0.1, 1.0, t * k).astype(np.float32)
    extra = {"swiglu": w_up, "scale": scale}.get(epilogue, w_up)  # the third argument (unused by relu/gelu)

    def fused(x, w, extra):
        named = {"swiglu": dict(w_up=extra), "scale": dict(scale=extra)}.get(epilogue, {})
        return fused_matmul(x, w, routing, epilogue=epilogue, **kw, **named)

    def unfused(x, w, extra):
        p = grouped_matmul(x, w, routing, **kw)
        if epilogue == "relu":
            return jnp.where(p > 0, p, 0)
        if epilogue == "gelu":
            return 0.5 * p * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (p + 0.044715 * p ** 3)))
        if epilogue == "swiglu":
            return p * jax.nn.sigmoid(p) * grouped_matmul(x, extra, routing, **kw)
        return p * (extra[routing.order] if out_sorted else extra)[:, None]

    zero_g = np.zeros((t * k, f))
    product, up = (moe_layouts_want(x, w_, ids, order, zero_g, x_sorted=x_sorted, out_sorted=out_sorted)[0]
                   for w_ in (w, w_up))
    want = _epilogue_want(epilogue, product, up, scale[order] if out_sorted else scale)
    np.testing.assert_allclose(np.asarray(jax.jit(fused)(x, w, extra), np.float64), want, rtol=1e-4, atol=1e-4)
    g = rng.standard_normal((t * k, f)).astype(np.float32)
    loss = lambda fn: lambda *a: jnp.sum(fn(*a) * g)
    argnums = (0, 1) if epilogue in ("relu", "gelu") else (0, 1, 2)
    got = jax.jit(jax.grad(loss(fused), argnums))(x, w, extra)
    ref = jax.grad(loss(unfused), argnums)(x, w, extra)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    _, tan = jax.jvp(fused, (x, w, extra), (x, w, extra))
    _, tan_ref = jax.jvp(unfused, (x, w, extra), (x, w, extra))
    np.testing.assert_allclose(np.asarray(tan), np.asarray(tan_ref), rtol=1e-4, atol=1e-4)


def test_fused_matmul_rejects_bad_extras():
    from pit_jax.moe import fused_matmul
    ids = np.zeros((4, 2), np.int32)
    routing = pit_jax.moe_routing(ids, 3)
    x, w = jnp.ones((4, 8)), jnp.ones((3, 8, 16))
    kw = dict(rows_per_source=2, x_sorted=False, out_sorted=True)
    with pytest.raises(ValueError, match="epilogue must be one of"):
        fused_matmul(x, w, routing, epilogue="tanh", **kw)
    with pytest.raises(ValueError, match="w_up"):
        fused_matmul(x, w, routing, epilogue="swiglu", **kw)
    with pytest.raises(ValueError, match="scale must be"):
        fused_matmul(x, w, routing, epilogue="scale", scale=jnp.ones(7), **kw)


@pytest.mark.parametrize("fn", ["grouped_matmul", "fused_matmul"])
@pytest.mark.parametrize("x_shape, w_shape, w_dtype, kw, exc, words", [
    ((4,), (3, 8, 16), "float32", {}, ValueError, "x must have rank"),
    ((2, 4, 8), (3, 8, 16), "float32", {}, ValueError, r"x must be \[rows, d\]"),
    ((4, 8), (8, 16), "float32", {}, ValueError, r"w must be \[E, d, f\]"),
    ((4, 8), (3, 8, 16), "bfloat16", {}, TypeError, "same dtype"),
    ((4, 8), (5, 8, 16), "float32", {}, ValueError, "E=3"),
    ((4, 8), (3, 9, 16), "float32", {}, ValueError, "d=8"),
    ((4, 8), (3, 8, 16), "float32", dict(rows_per_source=0), ValueError, "rows_per_source"),
    ((4, 8), (3, 8, 16), "float32", dict(x_sorted=True, rows_per_source=1), ValueError, "one row per assignment"),
    ((5, 8), (3, 8, 16), "float32", {}, ValueError, "must equal"),
])
def test_layout_functions_reject_bad_operands(fn, x_shape, w_shape, w_dtype, kw, exc, words):
    from pit_jax import moe
    routing = pit_jax.moe_routing(np.zeros((4, 2), np.int32), 3)
    args = dict(rows_per_source=2, x_sorted=False, out_sorted=True)
    args.update(kw)
    if fn == "fused_matmul":
        args["epilogue"] = "relu"
    x, w = jnp.ones(x_shape, jnp.float32), jnp.ones(w_shape, w_dtype)
    with pytest.raises(exc, match=words):
        getattr(moe, fn)(x, w, routing, **args)
    with pytest.raises(TypeError, match="MoeRouting"):
        getattr(moe, fn)(jnp.ones((4, 8)), jnp.ones((3, 8, 16)), tuple(routing), **{**args, **dict(rows_per_source=2)})
