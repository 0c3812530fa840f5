"""sparse_dense with detection fused into pack (`pit_sparse_dense_detect`, chosen when lowering
for CUDA: docs/kgather.md). On the GPU: values against float64 and bit for bit against the
separate detect + pack kernels, over odd shapes (rows not a multiple of 32, columns not a multiple
of a chunk), every dtype, empty and full sparsity, special values; gradients; and the detect call
removed from the compiled program. On any machine with the CUDA kernels built: when the lowering
picks it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import pit_jax
from helpers import DTYPES, random_tile_sparse, stable_seed

TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}  # relative Frobenius error
TILE = (32, 1)


def _rel_err(got, want):
    got = np.asarray(got, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def _gpu_only(backend):
    if backend != "gpu":
        pytest.skip("the fused kernel is a CUDA lowering (the CPU path is the reference)")


def _force_fused(monkeypatch, fused: bool):
    """The lowering's fused path forced on (every shape) or turned off."""
    monkeypatch.setenv("PIT_KGATHER_FUSED", "1" if fused else "0")
    monkeypatch.setenv("PIT_KGATHER_FUSED_MIN_GROUPS", "1")


def _forward(monkeypatch, x, w, fused: bool):
    """sparse_dense(x, w) lowered with the fused path forced on (every shape) or turned off."""
    _force_fused(monkeypatch, fused)
    f = jax.jit(lambda x, w: pit_jax.sparse_dense(x, w, tile=TILE))  # a new function: lowered anew
    text = f.lower(x, w).as_text()
    assert ("pit_sparse_dense_detect" in text) == fused
    return f(x, w)


# K: one partial chunk (24), a whole 16-bit chunk plus 8 columns (520), several chunks (1544)
SHAPES = {"odd": (1, 70, 520, 29), "small_batched": (2, 33, 24, 130), "long_rows": (3, 64, 1544, 136)}


# The fused kernel's launch variants (variables read per launch): the 256-thread ring of GPUs with
# < 198 KB of shared memory per block, the block-scan algorithms other than the default,
# and dependent launches off (on by default for the fused path's two kernels).
VARIANTS = {"default": None, "ring256": ("PIT_KGATHER_FUSED_THREADS", "256"),
            "scan_raking": ("PIT_KGATHER_FUSED_SCAN", "raking"), "scan_warp": ("PIT_KGATHER_FUSED_SCAN", "warp"),
            "no_pdl": ("PIT_KGATHER_PDL", "0")}


def _set_variant(monkeypatch, variant):
    if VARIANTS[variant] is not None:
        monkeypatch.setenv(*VARIANTS[variant])


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_fused_matches_float64_and_separate_kernels(backend, monkeypatch, variant, dtype, sparsity, shape):
    _gpu_only(backend)
    _set_variant(monkeypatch, variant)
    b, m, k, n = shape
    rng = np.random.default_rng(stable_seed(dtype, sparsity, shape))
    x = random_tile_sparse(rng, (b, m, k), TILE, sparsity, dtype)
    w = (rng.standard_normal((k, n)) + 0.1).astype(DTYPES[dtype])
    y = _forward(monkeypatch, x, w, fused=True)
    y_separate = _forward(monkeypatch, x, w, fused=False)
    assert y.shape == (b, m, n) and y.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_separate, np.float32))
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    if sparsity == 1.0:
        np.testing.assert_array_equal(np.asarray(y, np.float32), 0)
    else:
        assert _rel_err(y, want) < TOL[dtype]


