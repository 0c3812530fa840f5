"""Where the host time of one-array-per-call detection goes (issue 2).

bench_detect.py's single-call 4096² rows are bound by the host (dispatch share near 1). This
probe times the same detections with the jitted step returning less to Python, and with more
calls per step, to tell the per-output cost of the timing loop (arrays handed back to Python)
from the per-call cost of the custom call itself:
  index:    every TileIndex returned (counts, offsets, indices: 3 arrays per call), as bench_detect;
  counts:   only each call's counts returned (1 array per call; the kernels still write all of it);
  total:    one int32 per step, the sum of every call's counts (the index stays inside the jit,
            as in a model that feeds it to a kernel).
References timed the same way: the copy (negate, arrays returned), XLA's sum of -x (a read of x
with nothing written, one total returned) and XLA's column-OR reduction of x (the mask pass's
work, masks returned or one total). Rounds alternate the variants in one process; medians are reported.

    python benchmarks/probe_detect_dispatch.py --cases 0 2 --calls 16 48 --out DIR
"""
from __future__ import annotations

import os
import statistics

import jax
import jax.numpy as jnp

import pit_jax
from bench_detect import CASES, detect_step, index_bytes, xla_column_or
from common import (announce, bench_parser, enqueue_and_wall, markdown_report, tile_sparse_bf16, time_per_call,
                    write_results)

ROUNDS = int(os.environ.get("PIT_BENCH_ROUNDS", "5"))


def step_functions(tile, layout, with_column_or):
    """name -> jitted step over a list of arrays."""
    fns = {
        "detect, index returned": detect_step(tile, layout, "index"),
        "detect, counts returned": jax.jit(lambda xs: [pit_jax.detect(x, tile, layout=layout).counts for x in xs]),
        "detect, one total returned": detect_step(tile, layout, "total"),
        "copy, arrays returned": jax.jit(lambda xs: [-x for x in xs]),
        "XLA sum of -x (reads x, writes nothing), one total": jax.jit(lambda xs: sum(
            jnp.sum(-x, dtype=jnp.float32) for x in xs)),
    }
    if with_column_or:
        fns["XLA column-OR, masks returned"] = jax.jit(lambda xs: [xla_column_or(x, tile[0]) for x in xs])
        fns["XLA column-OR, one total returned"] = jax.jit(
            lambda xs: sum(jnp.sum(xla_column_or(x, tile[0])) for x in xs))
    return fns


def main():
    ap = bench_parser("unused")
    ap.add_argument("--cases", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--calls", type=int, nargs="+", default=[16, 48], help="calls (arrays) per jitted step")
    ap.add_argument("--sparsity", type=float, default=0.9)
    args = ap.parse_args()
    meta = announce()
    rows = []
    for case_id in args.cases:
        m, k, tile, layout = CASES[case_id]
        x_bytes = m * k * 2
        with_column_or = layout == "row" and m % tile[0] == 0  # whole row blocks: XLA's column-OR applies
        moved = x_bytes + index_bytes(m, k, tile, layout)
        all_xs = tile_sparse_bf16(jax.random.PRNGKey(0), m, k, tile, args.sparsity, max(args.calls))
        for calls in args.calls:
            xs = all_xs[:calls]
            fns = step_functions(tile, layout, with_column_or)
            times = {name: [] for name in fns}
            for _ in range(ROUNDS):
                for name, fn in fns.items():
                    times[name].append(time_per_call(fn, xs, calls))
            t_copy = statistics.median(times["copy, arrays returned"])
            for name, fn in fns.items():
                med = statistics.median(times[name])
                enqueue, wall = enqueue_and_wall(fn, xs)
                host_us, share = 1e6 * enqueue / calls, enqueue / wall
                is_detect = name.startswith("detect")
                row = dict(m=m, k=k, tile=list(tile), layout=layout, calls_per_step=calls, variant=name,
                           t_us=med * 1e6, t_all_us=[t * 1e6 for t in times[name]], host_us_per_call=host_us,
                           host_share=share, t_copy_us=t_copy * 1e6,
                           fraction_of_copy=(moved / med) / (2 * x_bytes / t_copy) if is_detect else None)
                rows.append(row)
                print({k_: (round(v, 2) if isinstance(v, float) else v) for k_, v in row.items() if k_ != "t_all_us"},
                      flush=True)
        del all_xs
    md = markdown_report(
        f"detect dispatch probe — {meta['device']}, jax {meta['jax']}, {meta['date']}",
        f"bf16, random micro-tile sparsity {args.sparsity}; {ROUNDS} rounds alternating the variants in one "
        "process; µs per call = median over rounds (min–max); host µs per call = time to enqueue 20 steps "
        "over the calls; host share = that over the wall time until they finish. Fraction of copy as in "
        "bench_detect.py, against the copy with arrays returned.",
        ["M×K", "tile", "calls per step", "variant", "µs per call", "min–max", "host µs per call", "host share",
         "fraction of copy"],
        [[f"{r['m']}×{r['k']}", f"{r['tile'][0]}×{r['tile'][1]}", str(r["calls_per_step"]), r["variant"],
          f"{r['t_us']:.1f}", f"{min(r['t_all_us']):.1f}–{max(r['t_all_us']):.1f}", f"{r['host_us_per_call']:.1f}",
          f"{r['host_share']:.2f}", "" if r["fraction_of_copy"] is None else f"{r['fraction_of_copy']:.2f}"]
         for r in rows])
    print(md)
    write_results(args.out, "detect_dispatch", rows, md, meta)


if __name__ == "__main__":
    main()
