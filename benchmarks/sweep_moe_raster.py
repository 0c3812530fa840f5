"""Sweep of the Hopper MoE forward's raster band (PIT_MOE_COL_BAND, read per launch): time of
one expert projection (bf16, uniform routing) per band, next to the dense same-FLOP jnp.dot.

    python benchmarks/sweep_moe_raster.py [--bands 1 2 4 8 16] [--out DIR]
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from bench_moe import CASES, QUICK  # the projection benchmark's shapes
from common import announce, bench_parser, markdown_report, time_per_call, write_results

import pit_jax

CALLS = 4  # distinct inputs per jitted step


def main():
    ap = bench_parser("small shape only")
    ap.add_argument("--bands", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = ap.parse_args()
    meta = announce()
    shapes = QUICK if args.quick else CASES
    rows = []
    for name, (t, e, k, d, f) in shapes.items():
        key = jax.random.PRNGKey(0)
        xs = [jax.random.normal(jax.random.fold_in(key, i), (t, d), jnp.bfloat16) for i in range(CALLS)]
        w = (jax.random.normal(jax.random.fold_in(key, 99), (e, d, f), jnp.bfloat16) * d ** -0.5).astype(jnp.bfloat16)
        ids = jax.lax.top_k(jax.random.normal(jax.random.fold_in(key, 98), (t, e)), k)[1].astype(jnp.int32)
        routing = pit_jax.moe_routing(ids, e)
        pit = jax.jit(lambda xs, w: [pit_jax.moe_matmul(x, w, ids, routing=routing) for x in xs])
        dense_w = w[0]
        rows_x = [jnp.repeat(x, k, axis=0) for x in xs]
        dense = jax.jit(lambda xs, w: [x @ w for x in xs])
        t_dense = time_per_call(lambda a: dense(a, dense_w), rows_x, CALLS)
        del rows_x
        for band in args.bands:
            os.environ["PIT_MOE_COL_BAND"] = str(band)
            t_pit = time_per_call(lambda a: pit(a, w), xs, CALLS)
            rows.append({"case": name, "band": band, "t_pit_ms": t_pit * 1e3, "t_dense_ms": t_dense * 1e3,
                         "pit_over_dense": t_pit / t_dense})
            print(rows[-1], flush=True)
        os.environ.pop("PIT_MOE_COL_BAND", None)
    header = ["case", "band", "pit ms", "dense same-FLOP ms", "pit / dense"]
    cells = [[r["case"], str(r["band"]), f"{r['t_pit_ms']:.3f}", f"{r['t_dense_ms']:.3f}", f"{r['pit_over_dense']:.2f}"]
             for r in rows]
    md = markdown_report(f"MoE forward raster band sweep — {meta['device']}, jax {meta['jax']}, {meta['date']}",
                         "bf16, uniform top-k routing (routing tables built once, outside the timing); "
                         "band = PIT_MOE_COL_BAND", header, cells)
    print(md)
    write_results(args.out, "moe_raster", rows, md, meta)


if __name__ == "__main__":
    main()
