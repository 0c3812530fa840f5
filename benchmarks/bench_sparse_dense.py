"""k-gather benchmark (issue 3): pit_jax.sparse_dense against jnp.dot and jax.experimental.sparse.

    python benchmarks/bench_sparse_dense.py [--out benchmarks/results] [--quick] [--tiles 32x1 ...]

For each (shape, micro-tile shape, sparsity): dense `jnp.dot` on the same arrays, pit_jax with
detection included, pit_jax with a precomputed index, tile="auto" (32x1 only), BCOO
(`jax.experimental.sparse`, 32x1 at >= 95%), and the backward dW = xᵀ dy. The roofline floor
is max(useful FLOPs at the measured dense rate, bytes at the measured copy rate);
"of floor" = floor / time.
"""
from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

import pit_jax
from pit_jax.kgather_cuda import count_occupancy
from common import (announce, chain_calls, bench_parser, dispatch_fraction, markdown_report, tile_sparse_bf16, time_per_call,
                    write_results)

SPARSITIES = [0.0, 0.5, 0.9, 0.95, 0.99]  # of 32x1 micro-tiles, at random


def shapes(quick):
    if quick:
        return [("small 256x512x384", 256, 512, 384)]
    return [("4096³", 4096, 4096, 4096), ("OPT fc2 4096x16384→4096", 4096, 16384, 4096)]


