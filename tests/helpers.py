"""NumPy references and random sparse inputs shared by the tests."""
import zlib

import jax.numpy as jnp
import ml_dtypes
import numpy as np

import pit_jax

DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}


def stable_seed(*parts) -> int:
    """A seed from test parameters that is the same in every process (Python's hash() of a
    string is salted per process, so a failing case could not be rerun with the same data)."""
    return zlib.crc32(repr(parts).encode())


def random_tile_sparse(rng, shape, tile, sparsity, dtype):
    """Random values (never all zero) whose micro-tiles are zero with probability `sparsity`.
    Inside a kept tile about a third of the elements are zero too, so tile detection must OR."""
    *lead, m, k = shape
    tm, tk = tile
    nb_m, nb_k = -(-m // tm), -(-k // tk)
    keep = rng.random((*lead, nb_m, nb_k)) >= sparsity
    keep = np.repeat(np.repeat(keep, tm, -2), tk, -1)[..., :m, :k]
    vals = rng.standard_normal(shape).astype(np.float32) + 0.1
    vals *= rng.random(shape) > 0.33
    return (vals * keep).astype(DTYPES[dtype] if isinstance(dtype, str) else dtype)


def reference_detect(x, tile, layout="row"):
    """(counts, offsets, indices) exactly as pit_jax documents them, in NumPy."""
    x = np.asarray(x).astype(np.float32)
    *lead, m, k = x.shape
    tm, tk = tile
    nb_m, nb_k = -(-m // tm), -(-k // tk)
    nz = np.zeros((*lead, nb_m * tm, nb_k * tk), bool)
    nz[..., :m, :k] = x != 0
    mask = nz.reshape(*lead, nb_m, tm, nb_k, tk).any(axis=(-3, -1))
    if layout == "col":
        mask = np.swapaxes(mask, -1, -2)
    n_outer, n_inner = mask.shape[-2:]
    flat = mask.reshape(-1, n_outer, n_inner)
    counts = flat.sum(-1).astype(np.int32)
    offsets = np.concatenate([np.zeros((flat.shape[0], 1), np.int32),
                              np.cumsum(counts, -1).astype(np.int32)], -1)
    indices = np.full(flat.shape, -1, np.int32)
    for b in range(flat.shape[0]):
        for o in range(n_outer):
            ids = np.flatnonzero(flat[b, o])
            indices[b, o, :len(ids)] = ids
    return (counts.reshape(*lead, n_outer), offsets.reshape(*lead, n_outer + 1),
            indices.reshape(*lead, n_outer, n_inner))


def moe_layouts_want(x, w, ids, order, g, *, x_sorted, out_sorted):
    """float64 (out, dx, dw) of the grouped matmul with rows laid out either way, loss Σ out·g.

    Position p of the routing order holds assignment order[p] (expert ids.flat[order[p]], token
    order[p] // k). x: [T, d] tokens, or [T·k, d] rows in routing order (x_sorted); out and g
    are [T·k, f], row p in routing order (out_sorted) or row order[p] (assignment order)."""
    t, k = ids.shape
    e = w.shape[0]
    x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
    experts = ids.reshape(-1)[order]
    valid = (experts >= 0) & (experts < e)
    src = np.arange(order.size) if x_sorted else order // k
    dst = np.arange(order.size) if out_sorted else order
    out, dx, dw = np.zeros(g64.shape), np.zeros(x64.shape), np.zeros(w64.shape)
    for p in np.flatnonzero(valid):
        out[dst[p]] = x64[src[p]] @ w64[experts[p]]
        dx[src[p]] += w64[experts[p]] @ g64[dst[p]]
        dw[experts[p]] += np.outer(x64[src[p]], g64[dst[p]])
    return out, dx, dw


def broken_index(index, rng):
    """A copy of `index` breaking its invariants where the kernels must stay in bounds: every count
    past n_inner (ids then read up to the row's end, -1 padding), and in every other row one listed
    id replaced by one past n_inner or negative (other than -1). Returns it with the boolean element
    mask of the in-range ids it still lists (the tiles the product is over)."""
    n_inner = index.indices.shape[-1]
    ids = np.array(index.indices)
    flat = ids.reshape(-1, n_inner)
    for row in range(0, flat.shape[0], 2):
        listed = np.flatnonzero(flat[row] >= 0)
        if listed.size:
            flat[row, rng.choice(listed)] = rng.choice([n_inner, n_inner + 7, 2**30, -2, -2**30])
    in_range = jnp.asarray(np.where((ids >= 0) & (ids < n_inner), ids, -1))
    kept = pit_jax.TileIndex(index.counts, index.offsets, in_range, index.shape, index.tile, index.layout).element_mask()
    broken = pit_jax.TileIndex(jnp.full_like(index.counts, n_inner + 1000), index.offsets, jnp.asarray(ids),
                               index.shape, index.tile, index.layout)
    return broken, np.asarray(kept)
