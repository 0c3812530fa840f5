"""pit_jax.nn.MoE and the MoE reference path: values against a float64 per-token loop, gradients
against a dense every-expert formulation, skewed/empty/invalid routing, vmap, optax, Linen."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import pit_jax.nn
from pit_jax.moe_reference import route
from pit_jax.nn.moe import moe_ffn

# Most tests read the sown losses with nnx.pop after the call, the pattern of flax < 0.12.8, which
# 0.12.8 deprecates (sowing outside nnx.capture); test_aux_losses_through_capture checks the
# newer pattern warns of nothing.
pytestmark = pytest.mark.filterwarnings(r"ignore:Using 'Module\.sow\(\)' outside of 'nnx\.capture\(\)':DeprecationWarning")


def _act(h, g, activation):
    if activation == "relu":
        return np.maximum(h, 0)
    if activation == "gelu":
        return np.asarray(jax.nn.gelu(jnp.asarray(h, jnp.float32)), np.float64)
    return g / (1 + np.exp(-g)) * h


def naive_ffn(x, ids, weights, w_in, w_out, w_gate, activation):
    x, w_in, w_out = (np.asarray(a, np.float64) for a in (x, w_in, w_out))
    w_gate = None if w_gate is None else np.asarray(w_gate, np.float64)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[t, s])
            if not 0 <= e < w_in.shape[0]:
                continue  # documented: invalid ids are dropped
            g = None if w_gate is None else x[t] @ w_gate[e]
            y[t] += float(weights[t, s]) * (_act(x[t] @ w_in[e], g, activation) @ w_out[e])
    return y


def _params(rng, e, d, f, swiglu):
    w_in = (rng.standard_normal((e, d, f)) / np.sqrt(d)).astype(np.float32)
    w_out = (rng.standard_normal((e, f, d)) / np.sqrt(f)).astype(np.float32)
    w_gate = (rng.standard_normal((e, d, f)) / np.sqrt(d)).astype(np.float32) if swiglu else None
    return w_in, w_out, w_gate


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
@pytest.mark.parametrize("e, k, t", [(1, 1, 7), (4, 2, 1), (9, 3, 33), (5, 5, 10)])
def test_moe_ffn_matches_loop(backend, activation, e, k, t):
    rng = np.random.default_rng(e * 100 + k * 10 + t)
    d, f = 13, 21
    x = rng.standard_normal((t, d)).astype(np.float32)
    ids = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    wts = rng.random((t, k)).astype(np.float32)
    w_in, w_out, w_gate = _params(rng, e, d, f, activation == "swiglu")
    y = jax.jit(lambda x, i, p, a, b, c: moe_ffn(x, i, p, (a, c, b), activation))(x, ids, wts, w_in, w_out, w_gate)
    np.testing.assert_allclose(np.asarray(y), naive_ffn(x, ids, wts, w_in, w_out, w_gate, activation),
                               rtol=2e-4, atol=2e-5)


def test_moe_ffn_reuses_given_routing(backend):
    """routing= (tables built once, e.g. outside a loop) gives the same layer, values and grads."""
    rng = np.random.default_rng(11)
    t, e, k, d, f = 19, 6, 2, 16, 24
    x = rng.standard_normal((t, d)).astype(np.float32)
    ids = rng.integers(0, e, (t, k)).astype(np.int32)
    wts = rng.random((t, k)).astype(np.float32)
    w_in, w_out, w_gate = _params(rng, e, d, f, True)
    tables = pit_jax.moe_routing(jnp.asarray(ids), e)
    loss = lambda x, routing: jnp.sum(moe_ffn(x, ids, wts, (w_in, w_gate, w_out), "swiglu", routing=routing) ** 2)
    got = jax.jit(jax.value_and_grad(loss))(x, tables)
    want = jax.jit(jax.value_and_grad(lambda x: loss(x, None)))(x)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["one_expert", "empty_experts", "invalid_ids"])
def test_skewed_and_invalid_routing(backend, case):
    rng = np.random.default_rng(3)
    e, k, t, d, f = 6, 2, 40, 8, 12
    x = rng.standard_normal((t, d)).astype(np.float32)
    if case == "one_expert":
        ids = np.full((t, k), 4, np.int32)
    elif case == "empty_experts":
        ids = rng.choice([1, 3], size=(t, k)).astype(np.int32)
    else:
        ids = rng.integers(-2, e + 3, size=(t, k)).astype(np.int32)
    wts = rng.random((t, k)).astype(np.float32)
    w_in, w_out, w_gate = _params(rng, e, d, f, True)
    y = moe_ffn(x, ids, wts, (w_in, w_gate, w_out), "swiglu")
    np.testing.assert_allclose(np.asarray(y), naive_ffn(x, ids, wts, w_in, w_out, w_gate, "swiglu"),
                               rtol=2e-4, atol=2e-5)
    order, sizes = route(jnp.asarray(ids), e)
    valid = (ids >= 0) & (ids < e)
    assert int(sizes.sum()) == int(valid.sum())
    np.testing.assert_array_equal(np.asarray(sizes), np.bincount(ids[valid], minlength=e))


def _model(e=8, k=2, d=16, f=24, activation="swiglu", seed=0):
    return pit_jax.nn.MoE(e, k, d, f, activation=activation, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_module_matches_loop(backend, activation):
    m = _model(activation=activation)
    x = np.random.default_rng(1).standard_normal((3, 11, 16)).astype(np.float32)
    y = m(jnp.asarray(x))
    tokens = x.reshape(-1, 16).astype(np.float64)
    logits = tokens @ np.asarray(m.router.kernel[...], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ids = np.argsort(-probs, axis=-1)[:, :2]
    p = np.take_along_axis(probs, ids, -1)
    p /= p.sum(-1, keepdims=True)
    gate = None if m.w_gate is None else m.w_gate[...]
    want = naive_ffn(tokens, ids, p, m.w_in[...], m.w_out[...], gate, activation)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 16), want, rtol=1e-3, atol=1e-4)


def test_aux_losses_sown():
    m = _model()
    m.router.kernel[...] = jnp.zeros_like(m.router.kernel[...])  # uniform router
    m(jnp.ones((10, 16)))
    aux = nnx.pop(m, nnx.Intermediate)
    np.testing.assert_allclose(float(aux["load_balancing_loss"][0]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(aux["router_z_loss"][0]), np.log(8.0) ** 2, rtol=1e-6)


def test_load_balancing_sum_over_choices():
    """load_balancing="sum_over_choices" is the top-k loss of flaxformer and Hugging Face
    transformers (E · Σ_e (fraction of tokens choosing e) · mean router probability of e): k when
    balanced, k times the Switch form for any router; a bad value is refused."""
    k, e = 3, 8
    x = jnp.asarray(np.random.default_rng(4).standard_normal((40, 16)), jnp.float32)
    switch = pit_jax.nn.MoE(e, k, 16, 24, rngs=nnx.Rngs(0))
    summed = pit_jax.nn.MoE(e, k, 16, 24, load_balancing="sum_over_choices", rngs=nnx.Rngs(0))
    losses = []
    for m in (switch, summed):
        m(x)
        losses.append(float(nnx.pop(m, nnx.Intermediate)["load_balancing_loss"][0]))
    logits = np.asarray(x, np.float64) @ np.asarray(summed.router.kernel[...], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.zeros_like(probs)
    np.put_along_axis(chosen, np.argsort(-probs, axis=-1)[:, :k], 1.0, axis=-1)
    want = e * np.sum(chosen.mean(0) * probs.mean(0))  # one-hot over the k choices, mean over tokens
    np.testing.assert_allclose(losses[1], want, rtol=1e-5)
    np.testing.assert_allclose(losses[1], k * losses[0], rtol=1e-5)
    summed.router.kernel[...] = jnp.zeros_like(summed.router.kernel[...])  # uniform router
    summed(x)
    np.testing.assert_allclose(float(nnx.pop(summed, nnx.Intermediate)["load_balancing_loss"][0]), k, rtol=1e-6)
    with pytest.raises(ValueError, match="load_balancing"):
        pit_jax.nn.MoE(e, k, 16, 24, load_balancing="flaxformer", rngs=nnx.Rngs(0))


@pytest.mark.skipif(not hasattr(nnx, "capture"), reason="nnx.capture needs flax >= 0.12.8")
def test_aux_losses_through_capture():
    """The README's pattern on flax >= 0.12.8: nnx.capture returns the sown losses with no
    deprecation warning, under jit, grad (the loss reaches the router) and per-sequence vmap."""
    m = _model()
    m.router.kernel[...] = jnp.zeros_like(m.router.kernel[...])  # uniform router
    x = jnp.asarray(np.random.default_rng(3).standard_normal((10, 16)), jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        y, aux = nnx.jit(lambda m, x: nnx.capture(m, nnx.Intermediate)(x))(m, x)
        np.testing.assert_allclose(float(aux["load_balancing_loss"][0]), 1.0, rtol=1e-6)
        np.testing.assert_allclose(float(aux["router_z_loss"][0]), np.log(8.0) ** 2, rtol=1e-6)
        assert y.shape == x.shape and bool(jnp.isfinite(y).all())

        def loss(m, x):
            _, aux = nnx.capture(m, nnx.Intermediate)(x)
            return aux["router_z_loss"][0]
        grads = nnx.grad(loss)(m, x)
        assert float(jnp.abs(grads["router"]["kernel"][...]).sum()) > 0
        per_seq = nnx.vmap(lambda m, x: nnx.capture(m, nnx.Intermediate)(x), in_axes=(None, 0))
        ys, aux = per_seq(m, jnp.stack([x, 2 * x, 3 * x]))
    assert ys.shape == (3, 10, 16) and aux["load_balancing_loss"][0].shape == (3,)
    assert not nnx.state(m, nnx.Intermediate)  # nothing left sown on the module


def test_grad_matches_dense_formulation(backend):
    """The routed layer equals Σ_e gate[t, e] FFN_e(x[t]) with gate the top-k weights; its
    gradient (through ragged_dot, the scatter and the router) must match that dense form."""
    m = _model(e=4, k=2, d=8, f=10)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((12, 8)), jnp.float32)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    def routed(params, x):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x) ** 2)

    def dense(params, x):
        mm = nnx.merge(graphdef, params, rest)
        probs = jax.nn.softmax(x @ mm.router.kernel[...], -1)
        p, e = jax.lax.top_k(probs, 2)
        p = p / p.sum(-1, keepdims=True)
        gate = jnp.zeros_like(probs).at[jnp.arange(12)[:, None], e].set(p)
        h = jnp.einsum("td,edf->etf", x, mm.w_in[...])
        g = jnp.einsum("td,edf->etf", x, mm.w_gate[...])
        out = jnp.einsum("etf,efd->etd", jax.nn.silu(g) * h, mm.w_out[...])
        return jnp.sum(jnp.einsum("etd,te->td", out, gate) ** 2)

    g1 = jax.grad(routed, argnums=(0, 1))(params, x)
    g2 = jax.grad(dense, argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_vmap_over_sequences(backend):
    m = _model()
    graphdef, state = nnx.split(m)
    xs = jnp.asarray(np.random.default_rng(4).standard_normal((3, 7, 16)), jnp.float32)
    f = lambda x: nnx.merge(graphdef, state)(x)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(f))(xs)), np.asarray(m(xs)),
                               rtol=1e-5, atol=1e-6)


def test_nnx_vmap_keeps_aux_losses_per_sequence(backend):
    """nnx.vmap over sequences, parameters shared, the sown losses batched (StateAxes: a plain
    in_axes=None for the module fails, since the sown values come out batched): outputs and each
    sequence's losses equal the module's on that sequence alone."""
    m = _model()
    xs = jnp.asarray(np.random.default_rng(6).standard_normal((3, 7, 16)), jnp.float32)
    axes = nnx.StateAxes({nnx.Intermediate: 0, ...: None})
    ys = nnx.vmap(lambda m, x: m(x), in_axes=(axes, 0), out_axes=0)(m, xs)
    aux = nnx.pop(m, nnx.Intermediate)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(ys[i]), np.asarray(m(xs[i])), rtol=1e-5, atol=1e-6)
        one = nnx.pop(m, nnx.Intermediate)
        for name in ("load_balancing_loss", "router_z_loss"):
            np.testing.assert_allclose(float(aux[name][0][i]), float(one[name][0]), rtol=1e-5)


def test_trains_with_optax():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
    target = jnp.tanh(x @ jnp.asarray(rng.standard_normal((16, 16)), jnp.float32))
    m = _model()
    opt = nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(m, opt):
        def loss_fn(m):
            loss = jnp.mean((m(x) - target) ** 2)
            aux = nnx.pop(m, nnx.Intermediate)
            return loss + 0.01 * aux["load_balancing_loss"][0]
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    first = float(step(m, opt))
    for _ in range(60):
        last = float(step(m, opt))
    assert last < 0.5 * first


def test_linen_wrapper():
    layer = pit_jax.nn.MoELinen(num_experts=4, top_k=2, d_model=8, d_ff=12)
    x = jnp.ones((5, 8))
    variables = layer.init(jax.random.PRNGKey(0), x)
    y = layer.apply(variables, x)
    assert y.shape == (5, 8) and bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_experts=4, top_k=5), "top_k must be in"),
    (dict(num_experts=0, top_k=1), "num_experts"),
    (dict(num_experts=4, top_k=2, activation="tanh"), "activation"),
    (dict(num_experts=4, top_k=2, d_ff=0), "d_ff"),
])
def test_bad_config(kwargs, words):
    args = dict(d_model=8, d_ff=8) | kwargs
    with pytest.raises(ValueError, match=words):
        pit_jax.nn.MoE(rngs=nnx.Rngs(0), **args)


def test_bad_input_dim():
    with pytest.raises(ValueError, match="d_model=16"):
        _model()(jnp.ones((3, 15)))


@pytest.mark.parametrize("x, words", [
    (jnp.ones((3, 16), jnp.int32), "floating-point array, got int32"),  # the output (x's dtype) would truncate
    (jnp.ones((3, 16)) > 0, "floating-point array, got bool"),
    (jnp.float32(1.0), "got a 0-d array"),
    ([[1.0] * 16], "got list"),
    (None, "got NoneType"),
])
def test_bad_input_type_names_x(x, words):
    with pytest.raises(TypeError, match=f"MoE: x must be .*{words}"):
        _model()(x)


def test_bad_dtype_and_numpy_ints():
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        pit_jax.nn.MoE(4, 2, 8, 8, dtype=jnp.int32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_experts"):
        pit_jax.nn.MoE(True, 1, 8, 8, rngs=nnx.Rngs(0))
    m = pit_jax.nn.MoE(np.int64(4), np.int64(2), np.int64(8), np.int64(8), capacity_factor=np.float32(1.5),
                       rngs=nnx.Rngs(0))  # numpy scalars are ints and reals like Python's
    assert m(jnp.ones((3, 8))).shape == (3, 8) and type(m.num_experts) is int


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_no_tokens(capacity_factor):
    """Zero tokens: an empty output and zero losses (a mean over no tokens would be NaN)."""
    m = pit_jax.nn.MoE(4, 2, 8, 8, capacity_factor=capacity_factor, rngs=nnx.Rngs(0))
    y = m(jnp.ones((2, 0, 8), jnp.bfloat16))
    assert y.shape == (2, 0, 8) and y.dtype == jnp.bfloat16
    aux = nnx.pop(m, nnx.Intermediate)
    assert float(aux["load_balancing_loss"][0]) == 0 and float(aux["router_z_loss"][0]) == 0
    assert ("dropped_fraction" in aux) == (capacity_factor is not None)


def test_capacity_factor_drops_and_reports():
    m = pit_jax.nn.MoE(4, 1, 8, 8, capacity_factor=0.5, rngs=nnx.Rngs(0))
    m.router.kernel[...] = jnp.zeros_like(m.router.kernel[...]).at[:, 2].set(1.0)  # all to expert 2
    x = jnp.abs(jnp.asarray(np.random.default_rng(0).standard_normal((16, 8)), jnp.float32))
    y = m(x)
    aux = nnx.pop(m, nnx.Intermediate)
    # capacity ceil(0.5 * 16 / 4) = 2: tokens 2.. are dropped and output zero
    np.testing.assert_allclose(float(aux["dropped_fraction"][0]), 14 / 16)
    assert np.all(np.asarray(y)[2:] == 0) and np.any(np.asarray(y)[:2] != 0)
    with pytest.raises(ValueError, match="capacity_factor"):
        pit_jax.nn.MoE(4, 1, 8, 8, capacity_factor=-1.0, rngs=nnx.Rngs(0))


def test_batch_prioritized_routing_keeps_confident_tokens():
    """With batch-prioritised routing the capacity goes to the tokens whose top router
    probability is highest, not to the first tokens."""
    m = pit_jax.nn.MoE(4, 1, 8, 8, capacity_factor=0.5, batch_prioritized_routing=True, rngs=nnx.Rngs(0))
    m.router.kernel[...] = jnp.zeros_like(m.router.kernel[...]).at[0, 2].set(1.0)  # logit of expert 2 = x[:, 0]
    rng = np.random.default_rng(1)
    x = jnp.asarray(np.abs(rng.standard_normal((16, 8))) + 0.1, jnp.float32)
    x = x.at[:, 0].set(jnp.arange(1, 17, dtype=jnp.float32) / 4)  # all on expert 2, later ones more confident
    y = m(x)
    aux = nnx.pop(m, nnx.Intermediate)
    np.testing.assert_allclose(float(aux["dropped_fraction"][0]), 14 / 16)  # capacity ceil(0.5 * 16 / 4) = 2
    nonzero = np.flatnonzero(np.any(np.asarray(y) != 0, axis=1))
    np.testing.assert_array_equal(nonzero, [14, 15])
    with pytest.raises(ValueError, match="batch_prioritized_routing"):
        pit_jax.nn.MoE(4, 1, 8, 8, batch_prioritized_routing=True, rngs=nnx.Rngs(0))
