"""Micro-tile detection throughput against a device copy and a jnp `nonzero(size=)` detector.

    python benchmarks/bench_detect.py [--out benchmarks/results] [--quick]

Bytes counted for detection: x read once + every index element written (counts, offsets,
indices); the CUDA scratch is not counted (index_bytes). "x GB/s" counts x's bytes alone (what
a dense reader of x achieves). Copy: an elementwise negate of the same array (read + write),
measured in the same run. Each case is timed three ways (detect_step): with every TileIndex
handed back to Python (the GB/s columns), with the index kept inside the jit (every call's
counts stacked into the step's one result), and kept in the jit with a count sum per call (the
kept-in-jit form before session 29).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import pit_jax
from pit_jax.detect_reference import detect_reference
from common import (announce, bench_parser, dispatch_fraction, markdown_report, tile_sparse_bf16, time_per_call,
                    write_results)

# (M, K, tile, layout): k-gather micro-tiles (32x1), m-gather rows (1xK), and a dense 64x64 grid.
CASES = [
    (4096, 4096, (32, 1), "row"), (4096, 4096, (1, 4096), "col"), (4096, 4096, (64, 64), "row"),
    (4096, 4096, (1, 1), "row"),
    (16384, 16384, (32, 1), "row"), (16384, 16384, (1, 16384), "col"),
    (16384, 16384, (64, 64), "row"),
]
# Batched: 16 arrays of 4096² in one detect call (a leading batch dim), reported per array. One
# launch pair covers all of them, so neither the host's dispatch nor the launch gaps weigh: what
# the kernels sustain on 4096² arrays, next to the one-call-per-array rows above.
BATCHED_CASES = [(16, 4096, 4096, (32, 1), "row"), (16, 4096, 4096, (64, 64), "row"),
                 (16, 4096, 4096, (1, 4096), "col")]


def detect_step(tile, layout, returns: str):
    """Jitted step over a list of arrays, detecting each. What the step returns:
    - "index": every TileIndex goes back to Python (3 arrays per call, as a caller that inspects
      the index);
    - "counts": every call's counts stacked into one array, so the index stays on the device as in
      a model that feeds it to a kernel (the kernels still write the whole index: a custom call's
      results are not pruned), with one small XLA kernel per step (bench_detect's "kept in jit"
      since session 29);
    - "total": one int32, the sum of each call's count sum — the "kept in jit" form before session
      29 (and what A/B records of `--returns total` ran): XLA runs a ~1 µs reduction kernel after
      every detection (profile_detect_kernels.py), which the copy it is compared with does not have;
    - "total_concat": the same sum over the concatenated counts (XLA still splits it into one
      reduction per call; named "total" in session 29's first runs);
    - "first_counts": the sum of each call's first count."""
    detect = lambda x: pit_jax.detect(x, tile, layout=layout)
    forms = {
        "index": lambda xs: [detect(x) for x in xs],
        "counts": lambda xs: jnp.stack([detect(x).counts for x in xs]),
        "total": lambda xs: sum(jnp.sum(detect(x).counts) for x in xs),
        "total_concat": lambda xs: jnp.sum(jnp.concatenate([detect(x).counts.reshape(-1) for x in xs])),
        "first_counts": lambda xs: sum(detect(x).counts.reshape(-1)[0] for x in xs),
    }
    return jax.jit(forms[returns])


def xla_column_or(x, tile_m):
    """XLA's own column-OR over each tile_m-row block of x (M a multiple of tile_m): the mask
    pass's work written as a jnp reduction, i.e. how fast this card reads x when XLA writes the
    kernel."""
    m, k = x.shape
    return jnp.max(jnp.abs(x).reshape(m // tile_m, tile_m, k), axis=1) > 0


def index_bytes(m, k, tile, layout):
    """Index elements written (counts, offsets, indices). The CUDA scratch is not counted. Until
    session 29 its whole allocation was counted as written and read: 0.4% of the bytes at 4096²
    32x1 and 64x64, 4.2% at 1x1 (which does write and read its 2.1 MB of mask words) and 12.5%
    for the 1xK column layout (whose row-bits path writes 1/4096 of x, not the allocation), while
    the one-pass path touches none of it. Leaving it out never overstates a rate."""
    nb_m, nb_k = -(-m // tile[0]), -(-k // tile[1])
    n_outer, n_inner = (nb_m, nb_k) if layout == "row" else (nb_k, nb_m)
    return 4 * (n_outer + n_outer + 1 + n_outer * n_inner)


def main():
    ap = bench_parser("4096 cases only")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--case", type=int, default=None, help="run only CASES[i] (for profiling)")
    args = ap.parse_args()
    meta = announce()
    rows = []
    key = jax.random.PRNGKey(0)
    cases = [(1, *c) for c in CASES] + ([] if args.quick or args.case is not None else BATCHED_CASES)
    for case_id, (batch, m, k, tile, layout) in enumerate(cases):
        if (args.quick and m > 4096) or (args.case is not None and case_id != args.case):
            continue
        x_bytes = batch * m * k * 2
        n = max(2, min(16, (512 << 20) // x_bytes * 2))  # rotate >= 1 GiB of inputs past L2
        # a batch of row blocks stacked along M keeps every micro-tile whole (M is a multiple of tm)
        xs = [x.reshape(batch, m, k) if batch > 1 else x
              for x in tile_sparse_bf16(key, batch * m, k, tile, args.sparsity, n)]
        copy = jax.jit(lambda xs: [-x for x in xs])
        ours = detect_step(tile, layout, "index")
        ours_in_jit = detect_step(tile, layout, "counts")
        ours_per_call_sum = detect_step(tile, layout, "total")
        ref = jax.jit(lambda xs: [detect_reference(x, tile, layout=layout) for x in xs])
        got, want = ours(xs[:1])[0], ref(xs[:1])[0]
        same = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
        t_copy = time_per_call(copy, xs, n)
        t_ours = time_per_call(ours, xs, n)
        t_in_jit = time_per_call(ours_in_jit, xs, n)
        t_per_call_sum = time_per_call(ours_per_call_sum, xs, n)
        t_ref = time_per_call(ref, xs, n, steps=3)
        host_share = dispatch_fraction(ours, xs)
        host_share_in_jit = dispatch_fraction(ours_in_jit, xs)
        moved = x_bytes + batch * index_bytes(m, k, tile, layout)
        copy_bw = 2 * x_bytes / t_copy
        t_ours, t_in_jit, t_ref, t_copy = t_ours / batch, t_in_jit / batch, t_ref / batch, t_copy / batch
        t_per_call_sum /= batch
        x_bytes, moved = x_bytes / batch, moved / batch
        row = dict(batch=batch, m=m, k=k, tile=list(tile), layout=layout, sparsity=args.sparsity,
                   density=float(jnp.mean(got.density)), matches_reference=same,
                   t_detect_us=t_ours * 1e6, t_jnp_nonzero_us=t_ref * 1e6, t_copy_us=t_copy * 1e6,
                   detect_total_GBps=moved / t_ours / 1e9, detect_x_GBps=x_bytes / t_ours / 1e9,
                   copy_GBps=copy_bw / 1e9, fraction_of_copy=moved / t_ours / copy_bw,
                   jnp_nonzero_x_GBps=x_bytes / t_ref / 1e9, speedup_vs_jnp=t_ref / t_ours,
                   dispatch_fraction=host_share, t_detect_in_jit_us=t_in_jit * 1e6,
                   fraction_of_copy_in_jit=moved / t_in_jit / copy_bw, dispatch_fraction_in_jit=host_share_in_jit,
                   t_detect_per_call_sum_us=t_per_call_sum * 1e6,
                   fraction_of_copy_per_call_sum=moved / t_per_call_sum / copy_bw)
        rows.append(row)
        print({k_: (round(v, 3) if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)
        del xs
    md = markdown_report(
        f"detect benchmark — {meta['device']}, jax {meta['jax']}, {meta['date']}",
        f"bf16, random micro-tile sparsity {args.sparsity}; times are medians per call with many "
        "calls per jitted step; copy = elementwise negate (read+write) in the same run. Host dispatch "
        "share: host time to enqueue 20 steps of detection over their wall time (near 1: the timing "
        "is bound by the host, not the kernels). Index returned: each call's TileIndex goes back to "
        "Python; kept in jit: the step returns every call's counts stacked in one array, so the index "
        "stays on the device as when a kernel consumes it (the kernels write all of it either way); "
        "per-call sums: the step returns the sum of each call's count sum, the kept-in-jit form before "
        "2026-11-29 (XLA then runs a ~1 µs reduction kernel between consecutive detections). Rows 16×M×K: 16 arrays "
        "in one batched call, µs per array. Bytes: x read and the index written; the CUDA scratch is not "
        "counted (bench_detect.index_bytes).",
        ["M×K", "tile", "layout", "detect µs", "detect GB/s (all bytes)", "x-only GB/s", "copy GB/s",
         "fraction of copy", "host dispatch share", "µs, index kept in jit", "fraction of copy, kept in jit",
         "host share, kept in jit", "µs, per-call sums", "fraction, per-call sums", "jnp nonzero µs", "speedup vs jnp", "matches jnp"],
        [[(f"{r['batch']}×" if r["batch"] > 1 else "") + f"{r['m']}×{r['k']}", f"{r['tile'][0]}×{r['tile'][1]}", r["layout"], f"{r['t_detect_us']:.1f}",
          f"{r['detect_total_GBps']:.0f}", f"{r['detect_x_GBps']:.0f}", f"{r['copy_GBps']:.0f}",
          f"{r['fraction_of_copy']:.2f}", f"{r['dispatch_fraction']:.2f}", f"{r['t_detect_in_jit_us']:.1f}",
          f"{r['fraction_of_copy_in_jit']:.2f}", f"{r['dispatch_fraction_in_jit']:.2f}",
          f"{r['t_detect_per_call_sum_us']:.1f}", f"{r['fraction_of_copy_per_call_sum']:.2f}",
          f"{r['t_jnp_nonzero_us']:.1f}", f"{r['speedup_vs_jnp']:.1f}×", str(r["matches_reference"])] for r in rows])
    print(md)
    write_results(args.out, "detect", rows, md, meta)


if __name__ == "__main__":
    main()
