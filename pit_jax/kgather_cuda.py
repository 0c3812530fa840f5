"""CUDA lowering of the k-gather primitives: calls into cuda/kgather/kgather_cuda.cu.

The kernels share one k-list among 32 consecutive rows (one GEMM row group). A row tile that is
a multiple of 32 maps onto that directly. A smaller or odd row tile is first merged into 32-row
groups on device — the union of the groups' column lists — and x is masked to its listed
micro-tiles (one elementwise pass), so results stay exactly those of the finer index; the
GEMM then does the work of the coarser one.

Scratch buffers are extra results of the custom call, sized here as in `KGatherShape`
(kgather_layout.h), and dropped.
"""
from __future__ import annotations

import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from .kgather_reference import masked_to_index, sparse_tn_ref, sum_tn
from .tile_index import tile_mask_from_indices

GROUP_ROWS = 32   # kGroupRows
PACK_ALIGN = 32   # kPackAlign
MASK_COLS = 64    # kMaskCols


def _cdiv(a, b):
    return -(-a // b)


def _group_index(indices, shape, tile):
    """(counts, indices) of 32-row groups listing the union of their row tiles' column blocks."""
    m, tm = shape[0], tile[0]
    from .detect import detect_p  # compaction of the (small) group mask on device
    rows = jnp.repeat(tile_mask_from_indices(indices, "row"), tm, axis=-2)[..., :m, :]
    groups = _cdiv(m, GROUP_ROWS)
    pad = [(0, 0)] * (rows.ndim - 2) + [(0, groups * GROUP_ROWS - m), (0, 0)]
    rows = jnp.pad(rows, pad)
    group_mask = rows.reshape(*rows.shape[:-2], groups, GROUP_ROWS, rows.shape[-1]).any(-2)
    g_counts, _, g_indices = detect_p.bind(group_mask.astype(jnp.bfloat16), tile_m=1, tile_k=1, layout="row")
    return g_counts, g_indices


def _kernel_index(x, counts, indices, shape, tile):
    """(x, counts, indices, tile_m) with tile_m a multiple of GROUP_ROWS, for the same product."""
    if tile[0] % GROUP_ROWS == 0:
        return x, counts, indices, tile[0]
    g_counts, g_indices = _group_index(indices, shape, tile)
    x = masked_to_index(x, indices, shape, tile, "row")
    return x, g_counts, g_indices, GROUP_ROWS


def forward_workspace_bytes(lead, m, k, tile_k, itemsize):
    groups = math.prod(lead) * _cdiv(m, GROUP_ROWS)
    packed_k = _cdiv(_cdiv(k, tile_k) * tile_k, PACK_ALIGN) * PACK_ALIGN
    return groups * GROUP_ROWS * packed_k * itemsize + groups * packed_k * 4


def fused_workspace_bytes(lead, m, k, itemsize):
    """pit_sparse_dense_detect's scratch: the forward's (32x1 tiles), then one count per group."""
    return forward_workspace_bytes(lead, m, k, 1, itemsize) + 4 * math.prod(lead) * _cdiv(m, GROUP_ROWS)


def tn_workspace_bytes(lead, m, k):
    return _cdiv(k, MASK_COLS) * math.prod(lead) * _cdiv(m, GROUP_ROWS) * 8


def _pad256(nbytes):
    return _cdiv(nbytes, 256) * 256


def _products_offsets_start(lead, m, k, tile_k, itemsize):
    """Byte offset of the groups' offsets in pit_sparse_tn_products' scratch (after the masked
    kernel's masks, the packed x and its column ids)."""
    return _pad256(tn_workspace_bytes(lead, m, k)) + _pad256(forward_workspace_bytes(lead, m, k, tile_k, itemsize))


def products_workspace_bytes(lead, m, k, tile_k, itemsize, cap_rows, n_slab):
    """pit_sparse_tn_products' scratch (kgather_dw_products.cuh): the masked kernel's masks, the
    packed x and its column ids, the groups' offsets, the [K, groups] table of scratch rows, then
    cap_rows fp32 rows of n_slab columns."""
    groups = math.prod(lead) * _cdiv(m, GROUP_ROWS)
    return (_products_offsets_start(lead, m, k, tile_k, itemsize) + _pad256((groups + 1) * 4)
            + _pad256(k * groups * 4) + cap_rows * n_slab * 4)


def _attrs(tile_m, tile_k):
    return dict(tile_m=np.int64(tile_m), tile_k=np.int64(tile_k))


# Detection fused with pack. When sparse_dense detected the index from x itself (`exact`) with the
# default 32x1 tiles, the lowering calls `pit_sparse_dense_detect` on x and w alone: one kernel
# per 32-row group reads x once, counts and packs its nonzero columns, then the GEMM runs. The
# detect call upstream then has no user in this computation and XLA removes it (it stays when the
# index is used elsewhere, e.g. by the dW kernel). One CTA per group streams the group's rows, so
# it needs enough groups to fill the GPU; with fewer (M·batch < FUSED_MIN_GROUPS·32 rows) and for
# rows that are not whole 16-byte vectors, the separate detect and pack kernels run.
# PIT_KGATHER_FUSED=0 turns it off; PIT_KGATHER_FUSED_MIN_GROUPS changes the threshold (both read
# when lowering).
FUSED_MIN_GROUPS = 64


def fused_detect_applies(x_shape, itemsize, tile, exact) -> bool:
    *lead, m, k = x_shape
    if not exact or tuple(tile) != (GROUP_ROWS, 1) or os.environ.get("PIT_KGATHER_FUSED", "1") == "0":
        return False
    groups = math.prod(lead) * _cdiv(m, GROUP_ROWS)
    min_groups = int(os.environ.get("PIT_KGATHER_FUSED_MIN_GROUPS", FUSED_MIN_GROUPS))
    try:
        return bool((k * itemsize) % 16 == 0) and bool(groups >= min_groups)
    except jax.errors.InconclusiveDimensionOperation:
        # a symbolic dim (jax.export) that decides neither way: the separate kernels serve any size
        return False


# A sparse operand held transposed (x_transposed: dense_sparse's weight) is read in place by pack
# (a packed column's 32 rows are one contiguous run of the buffer), so XLA makes no transposed copy.
# PIT_KGATHER_TRANSPOSED_PACK (read when lowering): "1" (default) always; "given" only for an index
# the caller passed (a detected one then takes the transposed copy and the fused detect+pack);
# "0" never (the copy, then the paths of an untransposed x), for A/B runs.
def transposed_pack_applies(tile, exact) -> bool:
    mode = os.environ.get("PIT_KGATHER_TRANSPOSED_PACK", "1")
    if mode not in ("0", "1", "given"):
        raise ValueError(f"PIT_KGATHER_TRANSPOSED_PACK must be 0, 1 or given, got {mode!r}")
    return mode == "1" or (mode == "given" and not exact)


def sparse_dense_cuda(x, w, counts, offsets, indices, bias, *, shape, tile, layout, exact, masked_grad, x_transposed,
                      y_transposed):
    """Every path ends in one of the two forward targets, whose epilogue adds the bias (an empty
    buffer: none) and writes y in the asked layout."""
    del offsets, layout, masked_grad  # masked_grad: for the transpose rule only
    epilogue = dict(bias=bias.astype(x.dtype), y_transposed=bool(y_transposed))
    if x_transposed and transposed_pack_applies(tile, exact):
        return _sparse_dense_call(x, w, counts, indices, shape, tile, x_transposed=True, **epilogue)
    if x_transposed:
        x = jnp.swapaxes(x, -1, -2)
    itemsize = np.dtype(x.dtype).itemsize
    if fused_detect_applies(x.shape, itemsize, tile, exact):
        *lead, m, k = x.shape
        ws = fused_workspace_bytes(lead, m, k, itemsize)
        y, _ = jax.ffi.ffi_call("pit_sparse_dense_detect", (
            jax.ShapeDtypeStruct((*lead, *_out_dims(m, w.shape[-1], y_transposed)), x.dtype),
            jax.ShapeDtypeStruct((ws,), jnp.uint8)))(x, w.astype(x.dtype), epilogue["bias"],
                                                       y_transposed=epilogue["y_transposed"])
        return y
    return _sparse_dense_call(x, w, counts, indices, shape, tile, x_transposed=False, **epilogue)


def _out_dims(m, n, y_transposed):
    return (n, m) if y_transposed else (m, n)


def _sparse_dense_call(x, w, counts, indices, shape, tile, x_transposed, bias, y_transposed):
    """pit_sparse_dense on x's row index (x: the buffer, xᵀ when x_transposed)."""
    if x_transposed and tile[0] % GROUP_ROWS != 0:  # the row-tile merge masks x: back to the buffer's layout
        xl, ck, ik, tm = _kernel_index(jnp.swapaxes(x, -1, -2), counts, indices, shape, tile)
        xk = jnp.swapaxes(xl, -1, -2)
    else:  # (a row tile of whole groups leaves x as it is)
        xk, ck, ik, tm = _kernel_index(x, counts, indices, shape, tile)
    *lead, _, _ = x.shape
    m, k = shape
    n = w.shape[-1]
    ws = forward_workspace_bytes(lead, m, k, tile[1], np.dtype(x.dtype).itemsize)
    y, _ = jax.ffi.ffi_call("pit_sparse_dense", (jax.ShapeDtypeStruct((*lead, *_out_dims(m, n, y_transposed)), x.dtype),
                                                 jax.ShapeDtypeStruct((ws,), jnp.uint8)))(
        xk, w.astype(x.dtype), ck, ik, bias, **_attrs(tm, tile[1]), x_transposed=bool(x_transposed),
        y_transposed=y_transposed)
    return y


def sparse_nt_cuda(dy, w, counts, offsets, indices, *, shape, tile, layout):
    """x's masked cotangent, (dy @ wᵀ) on x's listed tiles (`pit_sparse_nt`, kgather_nt.cuh). A row
    tile that is not a multiple of 32 runs on its 32-row groups' union, then the finer tiles'
    mask zeroes the rest (one elementwise pass)."""
    del offsets, layout
    k, (tm, tk) = shape[1], tile
    ck, ik, tm_kernel = counts, indices, tm
    if tm % GROUP_ROWS:
        (ck, ik), tm_kernel = _group_index(indices, shape, tile), GROUP_ROWS
    out = jax.ffi.ffi_call("pit_sparse_nt", jax.ShapeDtypeStruct((*dy.shape[:-1], k), dy.dtype))(
        dy, w.astype(dy.dtype), ck, ik, **_attrs(tm_kernel, tk))
    if tm % GROUP_ROWS:
        out = masked_to_index(out, indices, shape, tile, "row")
    return out


# dW path. Default (PIT_KGATHER_DW=dense): XLA's dense matmul computes Σ xᵀ·dy — on x as it is
# when the index was detected from x (`exact`), else on x masked to its listed tiles — with no
# control flow. PIT_KGATHER_DW=sparse: always the dW kernel. PIT_KGATHER_DW=auto: the rule
# below, decided per call with lax.cond; XLA's GPU runtime reads a conditional's predicate on
# the host (a stream wait on its execution thread) unless CONDITIONAL command buffers are
# enabled, and on 4096³ the rule cost 0.23–0.24 ms against 0.16 ms for the dense path (H100,
# benchmarks/results/2026-11-26_h200_session7/hostsync_h100/), so it is opt-in.
# The rule: the dW kernel streams every (32-row group, 64-column
# block) of x that holds a listed column, at about 0.92 ms per 4096³ of such blocks on an H100
# (0.92 ms at 0–50% random 32x1 tile sparsity, 0.60 ms at 99%, where 72% of the blocks are
# still occupied), while cuBLAS computes the whole (masked) xᵀ·dy in 0.21 ms. So the kernel
# runs only when at most this fraction of the blocks is occupied (block- or row-structured
# sparsity: dead neurons, pruned rows), estimated from the per-group counts; otherwise XLA's
# dense matmul computes the same sum.
DW_SPARSE_MAX_OCCUPANCY = 0.2


def count_occupancy(counts, n_inner, tile_k):
    """Estimated fraction of (row group, MASK_COLS-column block) pairs with a listed tile, from
    the per-group tile counts alone (no scatter): a group listing c of its n_inner tiles, spread
    uniformly, leaves a block of b = MASK_COLS / tile_k tiles empty with probability
    (1 - c / n_inner)^b. Exact for empty and full groups (row-structured sparsity); it
    overestimates column-clustered patterns, which then take the dense path."""
    per_block = max(1.0, MASK_COLS / tile_k)
    empty = jnp.power(1.0 - counts.astype(jnp.float32) / n_inner, per_block)
    return jnp.mean(1.0 - empty)


# The products path of PIT_KGATHER_DW=sparse (bf16/fp16; cuda/kgather/kgather_dw_products.cuh):
# each group's products P_gᵀ·dy_g go to an fp32 scratch buffer, then each dW row sums the rows of
# the groups that list it. It moves about 8·N bytes per listed (group, column) pair, so it pays
# only for very sparse x; it runs when the index lists at most DW_PRODUCTS_MAX_DENSITY of all
# (group, column) pairs, and the masked kernel runs otherwise; the device decides, per call.
# Its scratch is capped at DW_PRODUCTS_SCRATCH_BYTES or the size of an fp32 dW, whichever is
# larger (wider dy runs in slabs of columns), plus a [K, groups] int32 table that must fit the same
# cap. Both are read when lowering:
# PIT_KGATHER_DW_PRODUCTS_DENSITY (0 turns the path off) and PIT_KGATHER_DW_SLAB (columns per
# slab, a multiple of 128; for tests).
DW_PRODUCTS_MAX_DENSITY = 0.02
DW_PRODUCTS_SCRATCH_BYTES = 64 << 20
PRODUCTS_MAX_GROUPS = 1024  # kProductsMaxGroups
# Slabs of at most 1024 columns, of equal width: at 99% (index detected in the call, H200, session 35,
# benchmarks/results/2026-11-29_session35/slab_ab_h200/) 1024 took 4096³ from 0.162 to 0.147 ms and
# fc2 from 0.527 to 0.504 against the 1536 the scratch cap allowed (a short last slab of 1024); 512
# and 256 were slower (each slab's row sums read the whole [K, groups] table again).
DW_PRODUCTS_MAX_SLAB = 1024
PRODUCTS_SLAB_ALIGN = 128   # kProductsN


def products_plan(x_shape, n, tile_k, dtype):
    """(cap_rows, n_slab) for pit_sparse_tn_products, or None where the path does not apply (fp32,
    more than PRODUCTS_MAX_GROUPS row groups, a symbolic shape, or turned off)."""
    density = float(os.environ.get("PIT_KGATHER_DW_PRODUCTS_DENSITY", DW_PRODUCTS_MAX_DENSITY))
    *lead, m, k = x_shape
    if density <= 0 or np.dtype(dtype).itemsize != 2:
        return None
    try:
        groups = int(math.prod(lead) * _cdiv(m, GROUP_ROWS))
        k, n = int(k), int(n)
    except (TypeError, jax.errors.InconclusiveDimensionOperation):
        return None
    if groups > PRODUCTS_MAX_GROUPS or groups == 0 or k == 0 or n == 0:
        return None
    cap_rows = max(1, math.ceil(density * groups * _cdiv(k, tile_k) * tile_k))
    budget = max(DW_PRODUCTS_SCRATCH_BYTES, 4 * k * n)
    if 4 * k * groups > budget or 4 * cap_rows * PRODUCTS_SLAB_ALIGN > budget:  # the table; the narrowest slab
        return None
    n_slab = max(PRODUCTS_SLAB_ALIGN, budget // (4 * cap_rows) // PRODUCTS_SLAB_ALIGN * PRODUCTS_SLAB_ALIGN)
    n_slab = min(n_slab, DW_PRODUCTS_MAX_SLAB)
    slabs = _cdiv(n, n_slab)  # then equal slabs: no short last one
    n_slab = _cdiv(_cdiv(n, slabs), PRODUCTS_SLAB_ALIGN) * PRODUCTS_SLAB_ALIGN
    if "PIT_KGATHER_DW_SLAB" in os.environ:
        n_slab = int(os.environ["PIT_KGATHER_DW_SLAB"])
        if n_slab <= 0 or n_slab % PRODUCTS_SLAB_ALIGN:
            raise ValueError(f"PIT_KGATHER_DW_SLAB must be a positive multiple of 128, got {n_slab}")
    return cap_rows, n_slab


DW_MODES = ("dense", "sparse", "auto", "device")


def dw_mode():
    """PIT_KGATHER_DW: dense (default: always XLA's matmul), sparse (always the kernel), auto
    (the rule above, a lax.cond per call) or device (the products path or a dense GEMM, chosen on
    the device: below)."""
    mode = os.environ.get("PIT_KGATHER_DW", "dense")
    if mode not in DW_MODES:
        raise ValueError(f"PIT_KGATHER_DW must be one of {', '.join(DW_MODES)}, got {mode!r}")
    return mode


# PIT_KGATHER_DW=device: the products path's call (`pit_sparse_tn_products_detect` on x alone where
# sparse_dense detected its own 32x1 index and the fused detect+pack applies), then `pit_dense_tn_gated`
# (cuda/kgather/kgather_dw_dense_sm90.cu), CUTLASS's Hopper GEMM for the dense dW, which reads the
# products call's index total from its scratch and runs no tiles when the products path wrote dW.
# dW goes from the first call to the second as an aliased operand. No lax.cond, no host sync: the
# device picks between the products path (very sparse x) and the dense dW (everything else).
# Where the pair cannot serve (no products plan, a CUTLASS-less build, no compute capability 9
# GPU at lowering, K or N not a multiple of 8) the dense dW runs, with a warning.
def gated_dense_dw_applies(dtype, rows, k, n) -> bool:
    """Whether pit_dense_tn_gated serves x [rows, k]ᵀ·dy [rows, n] here (decided when lowering):
    a CUTLASS build, bf16/fp16 with 16-byte rows on a Hopper GPU, and 32-bit problem sizes."""
    from . import _ext
    from .moe_cuda import fused_epilogue_applies  # bf16/fp16, 16-byte rows, a Hopper GPU here
    if rows * max(k, n) >= 2**31 or k * n >= 2**31:  # the handler's int problem sizes
        return False
    return bool(_ext.build_info().get("moe_staged")) and fused_epilogue_applies(dtype, k, n)


GATED_DW_WORKSPACE_BYTES = 256 + (1 << 20)  # kGatedWorkspaceBytes


def _is_empty(lead, m, k, n) -> bool:
    try:
        return bool(math.prod(lead) * m * k * n == 0)
    except (TypeError, jax.errors.InconclusiveDimensionOperation):  # symbolic dims (jax.export)
        return False


def products_total_offset(lead, m, k, tile_k, itemsize):
    """Byte offset of the index total (offsets[groups]) in pit_sparse_tn_products' scratch."""
    return _products_offsets_start(lead, m, k, tile_k, itemsize) + 4 * math.prod(lead) * _cdiv(m, GROUP_ROWS)


def sparse_tn_cuda(x, dy, counts, offsets, indices, *, shape, tile, layout, exact, out_dtype):
    del offsets
    mode = dw_mode()
    if exact:  # x is zero outside its index: no mask needed
        dense = lambda *_: sum_tn(x, dy, out_dtype)
    else:
        dense = lambda *_: sparse_tn_ref(x, dy, indices, shape=shape, tile=tile, layout=layout,
                                         out_dtype=out_dtype)
    if mode == "dense":
        return dense()
    xk, ck, ik, tm = _kernel_index(x, counts, indices, shape, tile)
    *lead, m, k = x.shape
    n = dy.shape[-1]
    ws = tn_workspace_bytes(lead, m, k)

    plan = products_plan(x.shape, n, tile[1], x.dtype)
    itemsize = np.dtype(x.dtype).itemsize

    def products_call(xk, dy, masked_fallback):
        cap_rows, n_slab = plan
        pws = products_workspace_bytes(lead, m, k, tile[1], itemsize, cap_rows, n_slab)
        return jax.ffi.ffi_call("pit_sparse_tn_products", (jax.ShapeDtypeStruct((k, n), x.dtype),
                                                           jax.ShapeDtypeStruct((pws,), jnp.uint8)))(
            xk, dy.astype(x.dtype), ck, ik, **_attrs(tm, tile[1]), cap_rows=np.int64(cap_rows),
            n_slab=np.int64(n_slab), masked_fallback=bool(masked_fallback))

    if mode == "device":
        why = ("no products plan for these shapes or this dtype" if plan is None else
               None if gated_dense_dw_applies(x.dtype, math.prod(lead) * m, k, n) else
               "the gated dense GEMM needs a CUTLASS build, a compute capability 9 GPU, bf16/fp16, K and N "
               "multiples of 8, and rows·max(K, N) and K·N below 2^31")
        if why is not None:
            if not _is_empty(lead, m, k, n):
                warnings.warn(f"PIT_KGATHER_DW=device: {why}; dW is XLA's dense matmul here", stacklevel=2)
            return dense()
        if fused_detect_applies(x.shape, itemsize, tile, exact):
            # the index came from x with 32x1 tiles: the forward's fused detect+pack inside the
            # products call, so the separate detection (which then has no user) and pack do not run
            cap_rows, n_slab = plan
            pws = (products_workspace_bytes(lead, m, k, tile[1], itemsize, cap_rows, n_slab)
                   + 4 * math.prod(lead) * _cdiv(m, GROUP_ROWS))
            dw, pws = jax.ffi.ffi_call("pit_sparse_tn_products_detect",
                                       (jax.ShapeDtypeStruct((k, n), x.dtype), jax.ShapeDtypeStruct((pws,), jnp.uint8)))(
                x, dy.astype(x.dtype), cap_rows=np.int64(cap_rows), n_slab=np.int64(n_slab))
        else:
            dw, pws = products_call(xk, dy, masked_fallback=False)
        # The dense GEMM's x: as it is when the index came from x (or _kernel_index masked it),
        # else masked to the index's tiles, as the default dense path does.
        x_dense = xk if (exact or xk is not x) else masked_to_index(x, indices, shape, tile, layout)
        dw, _ = jax.ffi.ffi_call("pit_dense_tn_gated", (jax.ShapeDtypeStruct((k, n), x.dtype),
                                                        jax.ShapeDtypeStruct((GATED_DW_WORKSPACE_BYTES,), jnp.uint8)),
                                 input_output_aliases={3: 0})(
            x_dense, dy.astype(x.dtype), pws, dw,
            gate_offset=np.int64(products_total_offset(lead, m, k, tile[1], itemsize)), cap=np.int64(plan[0]))
        return dw.astype(out_dtype)

    def kernel(xk, dy):
        if plan is None:
            dw, _ = jax.ffi.ffi_call("pit_sparse_tn", (jax.ShapeDtypeStruct((k, n), x.dtype),
                                                       jax.ShapeDtypeStruct((ws,), jnp.uint8)))(
                xk, dy.astype(x.dtype), ck, ik, **_attrs(tm, tile[1]))
        else:
            dw, _ = products_call(xk, dy, masked_fallback=True)
        return dw.astype(out_dtype)

    if mode == "sparse":
        return kernel(xk, dy)
    sparse_enough = count_occupancy(ck, ik.shape[-1], tile[1]) <= DW_SPARSE_MAX_OCCUPANCY
    return jax.lax.cond(sparse_enough, kernel, dense, xk, dy)
