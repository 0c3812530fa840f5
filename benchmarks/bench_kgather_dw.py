"""dW of sparse_dense (issue 3): Σ xᵀ·dy over x's listed micro-tiles, with the index given (as in a
training step, which reuses the forward's index), against the dense dW on the same arrays in the
same run. Variants are environment variables read per launch or when lowering (each variant has
its own compiled function, lowered with PIT_KGATHER_DW=sparse under that variant; a variant that
names PIT_KGATHER_DW leaves it unset in the others, so "default" is then XLA's dense dW); session 34
compared the products path (PIT_KGATHER_DW_PRODUCTS_DENSITY) with the masked kernel, session 35
PIT_KGATHER_DW=device with XLA's dense dW and the kernels.

    python benchmarks/bench_kgather_dw.py --out DIR [--variants default NAME=VALUE ...]
"""
from __future__ import annotations

import os
import statistics

import jax
import jax.numpy as jnp

import pit_jax
from bench_sparse_dense import shapes
from common import (announce, apply_variant, bench_parser, markdown_report, parse_variants, round_order,
                    tile_sparse_bf16, time_per_call, write_results)

ROUNDS = int(os.environ.get("PIT_BENCH_ROUNDS", "3"))
TILE = (32, 1)


def dw_sparse(x, idx, w, dy):
    """∂/∂w of <sparse_dense(x, w), dy>: the dW primitive alone once XLA drops the unused forward
    (with idx None, sparse_dense detects the index from x: detection is in the call, and the dW
    knows x is zero outside it)."""
    _, vjp = jax.vjp(lambda w: pit_jax.sparse_dense(x, w, tile=TILE, index=idx), w)
    return vjp(dy)[0]


def main():
    ap = bench_parser("one small shape")
    ap.add_argument("--variants", nargs="+", default=["default"])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.9, 0.95, 0.99])
    ap.add_argument("--index", choices=["given", "own"], default="given",
                    help="given: the index passed in (a training step reusing the forward's); own: "
                         "sparse_dense detects it from x inside the dW call")
    args = ap.parse_args()
    variants, names = parse_variants(args.variants)
    meta = announce()
    key = jax.random.PRNGKey(0)
    rows = []
    n_inputs = 4
    for name, m, k, n in shapes(args.quick):
        w = jax.random.normal(jax.random.fold_in(key, 99), (k, n), jnp.bfloat16)
        dys = [jax.random.normal(jax.random.fold_in(key, 200 + i), (m, n), jnp.bfloat16) for i in range(n_inputs)]
        dense = jax.jit(lambda xs, dys: [jnp.matmul(x.T, dy, preferred_element_type=jnp.float32).astype(x.dtype)
                                         for x, dy in zip(xs, dys)])
        os.environ["PIT_KGATHER_DW"] = "sparse"  # read when lowering
        # one jitted function per variant: a variable read when lowering (e.g.
        # PIT_KGATHER_DW_PRODUCTS_DENSITY) takes effect at each function's first call, under its variant
        ours = {v: jax.jit(lambda xs, idxs, dys: [dw_sparse(x, i, w, dy) for x, i, dy in zip(xs, idxs, dys)])
                for v in variants}
        for sp in args.sparsity:
            xs = tile_sparse_bf16(key, m, k, TILE, sp, n_inputs, nonnegative=True)
            idxs = [pit_jax.detect(x, TILE) if args.index == "given" else None for x in xs]
            want = dense(xs[:1], dys[:1])[0].astype(jnp.float32)
            errs, kernels = {}, {}
            for v in variants:
                apply_variant(v, names)
                hlo = ours[v].lower(xs, idxs, dys).compile().as_text()
                kernels[v] = {c: hlo.count(f'custom_call_target="{c}"')
                              for c in ("pit_detect", "pit_sparse_tn", "pit_sparse_tn_products",
                                        "pit_sparse_tn_products_detect", "pit_dense_tn_gated", "pit_sparse_dense")}
                got = ours[v](xs, idxs, dys)[0].astype(jnp.float32)
                errs[v] = float(jnp.linalg.norm(got - want) / (jnp.linalg.norm(want) + 1e-30))
            t_dense, t_ours = [], {v: [] for v in variants}
            for rnd in range(ROUNDS):
                apply_variant("", names)
                t_dense.append(time_per_call(lambda a: dense(a, dys), xs, n_inputs))
                for v in round_order(variants, rnd):
                    apply_variant(v, names)
                    t_ours[v].append(time_per_call(lambda a: ours[v](a, idxs, dys), xs, n_inputs))
            apply_variant("", names)
            dense_ms = statistics.median(t_dense) * 1e3
            for v in variants:
                row = dict(shape=name, sparsity=sp, variant=v or "default", index=args.index, dense_ms=dense_ms,
                           dw_ms=statistics.median(t_ours[v]) * 1e3, dw_all_ms=[t * 1e3 for t in t_ours[v]],
                           rel_err=errs[v], kernels=kernels[v])
                rows.append(row)
                print({k_: (round(x, 4) if isinstance(x, float) else x) for k_, x in row.items()
                       if k_ != "dw_all_ms"}, flush=True)
            del xs, idxs
        os.environ.pop("PIT_KGATHER_DW", None)  # (a variant naming it has already unset it)
    md = markdown_report(
        f"k-gather dW — {meta['device']}, jax {meta['jax']}, {meta['date']}",
        f"bf16, random 32×1 tiles of x, index {'given' if args.index == 'given' else 'detected from x in the call'}; dW = Σ xᵀ·dy over the listed tiles; {ROUNDS} rounds, "
        "variants alternated in one process; median ms per call (min–max over rounds); dense = "
        "jnp.matmul(x.T, dy) on the same arrays; kernels = custom calls in the compiled dW function.",
        ["shape", "sparsity", "variant", "dense dW ms", "pit dW ms", "min–max", "speedup", "rel err", "kernels"],
        [[r["shape"], f"{r['sparsity']:.2f}", r["variant"], f"{r['dense_ms']:.3f}", f"{r['dw_ms']:.3f}",
          f"{min(r['dw_all_ms']):.3f}–{max(r['dw_all_ms']):.3f}", f"{r['dense_ms'] / r['dw_ms']:.2f}×",
          f"{r['rel_err']:.1e}", " ".join(f"{c}:{n}" for c, n in r["kernels"].items())] for r in rows])
    print(md)
    write_results(args.out, "kgather_dw", rows, md, meta)


if __name__ == "__main__":
    main()