@pytest.mark.parametrize("variant", ["default", "no_pdl"])
def test_fused_many_groups_and_chunks(backend, monkeypatch, variant):
    """Many groups (126, over a batch of two 2000-row matrices) and rows of 9
    chunks with a partial last one: bit for bit the separate kernels, and within bf16 tolerance of float64."""
    _gpu_only(backend)
    _set_variant(monkeypatch, variant)
    rng = np.random.default_rng(stable_seed("many", variant))
    x = random_tile_sparse(rng, (2, 2000, 9000), TILE, 0.9, "bfloat16")
    w = (rng.standard_normal((9000, 72)) + 0.1).astype(DTYPES["bfloat16"])
    y = _forward(monkeypatch, x, w, fused=True)
    y_separate = _forward(monkeypatch, x, w, fused=False)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_separate, np.float32))
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    assert _rel_err(y, want) < TOL["bfloat16"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("sparsity", [0.5, 0.95, 1.0])
def test_empty_groups_among_many_tiles(backend, monkeypatch, dtype, sparsity):
    """A grid of 4096 forward tiles (128 groups x 32 column tiles of a ragged 4000 columns) with a
    quarter of the groups empty, between nonempty ones and last: empty groups write zeros, the
    fused path matches the separate kernels bit for bit and float64 within tolerance."""
    _gpu_only(backend)
    rng = np.random.default_rng(stable_seed("many_tiles", dtype, sparsity))
    x = random_tile_sparse(rng, (4, 1024, 1000), TILE, sparsity, dtype)
    x[:, 32:64] = 0                      # empty groups among nonempty ones
    x[:, 256:512] = 0
    x[3, 992:] = 0                       # an empty last group
    w = (rng.standard_normal((1000, 4000)) + 0.1).astype(DTYPES[dtype])
    y = np.asarray(_forward(monkeypatch, x, w, fused=True), np.float32)
    y_separate = np.asarray(_forward(monkeypatch, x, w, fused=False), np.float32)
    np.testing.assert_array_equal(y, y_separate)
    np.testing.assert_array_equal(y[:, 32:64], 0)
    np.testing.assert_array_equal(y[3, 992:], 0)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    if sparsity == 1.0:
        np.testing.assert_array_equal(y, 0)
    else:
        assert _rel_err(y, want) < TOL[dtype]


@pytest.mark.parametrize("variant", ["default", "no_pdl"])
def test_fused_reused_workspace_alternating_patterns(backend, monkeypatch, variant):
    """One compiled function called on inputs with different patterns, alternately, several times:
    each call's counts, ids and packed x replace the previous call's in the reused scratch (a count
    or id left from another call would show as a wrong product)."""
    _gpu_only(backend)
    _set_variant(monkeypatch, variant)
    _force_fused(monkeypatch, True)
    rng = np.random.default_rng(stable_seed("reused", variant))
    xs = [random_tile_sparse(rng, (2, 1000, 1544), TILE, sp, "bfloat16") for sp in (0.5, 0.99, 0.9)]
    xs[1][:, 64:512] = 0  # empty groups where the others have columns
    w = (rng.standard_normal((1544, 136)) + 0.1).astype(DTYPES["bfloat16"])
    f = jax.jit(lambda x, w: pit_jax.sparse_dense(x, w, tile=TILE))
    assert "pit_sparse_dense_detect" in f.lower(xs[0], w).as_text()
    wants = [np.asarray(x, np.float64) @ np.asarray(w, np.float64) for x in xs]
    for i in [0, 1, 2, 1, 0, 2]:
        y = f(xs[i], w)
        assert _rel_err(y, wants[i]) < TOL["bfloat16"], i


def test_fused_special_values(backend, monkeypatch):
    """-0.0 is zero (its column is skipped), inf and subnormals are nonzero: as in detect."""
    _gpu_only(backend)
    rng = np.random.default_rng(7)
    x = random_tile_sparse(rng, (96, 1040), TILE, 0.9, "float32")
    x[5, 3] = -0.0            # a column holding only -0.0 in its group
    x[:32, 3] = -0.0
    x[40, 700] = np.inf
    x[70, 1039] = 1e-40       # subnormal, in the last column
    w = (rng.standard_normal((1040, 24)) + 0.1).astype(np.float32)
    y = np.asarray(_forward(monkeypatch, x, w, fused=True))
    y_separate = np.asarray(_forward(monkeypatch, x, w, fused=False))
    np.testing.assert_array_equal(y, y_separate)
    assert np.isinf(y[40]).any() and np.isfinite(np.delete(y, 40, axis=0)).all()


def test_fused_gradients_match_float64(backend, monkeypatch):
    _gpu_only(backend)
    monkeypatch.setenv("PIT_KGATHER_FUSED_MIN_GROUPS", "1")
    rng = np.random.default_rng(11)
    x = random_tile_sparse(rng, (2, 80, 264), TILE, 0.9, "float32")
    w = (rng.standard_normal((264, 40)) + 0.1).astype(np.float32)
    g = rng.standard_normal((2, 80, 40)).astype(np.float32)
    loss = lambda x, w: jnp.sum(pit_jax.sparse_dense(x, w, tile=TILE) * g)
    step = jax.jit(jax.value_and_grad(loss, (0, 1)))  # the value needs the forward (grad alone does not)
    assert "pit_sparse_dense_detect" in step.lower(x, w).as_text()
    value, (dx, dw) = step(x, w)
    g64 = g.astype(np.float64)
    assert abs(float(value) - float(np.sum((np.asarray(x, np.float64) @ np.asarray(w, np.float64)) * g64))) < 1e-3
    want_dx = g64 @ np.asarray(w, np.float64).T
    want_dw = np.asarray(x, np.float64).reshape(-1, 264).T @ g64.reshape(-1, 40)
    assert _rel_err(dx, want_dx) < 1e-5 and _rel_err(dw, want_dw) < 1e-5


def test_fused_program_drops_the_detect_call(backend):
    """With the default threshold (4096 rows = 128 groups), the compiled program calls the fused
    kernel and no separate detection: XLA removed the unused detect custom call."""
    _gpu_only(backend)
    x = jax.ShapeDtypeStruct((4096, 512), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16)
    hlo = jax.jit(lambda x, w: pit_jax.sparse_dense(x, w)).lower(x, w).compile().as_text()
    assert "pit_sparse_dense_detect" in hlo and "pit_detect\"" not in hlo


@pytest.mark.parametrize("case, fused", [
    ("default", True),                 # 4096 rows: 128 groups of 32
    ("few_groups", False),             # 1024 rows: 32 groups, below FUSED_MIN_GROUPS
    ("batched_groups", True),          # 4 x 512 rows: 64 groups over the batch
    ("rows_not_16_byte", False),       # 20 bf16 columns: 40-byte rows
    ("index_given", False),            # the caller's index: x may be nonzero outside it
    ("other_tile", False),             # 64x1 tiles
    ("turned_off", False),             # PIT_KGATHER_FUSED=0
])
def test_lowering_picks_the_fused_kernel(monkeypatch, case, fused):
    if not pit_jax.cuda_available():
        pytest.skip("built without CUDA kernels")
    shape = {"few_groups": (1024, 512), "batched_groups": (4, 512, 512), "rows_not_16_byte": (4096, 20)}.get(
        case, (4096, 512))
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    w = jax.ShapeDtypeStruct((shape[-1], 64), jnp.bfloat16)
    if case == "turned_off":
        monkeypatch.setenv("PIT_KGATHER_FUSED", "0")
    if case == "index_given":
        f = lambda x, w: pit_jax.sparse_dense(x, w, index=pit_jax.detect(x, TILE))
    else:
        f = lambda x, w: pit_jax.sparse_dense(x, w, tile=(64, 1) if case == "other_tile" else TILE)
    text = jax.jit(f).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert ("pit_sparse_dense_detect" in text) == fused
    assert "pit_sparse_dense" in text


def test_export_with_a_symbolic_batch_keeps_the_separate_kernels():
    """Whether a symbolic batch reaches 64 groups is unknown when lowering: the export takes the
    separate detect and pack kernels (any size), and 32x1 tiles export as before."""
    if not pit_jax.cuda_available():
        pytest.skip("built without CUDA kernels")
    b, = export.symbolic_shape("b")
    fn = jax.jit(lambda x, w: pit_jax.sparse_dense(x, w))
    exp = export.export(fn, platforms=("cpu", "cuda"),
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(t) for t in
                                         ("pit_detect", "pit_sparse_dense")])(
        jax.ShapeDtypeStruct((b, 64, 512), jnp.bfloat16), jax.ShapeDtypeStruct((512, 8), jnp.bfloat16))
    text = exp.mlir_module()
    assert "pit_sparse_dense" in text and "pit_sparse_dense_detect" not in text
