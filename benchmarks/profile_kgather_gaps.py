"""Where the time of a sparse_dense call goes between its kernels: bench_sparse_dense's step (four
chained calls on distinct x, 32x1 tiles, detection included or the index given) timed back to back, then
the same steps under a JAX profiler trace: per call, the wall time, the kernels' span and busy
time, each kernel's mean time, and the largest idle gaps between consecutive kernels.

    python benchmarks/profile_kgather_gaps.py [--sparsity 0.9 0.95 0.99] [--out DIR]
"""
from __future__ import annotations

import argparse
import collections
import warnings

import jax
import jax.numpy as jnp

import pit_jax
from common import announce, chain_calls, print_and_save, tile_sparse_bf16, time_per_call
from profile_layer_kernels import profile, short

CALLS_PER_STEP = 4
STEPS = 10
SHAPES = {"4096³": (4096, 4096, 4096), "fc2": (4096, 16384, 4096), "small": (256, 512, 256)}  # small: a CPU smoke run


def profile_rows(label, step, inputs):
    """Markdown rows: the call's wall time, span, busy time and gaps; then its kernels' mean times."""
    wall = time_per_call(step, inputs, CALLS_PER_STEP) * 1e6
    ks = profile(step, (inputs,), STEPS, with_start=True)
    calls = STEPS * CALLS_PER_STEP
    if not ks:
        return [f"| {label} | {wall:.1f} | no kernel events | | | |"], []
    busy = sum(dur for _, _, dur in ks) / calls
    span = (ks[-1][1] + ks[-1][2] - ks[0][1]) / calls
    gaps = [(ks[i + 1][1] - (ks[i][1] + ks[i][2]), short(ks[i][0]), short(ks[i + 1][0])) for i in range(len(ks) - 1)]
    by_pair = collections.defaultdict(list)
    for g, a, b in gaps:
        by_pair[(a, b)].append(g)
    pair_text = "; ".join(f"{a} → {b}: {sum(v) / len(v):.1f} µs × {len(v) / calls:g}"
                          for (a, b), v in sorted(by_pair.items(), key=lambda kv: -sum(kv[1])))
    head = f"| {label} | {wall:.1f} | {span:.1f} | {busy:.1f} | {len(ks) / calls:g} | {pair_text} |"
    per_kernel = collections.defaultdict(list)
    for name, _, dur in ks:
        per_kernel[short(name)].append(dur)
    kernel_rows = [f"| {label} | {name} | {sum(v) / calls:.1f} | {len(v) / calls:g} |"
                   for name, v in sorted(per_kernel.items(), key=lambda kv: -sum(kv[1]))]
    return [head], kernel_rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsity", type=float, nargs="+", default=(0.9, 0.95, 0.99))
    ap.add_argument("--shapes", nargs="+", default=["4096³", "fc2"], choices=list(SHAPES))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    warnings.filterwarnings("ignore", message="pit_jax: sparse_")
    meta = announce()
    key = jax.random.PRNGKey(0)
    calls, kernels = [], []
    for shape_name in a.shapes:
        m, k, n = SHAPES[shape_name]
        w = jax.random.normal(jax.random.fold_in(key, 99), (k, n), jnp.bfloat16)
        xs0 = tile_sparse_bf16(key, m, k, (1, 1), 0.0, CALLS_PER_STEP, nonnegative=True)
        dense = jax.jit(lambda xs, w: chain_calls(jnp.matmul, xs, w))
        head, rows = profile_rows(f"{shape_name} dense", lambda xs: dense(xs, w), xs0)
        calls += head
        kernels += rows
        for sp in a.sparsity:
            xs = tile_sparse_bf16(key, m, k, (32, 1), sp, CALLS_PER_STEP, nonnegative=True)
            ours = jax.jit(lambda xs, w: chain_calls(lambda x: pit_jax.sparse_dense(x, w), xs))
            idxs = [pit_jax.detect(x, (32, 1)) for x in xs]
            given = jax.jit(lambda xs, w, idxs: chain_calls(lambda xi: pit_jax.sparse_dense(xi[0], w, index=xi[1]),
                                                               list(zip(xs, idxs))))
            for label, step in ((f"{shape_name} {sp:.2f} detected", lambda xs: ours(xs, w)),
                                (f"{shape_name} {sp:.2f} given", lambda xs: given(xs, w, idxs))):
                head, rows = profile_rows(label, step, xs)
                calls += head
                kernels += rows
    text = "\n".join([
        "# sparse_dense call anatomy — " + ", ".join(f"{k} {v}" for k, v in meta.items()), "",
        f"bf16, 32x1 tiles at random; {CALLS_PER_STEP} chained calls per jitted step on distinct x, {STEPS} steps back to back. "
        "wall = µs per call (time_per_call, as bench_sparse_dense); span = first kernel start to last kernel end per "
        "call (profiler trace); busy = kernel time per call; gaps = idle time between consecutive kernels, summed "
        "per pair of kernel names (mean µs × occurrences per call)", "",
        "| call | wall µs | span µs | busy µs | kernels / call | gaps |", "|---|---|---|---|---|---|", *calls, "",
        "| call | kernel | µs per call | launches per call |", "|---|---|---|---|", *kernels])
    print_and_save(text, a.out, "kgather_gaps.md")


if __name__ == "__main__":
    main()
