"""detect == NumPy reference, bit for bit, on every backend present (cpu; gpu where there is one)."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import pit_jax
from pit_jax.detect_reference import detect_reference
from helpers import DTYPES, random_tile_sparse, reference_detect, stable_seed

TILES = [(1, 1), (8, 8), (16, 1), (32, 1), (1, 32), (64, 16), (128, 128), (3, 5), (1, 128), (128, 1),
         (5, 300), (40, 257)]
SHAPES = [(130, 257), (37, 300), (256, 128), (2, 3, 45, 70), (33, 1001)]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]


def _check(idx, x, tile, layout):
    counts, offsets, indices = reference_detect(x, tile, layout)
    np.testing.assert_array_equal(np.asarray(idx.counts), counts)
    np.testing.assert_array_equal(np.asarray(idx.offsets), offsets)
    np.testing.assert_array_equal(np.asarray(idx.indices), indices)


def _detect_jit(tile, layout):
    return jax.jit(lambda x: pit_jax.detect(x, tile, layout=layout))


@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("tile", TILES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tiles_and_shapes(backend, shape, tile, layout):
    if tile[0] > shape[-2] or tile[1] > shape[-1]:
        pytest.skip("tile larger than the array is an error (tested elsewhere)")
    rng = np.random.default_rng(stable_seed(shape, tile, layout))
    f = _detect_jit(tile, layout)
    for sparsity in (0.5, 0.9):
        x = random_tile_sparse(rng, shape, tile, sparsity, "bfloat16")
        _check(f(x), x, tile, layout)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("tile", [(32, 1), (1, 64), (16, 16)], ids=str)
def test_dtypes_and_sparsity(backend, dtype, sparsity, tile):
    rng = np.random.default_rng(7)
    shape = (3, 97, 203)
    x = random_tile_sparse(rng, shape, tile, sparsity, dtype)
    for layout in ("row", "col"):
        idx = _detect_jit(tile, layout)(x)
        _check(idx, x, tile, layout)
    nb = idx.grid[0] * idx.grid[1]
    if sparsity == 0.0:
        assert int(idx.nnz.min()) > 0
    if sparsity == 1.0:
        assert int(idx.nnz.max()) == 0 and np.all(np.asarray(idx.indices) == -1)
    assert np.all(np.asarray(idx.nnz) <= nb)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_special_values(backend, dtype):
    """NaN, inf and subnormals count as nonzero; -0.0 counts as zero."""
    dt = DTYPES[dtype]
    x = np.zeros((4, 40), dt)
    x[0, 0] = -0.0
    x[1, 9] = np.nan
    x[2, 17] = -np.inf
    x[3, 39] = ml_dtypes.finfo(dt).smallest_subnormal
    idx = _detect_jit((1, 8), "row")(x)
    np.testing.assert_array_equal(np.asarray(idx.counts), [0, 1, 1, 1])
    np.testing.assert_array_equal(np.asarray(idx.indices)[1:, 0], [1, 2, 4])


def test_unaligned_widths(backend):
    """Widths that are not a multiple of the 16-byte vector exercise the scalar load path."""
    rng = np.random.default_rng(3)
    for k in (1, 7, 9, 33, 255):
        x = random_tile_sparse(rng, (19, k), (1, 1), 0.7, "float16")
        for layout in ("row", "col"):
            _check(_detect_jit((4, 1), layout)(x), x, (4, 1), layout)


# The CUDA handler picks a per-row or a chunked compaction from the shape; cover both, with
# narrow (thread per tile) and wide (warp per tile) tiles.
@pytest.mark.parametrize("shape, tile, layout", [
    ((3, 2100), (1, 1), "row"),      # per-row, 3 chunks per outer block
    ((2100, 3), (1, 1), "row"),      # per-row, offsets scanned over 2100 counts
    ((3, 9000), (1, 1), "row"),      # chunked: 9 chunks, 3 outer blocks
    ((9000, 3), (1, 1), "col"),      # chunked, column layout
    ((300, 600), (1, 300), "col"),   # chunked, wide tiles
    ((9000, 300), (1, 300), "col"),  # chunked, wide: m-gather rows of a long sequence
    ((2, 7, 5000), (7, 2500), "row"),
    ((70, 9000), (1, 9000), "col"),
    ((100, 64), (33, 2), "row"),     # row blocks of two 32-row slabs
], ids=str)
def test_chunking_edges(backend, shape, tile, layout):
    rng = np.random.default_rng(17)
    for sparsity in (0.0, 0.6, 1.0):
        x = random_tile_sparse(rng, shape, tile, sparsity, "bfloat16")
        _check(_detect_jit(tile, layout)(x), x, tile, layout)


# Word rows (row layout, tile_k dividing 32, tile_m <= 32) with at most 16384 mask words per batch element and
# rows of a multiple of 128 columns: the CUDA handler writes offsets from each CTA's own count of
# the row blocks before it; above that size, from the last CTA's scan.
@pytest.mark.parametrize("shape, tile", [
    ((2, 3, 300, 256), (32, 1)),   # per-CTA prefixes over a batch
    ((2, 300, 256), (1, 1)),       # 300 row blocks of one row
    ((200, 512), (16, 2)),         # tiles of two columns
    ((190, 384), (64, 16)),        # two slabs per row block: the last-CTA scan
    ((512, 1024), (1, 1)),         # 16384 mask words: the largest with per-CTA prefixes
    ((513, 1024), (1, 1)),         # 16416 words: the last-CTA scan
], ids=str)
@pytest.mark.parametrize("prefix", ["default", "serial"])
def test_word_rows_offsets(backend, monkeypatch, shape, tile, prefix):
    if prefix == "serial":  # the prefix summed before the row's own compaction (session 12's order)
        monkeypatch.setenv("PIT_DETECT_PREFIX", "serial")
    rng = np.random.default_rng(23)
    for sparsity in (0.0, 0.5, 0.99, 1.0):
        x = random_tile_sparse(rng, shape, tile, sparsity, "bfloat16")
        _check(_detect_jit(tile, "row")(x), x, tile, "row")


# Row bits (column layout, tiles spanning whole 16-byte-per-lane warp column spans: one tile
# column, or widths that are a multiple of 256 columns for 16-bit dtypes and of 128 for fp32):
# the CUDA mask pass writes one bit per row block and task instead of 32-column words. With one
# column block of row blocks of at most 32 rows and more than 256 of them, segments of 256 row
# blocks are compacted by their own CTAs. PIT_DETECT_ROW_BITS=single forces one CTA per column
# block, =0 the older paths, so every path is compared with the reference.
ROW_BITS_VARIANTS = {"default": None, "single": "single", "off": "0"}


@pytest.mark.parametrize("row_bits", list(ROW_BITS_VARIANTS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape, tile", [
    ((300, 512), (1, 512)),        # 32 row blocks per mask task
    ((2, 301, 700), (3, 700)),     # 10 row blocks per task, unaligned rows (scalar loads), batch
    ((2, 301, 704), (3, 704)),     # the same, 16-byte loads
    ((2, 1000, 700), (3, 700)),    # two segments; the boundary (row block 256) splits a task of 10
    ((130, 704), (32, 704)),       # one slab per row block, a short last block
    ((230, 512), (100, 512)),      # four slabs per row block
    ((97, 700), (1, 256)),         # three column blocks (the last partial): row bits for every dtype
    ((97, 700), (1, 128)),         # row bits for fp32 only (128-column tasks)
    ((9000, 64), (1, 64)),         # 36 segments, or three steps of 4096 row blocks in one CTA
    ((3, 9000, 16), (2, 16)),      # a batch of narrow rows
    ((70000, 8), (1, 8)),          # 18 steps: the chunked path instead
], ids=str)
def test_row_bits(backend, monkeypatch, row_bits, dtype, shape, tile):
    if ROW_BITS_VARIANTS[row_bits] is not None:
        monkeypatch.setenv("PIT_DETECT_ROW_BITS", ROW_BITS_VARIANTS[row_bits])
    rng = np.random.default_rng(stable_seed(shape, tile, dtype))
    for sparsity in (0.0, 0.5, 0.99, 1.0):
        x = random_tile_sparse(rng, shape, tile, sparsity, dtype)
        _check(_detect_jit(tile, "col")(x), x, tile, "col")


# Narrow tiles of two or four whole mask words (tile_k 64 or 128, at most 64 rows, at most 256
# tiles per row, rows of a multiple of 128 columns, a small mask): the CUDA handler writes
# offsets from each CTA's own count of the tiles before it (ORing a row block's two slabs);
# PIT_DETECT_PREFIX=0 forces the last-CTA scan for the same shapes.
@pytest.mark.parametrize("prefix", ["default", "off"])
@pytest.mark.parametrize("shape, tile", [
    ((2, 300, 512), (64, 64)),     # two slabs per row block, a batch
    ((210, 512), (50, 64)),        # two slabs, a short last row block
    ((300, 1024), (16, 128)),      # one slab, four words per tile
    ((300, 1024), (32, 64)),       # one slab, two words per tile
    ((1024, 4096), (64, 64)),      # 16 row blocks of 64 tiles
    ((300, 600), (64, 64)),        # 19 words per row: the last-CTA scan either way
], ids=str)
def test_grouped_prefix_offsets(backend, monkeypatch, shape, tile, prefix):
    if prefix == "off":
        monkeypatch.setenv("PIT_DETECT_PREFIX", "0")
    rng = np.random.default_rng(29)
    for sparsity in (0.0, 0.5, 0.99, 1.0):
        x = random_tile_sparse(rng, shape, tile, sparsity, "bfloat16")
        _check(_detect_jit(tile, "row")(x), x, tile, "row")


# Word rows write their ids one mask word per warp step when some lane of the warp has more than
# 16 ids (default), each thread its own word's otherwise; PIT_DETECT_WARP_IDS=0 forces per-thread
# stores everywhere. Both against the reference at every density, over each rows kernel: word rows
# (with and without per-CTA prefixes, rows of a length that is not a multiple of 4 slots, two
# steps of 256 words), narrow and wide tiles, and row bits (column layout).
WRITE_ORDER_VARIANTS = {"default": None, "thread_ids": ("PIT_DETECT_WARP_IDS", "0")}


@pytest.mark.parametrize("variant", list(WRITE_ORDER_VARIANTS))
@pytest.mark.parametrize("shape, tile, layout", [
    ((2, 300, 256), (1, 1), "row"),      # word rows, per-CTA prefixes
    ((130, 257), (1, 1), "row"),         # word rows, 257 slots per row: unaligned fill ends
    ((513, 1024), (32, 1), "row"),       # word rows, last-CTA scan
    ((70, 9000), (8, 4), "row"),         # word rows of 2250 tiles: two steps of 256 words
    ((2, 300, 512), (64, 64), "row"),    # narrow tiles, per-CTA prefixes
    ((97, 701), (3, 5), "row"),          # narrow tiles, last-CTA scan
    ((130, 2000), (40, 257), "row"),     # wide tiles
    ((300, 512), (1, 512), "col"),       # row bits, one CTA per column block
], ids=str)
def test_write_order(backend, monkeypatch, shape, tile, layout, variant):
    if WRITE_ORDER_VARIANTS[variant] is not None:
        monkeypatch.setenv(*WRITE_ORDER_VARIANTS[variant])
    if layout == "col":
        monkeypatch.setenv("PIT_DETECT_ROW_BITS", "single")
    rng = np.random.default_rng(31)
    for sparsity in (0.0, 0.5, 0.99, 1.0):
        x = random_tile_sparse(rng, shape, tile, sparsity, "bfloat16")
        _check(_detect_jit(tile, layout)(x), x, tile, layout)


# One-pass word rows (row layout, tile_k dividing 32, tile_m <= 32, a 32-row slab's mask words at
# most 11264): one CUDA kernel reads each slab and compacts its row blocks from shared memory,
# then a second scans the counts into offsets. By default only 32-row blocks on at least 512 CTAs
# take it; PIT_DETECT_ONE_PASS=1 forces it wherever it fits, =0 never, so both are compared with
# the reference on the same shapes; PIT_DETECT_IN_FLIGHT=32 picks the instantiation with 32 rows in
# flight (kept for A/Bs). The default variant clears both switches, whatever the caller's environment;
# the others set their own and leave an inherited PIT_DETECT_IN_FLIGHT (e.g. =8) in force.
ONE_PASS_SWITCHES = ("PIT_DETECT_ONE_PASS", "PIT_DETECT_IN_FLIGHT")
ONE_PASS_VARIANTS = {"default": {}, "forced": {"PIT_DETECT_ONE_PASS": "1"}, "never": {"PIT_DETECT_ONE_PASS": "0"},
                     "forced_32_in_flight": {"PIT_DETECT_ONE_PASS": "1", "PIT_DETECT_IN_FLIGHT": "32"}}


@pytest.mark.parametrize("one_pass", list(ONE_PASS_VARIANTS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape, tile", [
    ((300, 4096), (32, 1)),        # 10 slabs, a short last row block
    ((2, 3, 64, 520), (32, 1)),    # a batch; 520 columns: a partial last column chunk
    ((97, 701), (32, 1)),          # unaligned rows: scalar loads
    ((130, 257), (1, 1)),          # 32 row blocks per slab, 257 slots per row
    ((100, 512), (8, 4)),          # 4 row blocks per slab, 4-column tiles
    ((45, 96), (24, 2)),           # 24-row blocks: one per slab
    ((33, 12288), (32, 1)),        # 384 words per row block
    ((16400, 72), (32, 1)),        # 513 row blocks: the default takes the one-pass kernel
    ((16, 1024, 40), (32, 1)),     # a batch of 16 x 32 row blocks: the default takes it too
    ((40, 3000), (16, 16)),        # 2 row blocks per slab
    ((40, 11264), (1, 1)),         # 32 x 352 words: the most that fits
    ((40, 11296), (1, 1)),         # 32 x 353 words: the two-pass path even when forced
], ids=str)
def test_one_pass_word_rows(backend, monkeypatch, one_pass, dtype, shape, tile):
    if one_pass == "forced_32_in_flight" and dtype == "float16":
        pytest.skip("the 32-in-flight instantiation is shared by the 2-byte types: bf16 covers it")
    if one_pass == "default":
        for name in ONE_PASS_SWITCHES:
            monkeypatch.delenv(name, raising=False)
    for name, value in ONE_PASS_VARIANTS[one_pass].items():
        monkeypatch.setenv(name, value)
    rng = np.random.default_rng(stable_seed(shape, tile, dtype))
    for sparsity in (0.0, 0.5, 0.99, 1.0):
        x = random_tile_sparse(rng, shape, tile, sparsity, dtype)
        _check(_detect_jit(tile, "row")(x), x, tile, "row")


def test_matches_jnp_reference(backend):
    rng = np.random.default_rng(11)
    x = random_tile_sparse(rng, (2, 64, 96), (8, 4), 0.8, "float32")
    for layout in ("row", "col"):
        a = _detect_jit((8, 4), layout)(x)
        b = jax.jit(lambda x: detect_reference(x, (8, 4), layout=layout))(x)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_to_mask_and_density(backend):
    rng = np.random.default_rng(5)
    x = random_tile_sparse(rng, (50, 60), (8, 8), 0.6, "float32")
    from pit_jax.detect_reference import tile_mask
    want = np.asarray(tile_mask(jnp.asarray(x), (8, 8)))
    for layout in ("row", "col"):
        idx = pit_jax.detect(jnp.asarray(x), (8, 8), layout=layout)
        np.testing.assert_array_equal(np.asarray(idx.to_mask()), want)
        assert float(idx.density) == pytest.approx(want.mean())


def test_deterministic(backend):
    rng = np.random.default_rng(9)
    x = random_tile_sparse(rng, (300, 500), (1, 1), 0.5, "bfloat16")
    f = _detect_jit((1, 1), "col")
    a, b = f(x), f(x)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.slow
@pytest.mark.parametrize("tile", [(32, 1), (1, 4096)], ids=str)
def test_large(backend, tile):
    rng = np.random.default_rng(13)
    x = random_tile_sparse(rng, (4096, 4096), tile, 0.9, "bfloat16")
    layout = "row" if tile[1] == 1 else "col"
    _check(_detect_jit(tile, layout)(x), x, tile, layout)
