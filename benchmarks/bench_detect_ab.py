"""A/B of detect kernel settings in one process (issue 2): each variant is a set of environment
variables the CUDA handler reads when it launches (e.g. PIT_DETECT_IN_FLIGHT=16), given its own
jitted function that is compiled and first run while the variant's variables are set, and set
again before each of its timings — so the variant holds whether or not XLA captures the calls
in a CUDA graph. Variants and the copy alternate round by round; medians are reported, with
the fraction of copy computed as in bench_detect.py.

    python benchmarks/bench_detect_ab.py --cases 0 2 4 --variants default PIT_DETECT_IN_FLIGHT=16
Writes detect_ab.json and detect_ab.md into --out. Also prints, per case, XLA's own column-OR
reduction of x (the mask pass's work written by XLA: how fast this card reads x) and the host
dispatch fraction of the first variant (near 1: the timing loop is bound by the host).
"""
from __future__ import annotations

import os
import statistics

import jax
import jax.numpy as jnp

from pit_jax.detect_reference import detect_reference
from bench_detect import BATCHED_CASES, CASES, detect_step, index_bytes, xla_column_or
from common import (announce, apply_variant, bench_parser, dispatch_fraction, markdown_report, parse_variants,
                    round_order, tile_sparse_bf16, time_per_call, write_results)

ROUNDS = int(os.environ.get("PIT_BENCH_ROUNDS", "5"))
# Numbered after BATCHED_CASES: batches that take the one-pass kernel by default (>= 512 row
# blocks of 32 rows) with rows of 1 or 4 chunks of 256 bf16 columns, so that some of its 8 warps
# have nothing to read, and a full-width control of 8 chunks.
NARROW_CASES = [(16, 1024, 256, (32, 1), "row"), (4, 4096, 1024, (32, 1), "row"), (16, 1024, 2048, (32, 1), "row")]


def main():
    ap = bench_parser("unused")
    ap.add_argument("--cases", type=int, nargs="+", default=[0, 2],
                    help="bench_detect's CASES by number, then its BATCHED_CASES and NARROW_CASES numbered on after them")
    ap.add_argument("--variants", nargs="+", required=True,
                    help="comma-separated NAME=VALUE lists; 'default' for none")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--returns", choices=["index", "counts", "total", "total_concat", "first_counts"], default="index",
                    help="what each jitted step returns (bench_detect.detect_step): the whole index, or "
                         "a form that keeps the index inside the jit")
    args = ap.parse_args()
    variants, names = parse_variants(args.variants)
    meta = announce()
    rows = []
    all_cases = [(1, *c) for c in CASES] + BATCHED_CASES + NARROW_CASES
    for case_id in args.cases:
        batch, m, k, tile, layout = all_cases[case_id]
        x_bytes = batch * m * k * 2
        n = max(2, min(16, (512 << 20) // x_bytes * 2))
        # a batch of row blocks stacked along M keeps every micro-tile whole (as in bench_detect)
        xs = [x.reshape(batch, m, k) if batch > 1 else x
              for x in tile_sparse_bf16(jax.random.PRNGKey(0), batch * m, k, tile, args.sparsity, n)]
        want = jax.jit(lambda xs: [detect_reference(x, tile, layout=layout) for x in xs[:1]])(xs)[0]
        copy = jax.jit(lambda xs: [-x for x in xs])
        # XLA's own column-OR over each row block: how fast this card reads x
        probe = None if layout != "row" or m % tile[0] or batch > 1 else jax.jit(
            lambda xs: [xla_column_or(x, tile[0]) for x in xs])
        fns = []
        for v in variants:
            apply_variant(v, names)
            fn = detect_step(tile, layout, args.returns)
            fn(xs)  # compiled (and any graph captured) under this variant
            got = detect_step(tile, layout, "index")(xs[:1])[0]
            same = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
            fns.append((v, fn, same))
        t_copy, t_probe, t = [], [], {v: [] for v in variants}
        for rnd in range(ROUNDS):
            apply_variant("", names)
            t_copy.append(time_per_call(copy, xs, n))
            if probe is not None:
                t_probe.append(time_per_call(probe, xs, n))
            for v, fn, _ in round_order(fns, rnd):
                apply_variant(v, names)
                t[v].append(time_per_call(fn, xs, n))
        apply_variant("", names)
        t_xla_or = statistics.median(t_probe) * 1e6 if t_probe else None
        if t_probe:
            print(f"XLA column-OR probe {m}x{k} tile {tile}: {t_xla_or:.1f} us "
                  f"(min {min(t_probe) * 1e6:.1f}), copy {statistics.median(t_copy) * 1e6:.1f} us", flush=True)
        host_share = dispatch_fraction(fns[0][1], xs)
        copy_bw = 2 * x_bytes / statistics.median(t_copy)
        moved = x_bytes + batch * index_bytes(m, k, tile, layout)
        for v, _, same in fns:  # times per array of a batch, as in bench_detect
            med = statistics.median(t[v])
            row = dict(batch=batch, m=m, k=k, tile=list(tile), layout=layout, variant=v or "default",
                       matches_reference=same, t_detect_us=med / batch * 1e6,
                       t_detect_all_us=[x / batch * 1e6 for x in t[v]],
                       t_copy_us=statistics.median(t_copy) / batch * 1e6, fraction_of_copy=moved / med / copy_bw,
                       t_xla_column_or_us=t_xla_or, dispatch_fraction_first_variant=host_share)
            rows.append(row)
            print({k_: (round(x, 2) if isinstance(x, float) else x) for k_, x in row.items()
                   if k_ != "t_detect_all_us"}, flush=True)
        del xs
    md = markdown_report(
        f"detect A/B — {meta['device']}, jax {meta['jax']}, {meta['date']}",
        f"bf16, random micro-tile sparsity {args.sparsity}; {ROUNDS} rounds, variants and copy alternated (variants in reverse order every other round) in "
        f"one process; median µs per call (min–max over rounds); each step returns {args.returns!r} "
        "(bench_detect.detect_step); rows B×M×K: B arrays in one batched call, µs per array.",
        ["M×K", "tile", "layout", "variant", "detect µs", "min–max", "copy µs", "fraction of copy", "matches jnp"],
        [[(f"{r['batch']}×" if r["batch"] > 1 else "") + f"{r['m']}×{r['k']}", f"{r['tile'][0]}×{r['tile'][1]}", r["layout"], r["variant"],
          f"{r['t_detect_us']:.1f}", f"{min(r['t_detect_all_us']):.1f}–{max(r['t_detect_all_us']):.1f}",
          f"{r['t_copy_us']:.1f}", f"{r['fraction_of_copy']:.2f}", str(r["matches_reference"])] for r in rows])
    print(md)
    write_results(args.out, "detect_ab", rows, md, meta)


if __name__ == "__main__":
    main()