def main():
    ap = bench_parser("one small shape")
    ap.add_argument("--no-bcoo", action="store_true")
    ap.add_argument("--tiles", nargs="+", default=["32x1", "64x1", "32x32"],
                    help="micro-tile shapes TMxTK (x is made sparse in that shape)")
    args = ap.parse_args()
    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles]
    warnings.filterwarnings("ignore", message="pit_jax: sparse_")
    meta = announce()
    key = jax.random.PRNGKey(0)
    rows = []
    for name, m, k, n in shapes(args.quick):
        w = jax.random.normal(jax.random.fold_in(key, 99), (k, n), jnp.bfloat16)
        n_inputs = 4
        xs0 = tile_sparse_bf16(key, m, k, (1, 1), 0.0, n_inputs, nonnegative=True)
        copy_t = time_per_call(jax.jit(lambda xs: chain_calls(jnp.negative, xs)), xs0, n_inputs)
        copy_rate = 2 * m * k * 2 / copy_t
        dense = jax.jit(lambda xs, w: chain_calls(jnp.matmul, xs, w))
        t_dense = time_per_call(lambda xs: dense(xs, w), xs0, n_inputs)
        dense_rate = 2 * m * k * n / t_dense
        for tile, sp in [(t, sp) for t in tiles for sp in SPARSITIES]:
            xs = tile_sparse_bf16(key, m, k, tile, sp, n_inputs, nonnegative=True)
            ours = jax.jit(lambda xs, w: chain_calls(lambda x: pit_jax.sparse_dense(x, w, tile=tile), xs))
            idxs = [pit_jax.detect(x, tile) for x in xs]
            ours_idx = jax.jit(lambda xs, w, idxs: chain_calls(
                lambda xi: pit_jax.sparse_dense(xi[0], w, tile=tile, index=xi[1]), list(zip(xs, idxs))))
            dw_ours = jax.jit(lambda xs, w: chain_calls(lambda x: jax.grad(lambda w: jnp.sum(
                pit_jax.sparse_dense(x, w, tile=tile).astype(jnp.float32)))(w), xs))
            dw_dense = jax.jit(lambda xs, w: chain_calls(lambda x: jax.grad(lambda w: jnp.sum(
                (x @ w).astype(jnp.float32)))(w), xs))
            y, want = ours(xs[:1], w)[0], (xs[0] @ w)
            err = float(jnp.linalg.norm((y - want).astype(jnp.float32)) /
                        jnp.maximum(jnp.linalg.norm(want.astype(jnp.float32)), 1e-30))
            t_ours = time_per_call(lambda xs: ours(xs, w), xs, n_inputs)
            host_share = dispatch_fraction(lambda xs: ours(xs, w), xs)
            t_idx = time_per_call(lambda xs: ours_idx(xs, w, idxs), xs, n_inputs)
            t_dw = time_per_call(lambda xs: dw_ours(xs, w), xs, n_inputs, steps=3)
            t_dw_dense = time_per_call(lambda xs: dw_dense(xs, w), xs, n_inputs, steps=3)
            # the dW kernel alone (PIT_KGATHER_DW is read when lowering: set around the compile)
            os.environ["PIT_KGATHER_DW"] = "sparse"
            dw_kernel = jax.jit(lambda xs, w: chain_calls(lambda x: jax.grad(lambda w: jnp.sum(
                pit_jax.sparse_dense(x, w, tile=tile).astype(jnp.float32)))(w), xs))
            dw_kernel.lower(xs, w).compile()
            del os.environ["PIT_KGATHER_DW"]
            t_dw_kernel = time_per_call(lambda xs: dw_kernel(xs, w), xs, n_inputs, steps=3)
            index0 = pit_jax.detect(xs[0], tile)
            occupancy = float(count_occupancy(index0.counts, index0.indices.shape[-1], tile[1])) \
                if tile[0] % 32 == 0 else float("nan")
            t_auto = float("nan")
            if tile == (32, 1):  # tile="auto": kernel or dense matmul, chosen on device
                auto = jax.jit(lambda xs, w: chain_calls(lambda x: pit_jax.sparse_dense(x, w, tile="auto"), xs))
                t_auto = time_per_call(lambda xs: auto(xs, w), xs, n_inputs)
            t_bcoo = float("nan")
            if not args.no_bcoo and tile == (32, 1) and sp >= 0.95 and k <= 4096:  # seconds per call
                nse = int(jnp.count_nonzero(xs[0]))
                sp_x = jsparse.BCOO.fromdense(xs[0], nse=nse)
                bcoo = jax.jit(lambda a, w: a @ w)
                t_bcoo = time_per_call(lambda _: bcoo(sp_x, w), None, 1, steps=3)
            density = float(jnp.mean(pit_jax.detect(xs[0], tile).density))
            flops = 2 * m * k * n * density
            bytes_moved = m * k * 2 + density * k * n * 2 + m * n * 2
            floor = max(flops / dense_rate, bytes_moved / copy_rate)
            row = dict(shape=name, m=m, k=k, n=n, tile=list(tile), sparsity=sp, density=density,
                       rel_err=err, t_dense_ms=t_dense * 1e3, t_pit_ms=t_ours * 1e3,
                       t_pit_given_index_ms=t_idx * 1e3, t_auto_ms=t_auto * 1e3, t_bcoo_ms=t_bcoo * 1e3,
                       t_dw_pit_ms=t_dw * 1e3, t_dw_dense_ms=t_dw_dense * 1e3, t_dw_kernel_ms=t_dw_kernel * 1e3,
                       dw_block_occupancy=occupancy,
                       speedup=t_dense / t_ours, speedup_dw=t_dw_dense / t_dw,
                       floor_ms=floor * 1e3, of_floor=floor / t_ours, dispatch_fraction=host_share,
                       dense_tflops=dense_rate / 1e12, copy_tbps=copy_rate / 1e12)
            rows.append(row)
            print({k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)
    md = markdown_report(
        f"sparse_dense benchmark — {meta['device']}, jax {meta['jax']}, {meta['date']}",
        "bf16, x sparse in micro-tiles of the given shape at random, detection included unless "
        "noted; auto = tile='auto' (32x1 kernel or dense, decided on device); dW pit = the default dW path "
        "(PIT_KGATHER_DW unset: XLA's matmul on x, no conditional; before 2026-11-26 session 7 the on-device rule), "
        "dW kernel = the dW kernel forced (PIT_KGATHER_DW=sparse), dW block occupancy = the opt-in rule's "
        "statistic (PIT_KGATHER_DW=auto runs the kernel when it is at most 0.2); host share = host time to "
        "enqueue 20 steps of pit (detection included) over their wall time (near 1: the host sets the pace); "
        "CUDA kernels built: "
        f"{pit_jax.build_info().get('cuda')}",
        ["shape", "tile", "sparsity", "dense ms", "pit ms", "speedup", "pit (given index) ms", "auto ms",
         "floor ms", "of floor", "dW pit ms", "dW kernel ms", "dW block occupancy", "dW dense ms", "BCOO ms",
         "rel err", "host share"],
        [[r["shape"], "×".join(map(str, r["tile"])), f"{r['sparsity']:.2f}", f"{r['t_dense_ms']:.3f}",
          f"{r['t_pit_ms']:.3f}", f"{r['speedup']:.2f}×", f"{r['t_pit_given_index_ms']:.3f}",
          f"{r['t_auto_ms']:.3f}", f"{r['floor_ms']:.3f}",
          f"{r['of_floor']:.2f}", f"{r['t_dw_pit_ms']:.3f}", f"{r['t_dw_kernel_ms']:.3f}",
          f"{r['dw_block_occupancy']:.2f}", f"{r['t_dw_dense_ms']:.3f}",
          f"{r['t_bcoo_ms']:.3f}", f"{r['rel_err']:.1e}", f"{r['dispatch_fraction']:.2f}"] for r in rows])
    print(md)
    write_results(args.out, "sparse_dense", rows, md, meta)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for shape, tile in dict.fromkeys((r["shape"], tuple(r["tile"])) for r in rows):
            pts = [r for r in rows if r["shape"] == shape and tuple(r["tile"]) == tile]
            ax.plot([r["sparsity"] for r in pts], [r["speedup"] for r in pts], "o-",
                    label=f"{shape}, {tile[0]}×{tile[1]}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xlabel("micro-tile sparsity"); ax.set_ylabel("speedup vs jnp.dot"); ax.legend(fontsize=7)
        fig.tight_layout(); fig.savefig(f"{args.out}/sparse_dense.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
