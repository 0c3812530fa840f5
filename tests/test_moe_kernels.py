"""The MoE CUDA kernels (routing, forward grouped GEMM — wgmma on Hopper, mma.sync elsewhere —
and dW) against float64 and the jnp routing tables: GPU only; the lowering is checked on any
machine with the CUDA module built."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pit_jax
from helpers import DTYPES

TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}


def _gpu():
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        return None


def _route(rng, t, k, e, routing):
    """[T, k] int32 expert ids: uniform, Zipf-skewed, all on one expert, in equal blocks of
    assignments (expert sizes exactly T·k / E), a fifth then four fifths, or some out of range."""
    if routing == "uniform":
        ids = rng.integers(0, e, (t, k))
    elif routing == "zipf":
        ids = np.minimum(rng.zipf(1.5, (t, k)) - 1, e - 1)
    elif routing == "one_hot":
        ids = np.full((t, k), e // 2)
    elif routing == "blocks":
        ids = np.arange(t * k).reshape(t, k) * e // (t * k)
    elif routing == "skewed_blocks":  # the first fifth of the assignments on expert 0, the rest on 1
        ids = np.minimum(np.arange(t * k).reshape(t, k) * 5 // (t * k), 1)
    else:
        ids = rng.integers(-3, e + 3, (t, k))
    return ids.astype(np.int32)


def _gpu_or_skip():
    dev = _gpu()
    if dev is None or not pit_jax.cuda_available():
        pytest.skip("needs a GPU and the CUDA kernels")
    return dev


def _layout_inputs(seed, t, k, e, d, routing, x_sorted, dtype):
    """(rng, ids [T, k], x): tokens [T, d], or [T·k, d] rows in routing order with x_sorted."""
    rng = np.random.default_rng(seed)
    ids = _route(rng, t, k, e, routing)
    x = (rng.standard_normal((t * k if x_sorted else t, d)) + 0.1).astype(DTYPES[dtype])
    return rng, ids, x


def _fresh():
    """A new function object per call, so each test compiles its own executable."""
    return lambda x, w, ids: pit_jax.moe_matmul(x, w, ids)


@pytest.fixture(params=["default", "sm80", "persistent", "staged"])
def kernel(request, monkeypatch):
    """The forward kernels: the fused wgmma kernel on Hopper where dtype and shapes allow
    (PIT_MOE_STAGED=0), the mma.sync kernel (PIT_DISABLE_WGMMA=1), the persistent wgmma kernel
    (PIT_MOE_PERSISTENT=1; work in progress) and the staged forward (PIT_MOE_STAGED=1: gather,
    CUTLASS grouped GEMM, scatter). The first three are read by the handler at every launch,
    PIT_MOE_STAGED when lowering (each test compiles its own function)."""
    monkeypatch.setenv("PIT_MOE_STAGED", "1" if request.param == "staged" else "0")
    monkeypatch.setenv("PIT_MOE_STAGED_DW", "1" if request.param == "staged" else "0")
    if request.param == "sm80":
        monkeypatch.setenv("PIT_DISABLE_WGMMA", "1")
    if request.param == "persistent":
        monkeypatch.setenv("PIT_MOE_PERSISTENT", "1")
    return request.param


def _assert_staged_lowered(kernel, fn, *operands, dtype, d, f):
    """Under the staged fixture, the cases the staged forward serves must lower to it (so these
    tests check its kernels, not the fused one's)."""
    from pit_jax import moe_cuda
    staged = "@pit_moe_matmul_staged(" in jax.jit(fn).lower(*operands).as_text()
    serves = kernel == "staged" and moe_cuda.staged_applies(DTYPES[dtype], d, f, 1, 1, False)
    assert staged == serves


def _lowered_layer(t, k, e, d, f, activation="swiglu", *, grad):
    """CUDA lowering of moe_ffn on abstract bf16 operands: its forward, or (grad) jit(value_and_grad)
    of the sum of its output w.r.t. tokens, combine weights and the three weights."""
    from pit_jax.nn.moe import moe_ffn
    x = jax.ShapeDtypeStruct((t, d), jnp.bfloat16)
    ws = tuple(jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((e, d, f), (e, d, f), (e, f, d)))
    ids = jax.ShapeDtypeStruct((t, k), jnp.int32)
    p = jax.ShapeDtypeStruct((t, k), jnp.float32)
    layer = lambda x, p, ws, ids: moe_ffn(x, ids, p, ws, activation)
    loss = lambda x, p, ws, ids: jnp.sum(layer(x, p, ws, ids).astype(jnp.float32))
    fn = jax.value_and_grad(loss, (0, 1, 2)) if grad else layer
    return jax.jit(fn).trace(x, p, ws, ids).lower(lowering_platforms=("cuda",)).as_text()


def test_layer_lowers_to_the_kernels_and_routes_once():
    if not pit_jax.cuda_available():
        pytest.skip("built without CUDA kernels")
    e = 8
    text = _lowered_layer(40, 2, e, 64, 96, grad=True)
    assert text.count("@pit_moe_route(") == 1  # one routing index for 3 forwards, 3 dx, 3 dW
    assert text.count("@pit_moe_matmul_tn(") == 3
    assert text.count("@pit_moe_matmul(") == 6
    assert "ragged_dot" not in text
    weight_transposes = [l for l in text.splitlines() if "stablehlo.transpose" in l and f"tensor<{e}x" in l]
    assert not weight_transposes  # dx reads w transposed in place, no copy


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("t, k, e, d, f, routing", [
    (1, 1, 1, 64, 128, "uniform"),
    (300, 2, 8, 128, 256, "uniform"),
    (257, 4, 64, 72, 136, "zipf"),
    (200, 2, 16, 45, 29, "one_hot"),       # odd d, f: scalar loads
    (130, 8, 256, 64, 64, "invalid"),      # some ids out of range: zero rows
    (1024, 2, 8, 512, 1032, "zipf"),       # many K steps and column tiles, a partial one
    (600, 2, 300, 64, 64, "uniform"),      # more than 256 groups: the tile lookup's second pass
])
def test_kernel_matches_float64(kernel, dtype, t, k, e, d, f, routing):
    dev = _gpu()
    if dev is None or not pit_jax.cuda_available():
        pytest.skip("needs a GPU and the CUDA kernels")
    rng = np.random.default_rng(t * 31 + e)
    x = (rng.standard_normal((t, d)) + 0.1).astype(DTYPES[dtype])
    w = (rng.standard_normal((e, d, f)) / np.sqrt(d)).astype(DTYPES[dtype])
    ids = _route(rng, t, k, e, routing)
    with jax.default_device(dev):
        _assert_staged_lowered(kernel, _fresh(), x, w, ids, dtype=dtype, d=d, f=f)
        out = jax.jit(_fresh())(x, w, ids)
        out_rows = jax.jit(_fresh())(np.repeat(x[:, None], k, 1), w, ids)
    valid = (ids >= 0) & (ids < e)
    want = np.einsum("td,tkdf->tkf", x.astype(np.float64), w.astype(np.float64)[np.clip(ids, 0, e - 1)])
    want[~valid] = 0
    for got in (out, out_rows):
        got = np.asarray(got, np.float64)
        assert np.all(got[~valid] == 0)
        assert np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30) < TOL[dtype]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(
    "t, k, e, d, f", [(300, 2, 8, 128, 256), (97, 4, 64, 45, 29), (5, 1, 16, 200, 136), (700, 2, 3, 136, 264)]
)
@pytest.mark.parametrize("one_hot", [False, True])
def test_kernel_gradients_match_float64(kernel, dtype, t, k, e, d, f, one_hot):
    """dx (forward kernel reading w transposed) and dw (dW kernel), empty experts included; with
    one_hot, every token's first choice is expert 0 (one long group: many dW pipeline stages)."""
    from pit_jax import moe_cuda
    dev = _gpu()
    if dev is None or not pit_jax.cuda_available():
        pytest.skip("needs a GPU and the CUDA kernels")
    rng = np.random.default_rng(t + e)
    x = (rng.standard_normal((t, d)) + 0.1).astype(DTYPES[dtype])
    w = (rng.standard_normal((e, d, f)) / np.sqrt(d)).astype(DTYPES[dtype])
    ids = rng.integers(0, e, (t, k)).astype(np.int32)
    if one_hot:
        ids[:, 0] = 0
    g = rng.standard_normal((t, k, f)).astype(np.float32)
    fn = _fresh()
    loss = lambda x, w: jnp.sum(fn(x, w, ids).astype(jnp.float32) * g)
    with jax.default_device(dev):
        _assert_staged_lowered(kernel, jax.grad(loss, (0, 1)), x, w, dtype=dtype, d=d, f=f)
        dw_staged = "@pit_moe_matmul_tn_staged(" in jax.jit(jax.grad(loss, (0, 1))).lower(x, w).as_text()
        assert dw_staged == (kernel == "staged" and moe_cuda.staged_dw_applies(DTYPES[dtype], d, f, 1, 1))
        gx, gw = jax.jit(jax.grad(loss, (0, 1)))(x, w)
    x64, w64, g64 = x.astype(np.float64), w.astype(np.float64), g.astype(np.float64)
    want_x = np.einsum("tkf,tkdf->td", g64, w64[ids])
    want_w = np.zeros((e, d, f))
    for s in range(k):
        np.add.at(want_w, ids[:, s], x64[:, :, None] * g64[:, s, None, :])
    for got, want in ((gx, want_x), (gw, want_w)):
        got = np.asarray(got, np.float64)
        assert np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30) < TOL[dtype]


