"""Where a sparse_dense call's time goes (issue 3, high sparsity): in one process, with
back-to-back launches, the dense matmul, a copy of x, XLA's column-OR read of x (how fast this
card reads x), detection alone (index kept in the jit) under each detect VARIANT, pack + forward
with the index given, and the whole call. Rounds alternate; medians are printed as a table.

    python benchmarks/probe_kgather_parts.py --shape 4096 16384 4096 --sparsity 0.99 \
        --variants default PIT_DETECT_IN_FLIGHT=16
"""
from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp

import pit_jax
from bench_detect import xla_column_or
from common import announce, apply_variant, bench_parser, parse_variants, tile_sparse_bf16, time_per_call

TILE = (32, 1)
N_INPUTS = 4  # distinct x per step: L2 holds none of them between calls


def main():
    ap = bench_parser("unused")
    ap.add_argument("--shape", type=int, nargs=3, default=(4096, 16384, 4096), metavar=("M", "K", "N"))
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.99])
    ap.add_argument("--variants", nargs="+", default=["default"],
                    help="detect/k-gather handler switches, comma-separated NAME=VALUE ('default': none)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    variants, names = parse_variants(args.variants)
    announce()
    m, k, n = args.shape
    w = jax.random.normal(jax.random.PRNGKey(99), (k, n), jnp.bfloat16)
    for sp in args.sparsity:
        xs = tile_sparse_bf16(jax.random.PRNGKey(0), m, k, TILE, sp, N_INPUTS, nonnegative=True)
        idxs = [pit_jax.detect(x, TILE) for x in xs]
        fixed = {
            "dense x @ w": jax.jit(lambda xs: [x @ w for x in xs]),
            "copy of x": jax.jit(lambda xs: [-x for x in xs]),
            "XLA column-OR of x": jax.jit(lambda xs: [xla_column_or(x, TILE[0]) for x in xs]),
        }
        per_variant = {}
        for v in variants:
            apply_variant(v, names)
            fns = {
                "detect (total kept in jit)": jax.jit(lambda xs: sum(jnp.sum(pit_jax.detect(x, TILE).counts) for x in xs)),
                "pack + forward (index given)": jax.jit(lambda xs: [pit_jax.sparse_dense(x, w, tile=TILE, index=i)
                                                                    for x, i in zip(xs, idxs)]),
                "sparse_dense (detect + pack + forward)": jax.jit(lambda xs: [pit_jax.sparse_dense(x, w, tile=TILE)
                                                                               for x in xs]),
            }
            for fn in fns.values():
                jax.block_until_ready(fn(xs))  # compiled under this variant
            per_variant[v] = fns
        apply_variant("", names)
        for fn in fixed.values():
            jax.block_until_ready(fn(xs))
        times = {}
        for _ in range(args.rounds):
            apply_variant("", names)
            for name, fn in fixed.items():
                times.setdefault(name, []).append(time_per_call(fn, xs, N_INPUTS))
            for v, fns in per_variant.items():
                apply_variant(v, names)
                for name, fn in fns.items():
                    times.setdefault(f"{name} [{v or 'default'}]", []).append(time_per_call(fn, xs, N_INPUTS))
        apply_variant("", names)
        dense = statistics.median(times["dense x @ w"])
        print(f"\n{m}x{k}->{n}, sparsity {sp}, x {m * k * 2 / 2**20:.0f} MiB, medians of {args.rounds} rounds")
        print("| part | us | all rounds | dense / part | x read TB/s |")
        print("|---|---|---|---|---|")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"| {name} | {med * 1e6:.1f} | {' '.join(f'{t * 1e6:.1f}' for t in ts)} | "
                  f"{dense / med:.2f} | {m * k * 2 / med / 1e12:.2f} |", flush=True)


if __name__ == "__main__":
    main()
