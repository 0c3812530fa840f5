"""tile="auto" fallback A/B (issue 3: auto at 0% sparsity no slower than 1.1x dense).

    python benchmarks/bench_kgather_auto.py [--out DIR] [--quick]

In one process, on the same arrays, alternating repeats: dense `x @ w`; `sparse_dense(x, w,
tile="auto")` as the package does it (whatever the installed pit_jax's rule is); and
`tile="auto"` given an index detected in the same jitted step (the decision from the exact
per-group counts, detection paid on every call). Ratios are over the dense time of the same
repeat; the reported value is the median over repeats.
"""
from __future__ import annotations

import statistics
import warnings

import jax
import jax.numpy as jnp

import pit_jax
from common import announce, bench_parser, chain_calls, markdown_report, tile_sparse_bf16, time_per_call, write_results

SPARSITIES = [0.0, 0.5, 0.9, 0.99]


def main():
    ap = bench_parser("one small shape")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="pit_jax: sparse_")
    meta = announce()
    shapes = [("small 256x512x384", 256, 512, 384)] if args.quick else \
        [("4096³", 4096, 4096, 4096), ("OPT fc2 4096x16384→4096", 4096, 16384, 4096)]
    key = jax.random.PRNGKey(0)
    n_inputs = 4
    dense = jax.jit(lambda xs, w: chain_calls(jnp.matmul, xs, w))
    auto = jax.jit(lambda xs, w: chain_calls(lambda x: pit_jax.sparse_dense(x, w, tile="auto"), xs))
    auto_idx = jax.jit(lambda xs, w: chain_calls(
        lambda x: pit_jax.sparse_dense(x, w, tile="auto", index=pit_jax.detect(x, (32, 1))), xs))
    rows = []
    for name, m, k, n in shapes:
        w = jax.random.normal(jax.random.fold_in(key, 99), (k, n), jnp.bfloat16)
        for sp in SPARSITIES:
            xs = tile_sparse_bf16(key, m, k, (32, 1), sp, n_inputs, nonnegative=True)
            want = xs[0].astype(jnp.float32) @ w.astype(jnp.float32)
            errs = [float(jnp.max(jnp.abs(f(xs[:1], w)[0].astype(jnp.float32) - want)) /
                          jnp.maximum(jnp.max(jnp.abs(want)), 1e-30)) for f in (auto, auto_idx)]
            t = {"dense": [], "auto": [], "auto_idx": []}
            for _ in range(args.repeats):
                t["dense"].append(time_per_call(lambda xs: dense(xs, w), xs, n_inputs))
                t["auto"].append(time_per_call(lambda xs: auto(xs, w), xs, n_inputs))
                t["auto_idx"].append(time_per_call(lambda xs: auto_idx(xs, w), xs, n_inputs))
            ratio = lambda name_: statistics.median(a / d for a, d in zip(t[name_], t["dense"]))
            row = dict(shape=name, m=m, k=k, n=n, sparsity=sp,
                       t_dense_ms=statistics.median(t["dense"]) * 1e3,
                       t_auto_ms=statistics.median(t["auto"]) * 1e3,
                       t_auto_index_ms=statistics.median(t["auto_idx"]) * 1e3,
                       auto_over_dense=ratio("auto"), auto_index_over_dense=ratio("auto_idx"),
                       max_rel_err_auto=errs[0], max_rel_err_auto_index=errs[1])
            rows.append(row)
            print({k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)
    md = markdown_report(
        f"tile='auto' A/B — {meta['device']}, jax {meta['jax']}, {meta['date']}",
        "bf16, x sparse in random 32x1 micro-tiles; auto = sparse_dense(x, w, tile='auto'); "
        "auto given index = the same with index=detect(x, (32, 1)) in the same jitted step; "
        f"ratios are medians over {args.repeats} alternating repeats of time / dense time of that repeat; "
        "rel err = max |y - y_fp32| / max |y_fp32|",
        ["shape", "sparsity", "dense ms", "auto ms", "auto / dense", "auto given index ms",
         "auto given index / dense", "rel err auto", "rel err given index"],
        [[r["shape"], f"{r['sparsity']:.2f}", f"{r['t_dense_ms']:.3f}", f"{r['t_auto_ms']:.3f}",
          f"{r['auto_over_dense']:.2f}", f"{r['t_auto_index_ms']:.3f}", f"{r['auto_index_over_dense']:.2f}",
          f"{r['max_rel_err_auto']:.1e}", f"{r['max_rel_err_auto_index']:.1e}"] for r in rows])
    print(md)
    write_results(args.out, "kgather_auto", rows, md, meta)


if __name__ == "__main__":
    main()