# Scans of one to several passes of 1024 (bin, 256-assignment chunk) pairs; the Qwen-like shape;
# the two-launch routing's limits (8960 counts: 140 bins x 64 chunks; 1024 bins) and one past each.
@pytest.mark.parametrize("a, e", [(0, 4), (1, 1), (1000, 8), (4099, 256), (16384, 128), (32768, 287),
                                  (777, 3000), (32769, 8), (20000, 288), (16384, 139), (16384, 140),
                                  (2048, 1023), (2048, 1024), (250000, 6)])
@pytest.mark.parametrize("two_launch", ["default", "0"])
@pytest.mark.parametrize("skew", ["crowded", "one_hot"])
def test_routing_kernel_equals_stable_sort(monkeypatch, a, e, two_launch, skew):
    """order, group_starts and tile_starts from the CUDA counting sort == the jnp argsort tables
    (the scan of (bin, chunk) counts in one and in many passes, and the rank kernel that scans and
    ranks in one launch for small problems, PIT_MOE_ROUTE_TWO_LAUNCH read per launch)."""
    dev = _gpu()
    if dev is None or not pit_jax.cuda_available():
        pytest.skip("needs a GPU and the CUDA kernels")
    from pit_jax import moe_cuda, moe_reference
    if two_launch != "default":
        monkeypatch.setenv("PIT_MOE_ROUTE_TWO_LAUNCH", two_launch)
    rng = np.random.default_rng(a + e)
    ids = rng.integers(-2, e + 2, a).astype(np.int32)
    if skew == "one_hot":
        ids[:] = e - 1  # every assignment on the last expert: one bin takes all of each warp's adds
    elif a > 1:
        ids[: a // 3] = e // 2  # a crowded expert next to sparse ones
    with jax.default_device(dev):
        got = jax.jit(lambda i: moe_cuda.routing_tables_cuda(i, num_experts=e))(ids)
        want = jax.jit(lambda i: moe_reference.routing_tables_ref(i, num_experts=e))(ids)
    for g, w_ in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w_))


