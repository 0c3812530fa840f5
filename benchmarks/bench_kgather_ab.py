"""A/B of k-gather forward settings in one process (issue 3): each variant is a set of
environment variables the CUDA handler reads when it launches (NAME=VALUE; session 11 used it
for switches since removed, see scripts/device_checks.sh PART=kgather_ab),
given its own jitted functions, compiled and first run while the variant's variables are set and
set again before each timing. Variants alternate round by round; medians are reported, for
sparse_dense with detection included and with the index given (pack + forward only), against
jnp.dot on the same arrays.

    python benchmarks/bench_kgather_ab.py --variants default NAME=VALUE --out DIR
"""
from __future__ import annotations

import os
import statistics

import jax
import jax.numpy as jnp

import pit_jax
from bench_sparse_dense import shapes
from common import (announce, apply_variant, chain_calls, bench_parser, markdown_report, parse_variants, round_order,
                    tile_sparse_bf16, time_per_call, write_results)

ROUNDS = int(os.environ.get("PIT_BENCH_ROUNDS", "3"))
TILE = (32, 1)


def main():
    ap = bench_parser("one small shape")
    ap.add_argument("--variants", nargs="+", required=True,
                    help="comma-separated NAME=VALUE lists; 'default' for none")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.9, 0.99])
    args = ap.parse_args()
    variants, names = parse_variants(args.variants)
    meta = announce()
    key = jax.random.PRNGKey(0)
    rows = []
    n_inputs = 4
    for name, m, k, n in shapes(args.quick):
        w = jax.random.normal(jax.random.fold_in(key, 99), (k, n), jnp.bfloat16)
        dense = jax.jit(lambda xs, w: chain_calls(jnp.matmul, xs, w))
        for sp in args.sparsity:
            xs = tile_sparse_bf16(key, m, k, TILE, sp, n_inputs, nonnegative=True)
            idxs = [pit_jax.detect(x, TILE) for x in xs]
            want = dense(xs[:1], w)[0].astype(jnp.float32)
            fns = []
            for v in variants:
                apply_variant(v, names)
                full = jax.jit(lambda xs, w: chain_calls(lambda x: pit_jax.sparse_dense(x, w, tile=TILE), xs))
                given = jax.jit(lambda xs, w, idxs: chain_calls(
                    lambda xi: pit_jax.sparse_dense(xi[0], w, tile=TILE, index=xi[1]), list(zip(xs, idxs))))
                got = full(xs, w)[0].astype(jnp.float32)
                given(xs, w, idxs)
                err = float(jnp.max(jnp.abs(got - want)) / (jnp.max(jnp.abs(want)) + 1e-30))
                fns.append((v, full, given, err))
            t_dense, t_full, t_given = [], {v: [] for v in variants}, {v: [] for v in variants}
            for rnd in range(ROUNDS):
                apply_variant("", names)
                t_dense.append(time_per_call(lambda xs: dense(xs, w), xs, n_inputs))
                for v, full, given, _ in round_order(fns, rnd):
                    apply_variant(v, names)
                    t_full[v].append(time_per_call(lambda xs: full(xs, w), xs, n_inputs))
                    t_given[v].append(time_per_call(lambda xs: given(xs, w, idxs), xs, n_inputs))
            apply_variant("", names)
            dense_ms = statistics.median(t_dense) * 1e3
            for v, _, _, err in fns:
                row = dict(shape=name, sparsity=sp, variant=v or "default", dense_ms=dense_ms,
                           pit_ms=statistics.median(t_full[v]) * 1e3, pit_all_ms=[t * 1e3 for t in t_full[v]],
                           given_ms=statistics.median(t_given[v]) * 1e3,
                           given_all_ms=[t * 1e3 for t in t_given[v]], rel_err=err)
                rows.append(row)
                print({k_: (round(x, 4) if isinstance(x, float) else x) for k_, x in row.items()
                       if not k_.endswith("all_ms")}, flush=True)
            del xs, idxs
    md = markdown_report(
        f"k-gather A/B — {meta['device']}, jax {meta['jax']}, {meta['date']}",
        f"bf16, random 32×1 tiles; {ROUNDS} rounds, variants alternated in one process (in reverse order every other round); median ms per call "
        "(min–max over rounds); pit = detection included, given = index passed in (pack + forward).",
        ["shape", "sparsity", "variant", "dense ms", "pit ms", "min–max", "speedup", "given ms", "min–max",
         "rel err"],
        [[r["shape"], f"{r['sparsity']:.2f}", r["variant"], f"{r['dense_ms']:.3f}", f"{r['pit_ms']:.3f}",
          f"{min(r['pit_all_ms']):.3f}–{max(r['pit_all_ms']):.3f}", f"{r['dense_ms'] / r['pit_ms']:.2f}×",
          f"{r['given_ms']:.3f}", f"{min(r['given_all_ms']):.3f}–{max(r['given_all_ms']):.3f}",
          f"{r['rel_err']:.1e}"] for r in rows])
    print(md)
    write_results(args.out, "kgather_ab", rows, md, meta)


if __name__ == "__main__":
    main()