_FUSED_LAYOUTS = [(False, True), (False, False), (True, True), (True, False)]


@pytest.mark.parametrize("epilogue", ["relu", "gelu", "swiglu", "scale"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case, t, k, e, d, f, routing", [
    (0, 300, 2, 8, 128, 256, "uniform"),
    (1, 97, 4, 64, 72, 136, "zipf"),          # a partial 128-column tile
    (2, 200, 2, 16, 48, 29, "one_hot"),       # f not a multiple of 8: the unfused path
    (3, 130, 8, 256, 64, 64, "invalid"),
    (4, 700, 2, 3, 520, 264, "one_hot"),      # many K steps, long groups
    (5, 3, 2, 4, 64, 64, "uniform"),          # fewer rows than one TMA box
])
@pytest.mark.parametrize("persistent", [False, True], ids=["tiled", "persistent"])
def test_fused_epilogue_matches_float64(monkeypatch, persistent, epilogue, dtype, case, t, k, e, d, f, routing):
    """Grouped matmul with a fused epilogue (the Hopper kernel where it applies, else grouped
    matmuls and the epilogue in XLA) against float64, each shape in one of the four row
    layouts (rotating, so every epilogue meets every layout); on a compute capability 9 GPU
    the bf16/fp16 cases must lower to the fused kernel."""
    from helpers import moe_layouts_want
    from pit_jax import moe_cuda
    from pit_jax.moe import fused_matmul
    from test_moe_matmul import _epilogue_want
    dev = _gpu_or_skip()
    if persistent:
        monkeypatch.setenv("PIT_MOE_PERSISTENT", "1")
    x_sorted, out_sorted = _FUSED_LAYOUTS[(case + ["relu", "gelu", "swiglu", "scale"].index(epilogue)) % 4]
    rng, ids, x = _layout_inputs(t * 5 + e + 2 * x_sorted + out_sorted, t, k, e, d, routing, x_sorted, dtype)
    w, w_up = ((rng.standard_normal((e, d, f)) / np.sqrt(d)).astype(DTYPES[dtype]) for _ in range(2))
    scale = rng.uniform(0.1, 1.0, t * k).astype(np.float32)
    named = {"swiglu": dict(w_up=w_up), "scale": dict(scale=scale)}.get(epilogue, {})
    with jax.default_device(dev):
        routing_index = pit_jax.moe_routing(ids, e)
        fn = jax.jit(lambda x, w: fused_matmul(x, w, routing_index, epilogue=epilogue,
                                               rows_per_source=1 if x_sorted else k, x_sorted=x_sorted,
                                               out_sorted=out_sorted, **named))
        fused = "@pit_moe_fused(" in fn.lower(x, w).as_text()
        got = np.asarray(fn(x, w), np.float64)
        order = np.asarray(routing_index.order)
    assert fused == moe_cuda.fused_epilogue_applies(x.dtype, d, f)
    if str(getattr(dev, "compute_capability", "")).startswith("9.") and dtype != "float32" and f % 8 == 0:
        assert fused
    zero_g = np.zeros((t * k, f))
    product, up = (moe_layouts_want(x, w_, ids, order, zero_g, x_sorted=x_sorted, out_sorted=out_sorted)[0]
                   for w_ in (w, w_up))
    want = _epilogue_want(epilogue, product, up, scale[order] if out_sorted else scale)
    assert np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30) < TOL[dtype]


@pytest.mark.parametrize("activation, unfused_matmuls", [("swiglu", 6), ("relu", 4)])
def test_layer_lowers_fused_for_inference_only(monkeypatch, activation, unfused_matmuls):
    """moe_ffn's up-projection (with its activation) and down-projection (with the combine
    weights) lower to one fused call each where the fused kernel applies (forced here, so any
    machine with the CUDA module checks the wiring), and to the unfused matmuls under
    differentiation."""
    if not pit_jax.cuda_available():
        pytest.skip("built without CUDA kernels")
    from pit_jax import moe_cuda
    monkeypatch.setattr(moe_cuda, "fused_epilogue_applies", lambda dtype, d, f: True)
    text = _lowered_layer(40, 2, 8, 64, 96, activation, grad=False)
    assert text.count("@pit_moe_fused(") == 2 and "@pit_moe_matmul(" not in text  # fused up, fused down
    text = _lowered_layer(40, 2, 8, 64, 96, activation, grad=True)
    assert "@pit_moe_fused(" not in text and text.count("@pit_moe_matmul(") == unfused_matmuls


# Expert sizes around the Hopper forward's 128-row tile and its two 64-row warpgroup halves: a
# last tile of 1, 63, 64 rows leaves the second warpgroup idle, 65 and more do not; an empty expert.
_HALF_TILE_SIZES = (1, 63, 64, 65, 0, 127, 128, 129, 191, 192, 193, 320)


@pytest.mark.parametrize("x_sorted, out_sorted", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("w_transposed", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("variant", ["default", "PIT_MOE_SKIP_IDLE_HALF=0", "PIT_MOE_TWO_ENDED=0"])
def test_tiled_forward_rows_around_warpgroup_halves(monkeypatch, variant, dtype, w_transposed, x_sorted, out_sorted):
    """The tiled Hopper forward (PIT_MOE_STAGED=0) on experts whose last tile ends just before,
    at and after row 64, where the second consumer warpgroup skips its MMAs (and the producer
    its rows) unless PIT_MOE_SKIP_IDLE_HALF=0; row tiles from both ends of the routing (the default
    for this few rows per expert) and in order (PIT_MOE_TWO_ENDED=0): every output row against float64 on its own, so one row left at zero
    or computed from padding fails."""
    from helpers import moe_layouts_want
    from pit_jax.moe import moe_matmul_p
    dev = _gpu_or_skip()
    monkeypatch.setenv("PIT_MOE_STAGED", "0")
    if variant != "default":
        monkeypatch.setenv(*variant.split("="))
    e, d, f = len(_HALF_TILE_SIZES), 200, 264  # a partial K step and a partial column tile
    rng = np.random.default_rng(97 + 2 * x_sorted + out_sorted + 4 * w_transposed)
    ids = rng.permutation(np.repeat(np.arange(e), _HALF_TILE_SIZES)).astype(np.int32)[:, None]
    a = ids.shape[0]
    x = (rng.standard_normal((a, d)) + 0.1).astype(DTYPES[dtype])
    w = (rng.standard_normal((e, d, f)) / np.sqrt(d)).astype(DTYPES[dtype])
    w_arg = np.ascontiguousarray(np.swapaxes(w, 1, 2)) if w_transposed else w
    with jax.default_device(dev):
        routing_index = pit_jax.moe_routing(ids, e)
        fn = jax.jit(lambda x, w: moe_matmul_p.bind(x, w, *routing_index, rows_per_source=1,
                                                    w_transposed=w_transposed, x_sorted=x_sorted,
                                                    out_sorted=out_sorted))
        assert "@pit_moe_matmul(" in fn.lower(x, w_arg).as_text()
        got = np.asarray(fn(x, w_arg), np.float64)
        order = np.asarray(routing_index.order)
    want = moe_layouts_want(x, w, ids, order, np.zeros((a, f)), x_sorted=x_sorted, out_sorted=out_sorted)[0]
    row_err = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert np.all(np.isfinite(got)) and row_err.max() < 3 * TOL[dtype], np.argsort(row_err)[-5:]


@pytest.mark.parametrize("x_sorted, out_sorted", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("w_transposed", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("t, k, e, d, f, routing", [
    (300, 2, 8, 136, 200, "uniform"),     # d, f not multiples of the 64 / 256 tile
    (257, 4, 64, 72, 264, "zipf"),        # skewed: long and empty groups
    (130, 8, 256, 64, 64, "invalid"),     # ids out of range: zero rows (group E)
    (700, 2, 3, 520, 264, "one_hot"),     # one expert holds every row; K over 8 steps
    (3, 2, 4, 64, 64, "uniform"),         # fewer rows than one tile
    # experts of >= kMoeStagedSplitMinRows (16384) rows: split into 4096-row blocks
    (8600, 2, 3, 64, 72, "one_hot"),        # one expert of 17200 rows: 4 x 4096 + 816
    (8192, 2, 1, 64, 64, "blocks"),         # one expert of exactly 16384 rows: four whole blocks
    (8191, 2, 1, 64, 64, "blocks"),         # 16382 rows: not split
    (11000, 2, 2, 72, 64, "skewed_blocks"),  # 17600 rows from row 4400: blocks start inside a slot
    (9000, 2, 2, 64, 64, "invalid"),        # slots among the rows of invalid ids
])
def test_staged_forward_matches_float64(monkeypatch, x_sorted, out_sorted, w_transposed, dtype, t, k, e, d, f,
                                        routing):
    """The staged forward (gather into routing order, CUTLASS grouped GEMM, SWrite in its epilogue) in each row
    layout, with w as [E, d, f] and as [E, f, d] (dx's layout), against float64; on a compute
    capability 9 GPU it must be the path that lowered."""
    from helpers import moe_layouts_want
    from pit_jax import moe_cuda
    from pit_jax.moe import moe_matmul_p
    dev = _gpu_or_skip()
    monkeypatch.setenv("PIT_MOE_STAGED", "1")
    rng, ids, x = _layout_inputs(t * 7 + e + 2 * x_sorted + out_sorted, t, k, e, d, routing, x_sorted, dtype)
    w = (rng.standard_normal((e, d, f)) / np.sqrt(d)).astype(DTYPES[dtype])
    w_arg = np.ascontiguousarray(np.swapaxes(w, 1, 2)) if w_transposed else w
    with jax.default_device(dev):
        routing_index = pit_jax.moe_routing(ids, e)
        # the primitive itself: w_transposed (dx's form) is not a public argument
        fn = jax.jit(lambda x, w: moe_matmul_p.bind(x, w, *routing_index, rows_per_source=1 if x_sorted else k,
                                                    w_transposed=w_transposed, x_sorted=x_sorted,
                                                    out_sorted=out_sorted))
        staged = "@pit_moe_matmul_staged(" in fn.lower(x, w_arg).as_text()
        got = np.asarray(fn(x, w_arg), np.float64)
        order = np.asarray(routing_index.order)
    assert staged == moe_cuda.staged_applies(x.dtype, d, f, 1, 1, out_sorted)
    if str(getattr(dev, "compute_capability", "")).startswith("9."):
        assert staged or not pit_jax.build_info().get("moe_staged")
    want = moe_layouts_want(x, w, ids, order, np.zeros((t * k, f)), x_sorted=x_sorted, out_sorted=out_sorted)[0]
    assert np.all(np.isfinite(got))
    assert np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30) < TOL[dtype]
    if routing == "invalid":  # rows of out-of-range ids are exactly zero
        flat = ids.reshape(-1)
        bad_rows = np.nonzero((flat[order] < 0) | (flat[order] >= e))[0] if out_sorted else \
            np.nonzero((flat < 0) | (flat >= e))[0]
        assert bad_rows.size and np.all(got[bad_rows] == 0)


def test_staged_forward_lowering_has_its_workspace(monkeypatch):
    """Where the staged forward applies (forced here, so any machine with the CUDA module checks
    the wiring) pit_moe_matmul lowers to pit_moe_matmul_staged with a u8 workspace of the layout's
    size: the gathered x rows only where x is not in routing order, and no section for the product
    in either output layout (the epilogue writes its rows in place)."""
    if not pit_jax.cuda_available():
        pytest.skip("built without CUDA kernels")
    from pit_jax import moe_cuda
    from pit_jax.moe import grouped_matmul
    monkeypatch.setattr(moe_cuda, "staged_applies", lambda *a: True)
    t, k, e, d, f = 40, 2, 8, 64, 96
    ids = np.random.default_rng(0).integers(0, e, (t, k)).astype(np.int32)
    x = jax.ShapeDtypeStruct((t, d), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((e, d, f), jnp.bfloat16)
    for out_sorted in (False, True):
        fn = lambda x, w: grouped_matmul(x, w, pit_jax.moe_routing(ids, e), rows_per_source=k, x_sorted=False,
                                         out_sorted=out_sorted)
        text = jax.jit(fn).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
        size = moe_cuda.staged_workspace_bytes(e, t * k, d, f, 2, False, True)
        assert text.count("@pit_moe_matmul_staged(") == 1 and "@pit_moe_matmul(" not in text
        assert f"tensor<{size}xui8>" in text
    assert moe_cuda.staged_workspace_bytes(e, t * k, d, f, 2, False, False) - \
        moe_cuda.staged_workspace_bytes(e, t * k, d, f, 2, False, True) == -(-t * k * f * 2 // 256) * 256


def test_staged_rule_by_layout_rows_and_switch(monkeypatch):
    """The lowering's choice of the staged forward where it can serve (forced here): by default
    for >= STAGED_MIN_ROWS_PER_EXPERT rows per expert in either output layout;
    PIT_MOE_STAGED=1 everywhere, 0 nowhere; never where it cannot serve."""
    from pit_jax import _ext, moe_cuda
    monkeypatch.setattr(moe_cuda, "fused_epilogue_applies", lambda dtype, d, f: True)
    monkeypatch.setattr(_ext, "build_info", lambda: {"moe_staged": True})
    rows = moe_cuda.STAGED_MIN_ROWS_PER_EXPERT
    bf16 = jnp.bfloat16
    monkeypatch.delenv("PIT_MOE_STAGED", raising=False)
    assert moe_cuda.staged_applies(bf16, 64, 64, rows * 8, 8, True)
    assert not moe_cuda.staged_applies(bf16, 64, 64, rows * 8 - 1, 8, True)
    assert moe_cuda.staged_applies(bf16, 64, 64, rows * 8, 8, False)  # scattered: the epilogue's SWrite
    assert not moe_cuda.staged_applies(bf16, 64, 64, rows * 8 - 1, 8, False)
    monkeypatch.setenv("PIT_MOE_STAGED", "1")
    assert moe_cuda.staged_applies(bf16, 64, 64, 1, 8, False)
    monkeypatch.setenv("PIT_MOE_STAGED", "0")
    assert not moe_cuda.staged_applies(bf16, 64, 64, rows * 8, 8, True)
    monkeypatch.setenv("PIT_MOE_STAGED", "1")
    monkeypatch.setattr(_ext, "build_info", lambda: {"moe_staged": False})  # built without CUTLASS
    assert not moe_cuda.staged_applies(bf16, 64, 64, rows * 8, 8, True)
    assert not moe_cuda.staged_dw_applies(bf16, 64, 64, rows * 8, 8)
    monkeypatch.setattr(_ext, "build_info", lambda: {"moe_staged": True})
    monkeypatch.delenv("PIT_MOE_STAGED_DW", raising=False)
    assert moe_cuda.staged_dw_applies(bf16, 64, 64, rows * 8, 8)
    assert not moe_cuda.staged_dw_applies(bf16, 64, 64, rows * 8 - 1, 8)
    monkeypatch.setenv("PIT_MOE_STAGED_DW", "0")
    assert not moe_cuda.staged_dw_applies(bf16, 64, 64, rows * 8, 8)


def test_mixtral_training_step_lowers_every_matmul_staged(monkeypatch):
    """At Mixtral's shape (T=4096, E=8, top-2, 4096 -> 14336) the rule stages all six grouped
    matmuls of a SwiGLU layer's training step — the configuration session 19's layer table
    measured: the up-projections' forward and the down-projection's dx write routing-order
    rows, the down-projection's forward and the up-projections' dx contract over 14336."""
    if not pit_jax.cuda_available():
        pytest.skip("built without CUDA kernels")
    from pit_jax import _ext, moe_cuda
    monkeypatch.setattr(moe_cuda, "fused_epilogue_applies", lambda dtype, d, f: True)
    monkeypatch.setattr(_ext, "build_info", lambda: {"moe_staged": True})
    monkeypatch.delenv("PIT_MOE_STAGED", raising=False)
    text = _lowered_layer(4096, 2, 8, 4096, 14336, grad=True)
    assert text.count("@pit_moe_matmul_staged(") == 6 and "@pit_moe_matmul(" not in text
    assert text.count("@pit_moe_matmul_tn_staged(") == 3 and "@pit_moe_matmul_tn(" not in text


@pytest.mark.parametrize("x_sorted, out_sorted", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("t, k, e, d, f, routing", [
    (300, 2, 8, 136, 200, "uniform"),     # rows per expert not a multiple of the 64-row K step
    (257, 4, 64, 72, 264, "zipf"),        # skewed: long and empty experts
    (130, 8, 256, 64, 64, "invalid"),     # ids out of range: rows of no expert
    (700, 2, 3, 520, 264, "one_hot"),     # one expert holds half the rows
    (3, 2, 16, 64, 64, "uniform"),        # most experts empty: their dw zeroed apart
])
def test_staged_dw_matches_float64(monkeypatch, x_sorted, out_sorted, dtype, t, k, e, d, f, routing):
    """The staged dW (x's and dy's rows gathered into routing order where they are not, CUTLASS's
    grouped GEMM over each expert's rows) in each row layout against float64, empty experts
    exactly zero; on a compute capability 9 GPU it must be the path that lowered."""
    from helpers import moe_layouts_want
    from pit_jax import moe_cuda
    from pit_jax.moe import moe_matmul_tn_p
    dev = _gpu_or_skip()
    monkeypatch.setenv("PIT_MOE_STAGED_DW", "1")
    rng, ids, x = _layout_inputs(t * 11 + e + 2 * x_sorted + out_sorted, t, k, e, d, routing, x_sorted, dtype)
    g = rng.standard_normal((t * k, f)).astype(DTYPES[dtype])
    w = np.zeros((e, d, f), DTYPES[dtype])
    with jax.default_device(dev):
        routing_index = pit_jax.moe_routing(ids, e)
        order, group_starts = routing_index.order, routing_index.group_starts
        fn = jax.jit(lambda x, g: moe_matmul_tn_p.bind(x, g, order, group_starts,
                                                       rows_per_source=1 if x_sorted else k, num_experts=e,
                                                       out_dtype=jnp.float32, x_sorted=x_sorted,
                                                       out_sorted=out_sorted))
        staged = "@pit_moe_matmul_tn_staged(" in fn.lower(x, g).as_text()
        got = np.asarray(fn(x, g), np.float64)
        order = np.asarray(order)
    assert staged == moe_cuda.staged_dw_applies(x.dtype, d, f, 1, 1)
    if str(getattr(dev, "compute_capability", "")).startswith("9."):
        assert staged or not pit_jax.build_info().get("moe_staged")
    want = moe_layouts_want(x, w, ids, order, g, x_sorted=x_sorted, out_sorted=out_sorted)[2]
    assert np.all(np.isfinite(got))
    assert np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30) < TOL[dtype]
    flat = ids.reshape(-1)
    empty = [i for i in range(e) if not np.any(flat == i)]
    assert np.all(got[empty] == 0)
