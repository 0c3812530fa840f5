"""Is bench_sparse_dense's time per call at high sparsity the kernels' or the runtime's? For 4096³
(32x1 tiles, bf16): the time per call with 1, 4 (bench_sparse_dense's step) and 16 calls per jitted
step, for the dense matmul, sparse_dense detecting its index, and sparse_dense given it; then one
profiler trace of the 4-call step: idle gaps between kernels inside a step against those at step
boundaries, and the host threads' busiest events per call (what XLA's runtime does per step).
Run it under different XLA_FLAGS (e.g. --xla_gpu_enable_command_buffer=) to compare runtimes.

    python benchmarks/probe_kgather_step.py [--sparsity 0.95 0.99] [--out DIR]
"""
from __future__ import annotations

import argparse
import collections
import os
import warnings

import jax
import jax.numpy as jnp

import pit_jax
from common import announce, chain_calls, print_and_save, tile_sparse_bf16, time_per_call
from profile_layer_kernels import host_events, kernel_events, profile, short

CALLS = (1, 4, 16)
TRACED_CALLS = 4
TRACED_STEPS = 10


def gap_rows(label, kernels, calls_per_step):
    per_step = len(kernels) // TRACED_STEPS
    inner, boundary = [], []
    for i in range(len(kernels) - 1):
        gap = kernels[i + 1][1] - (kernels[i][1] + kernels[i][2])
        (boundary if (i + 1) % per_step == 0 else inner).append(gap)
    mean = lambda v: sum(v) / len(v) if v else float("nan")
    busy = sum(d for _, _, d in kernels) / (TRACED_STEPS * calls_per_step)
    return (f"| {label} | {per_step} | {busy:.1f} | {mean(inner):.1f} (max {max(inner, default=float('nan')):.1f}) | "
            f"{mean(boundary):.1f} (max {max(boundary, default=float('nan')):.1f}) |")


def host_rows(label, host, calls):
    total = collections.defaultdict(float)
    count = collections.Counter()
    for thread, name, dur in host:
        key = (thread[:40], short(name)[:80])
        total[key] += dur
        count[key] += 1
    top = sorted(total.items(), key=lambda kv: -kv[1])[:20]
    return [f"| {label} | {t} | {n} | {v / calls:.1f} | {count[(t, n)] / calls:g} |" for (t, n), v in top]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsity", type=float, nargs="+", default=(0.95, 0.99))
    ap.add_argument("--size", type=int, default=4096, help="M = K = N (small: a CPU smoke run)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    warnings.filterwarnings("ignore", message="pit_jax: sparse_")
    meta = announce()
    m = k = n = a.size
    key = jax.random.PRNGKey(0)
    w = jax.random.normal(jax.random.fold_in(key, 99), (k, n), jnp.bfloat16)
    cases = [("dense", 0.0)] + [(kind, sp) for sp in a.sparsity for kind in ("detected", "given")]
    times, gaps, hosts = [], [], []
    for kind, sp in cases:
        xs_all = tile_sparse_bf16(key, m, k, (32, 1), sp, max(CALLS), nonnegative=True)
        row = []
        for calls in CALLS:
            xs = xs_all[:calls]
            if kind == "dense":
                f = jax.jit(lambda xs, w: chain_calls(jnp.matmul, xs, w))
                step = lambda xs, f=f: f(xs, w)
            elif kind == "detected":
                f = jax.jit(lambda xs, w: chain_calls(lambda x: pit_jax.sparse_dense(x, w), xs))
                step = lambda xs, f=f: f(xs, w)
            else:
                idxs = [pit_jax.detect(x, (32, 1)) for x in xs]
                f = jax.jit(lambda xs, w, idxs: chain_calls(lambda xi: pit_jax.sparse_dense(xi[0], w, index=xi[1]),
                                                           list(zip(xs, idxs))))
                step = lambda xs, f=f, idxs=idxs: f(xs, w, idxs)
            row.append(time_per_call(step, xs, calls) * 1e6)
            if calls == TRACED_CALLS:
                kernels, host = profile(step, (xs,), TRACED_STEPS,
                                        read=lambda d: (kernel_events(d, with_start=True), host_events(d)))
                label = f"{kind} {sp:.2f}"
                gaps.append(gap_rows(label, kernels, calls))
                hosts += host_rows(label, host, TRACED_STEPS * calls)
        times.append(f"| {kind} | {sp:.2f} | " + " | ".join(f"{t:.1f}" for t in row) + " |")
    text = "\n".join([
        "# sparse_dense per-step runtime probe — " + ", ".join(f"{k} {v}" for k, v in meta.items()),
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", "",
        f"{m}³ bf16, 32x1 tiles at random; µs per call (time_per_call: 10 steps back to back, median of 5)", "",
        "| call | sparsity | " + " | ".join(f"{c} per step" for c in CALLS) + " |", "|---|---|" + "---|" * len(CALLS),
        *times, "",
        f"Trace of {TRACED_STEPS} steps of {TRACED_CALLS} calls: kernel busy µs per call; idle µs between consecutive "
        "kernels inside a step and at step boundaries (mean, max)", "",
        "| call | kernels per step | busy µs per call | gap inside a step | gap at a step boundary |", "|---|---|---|---|---|",
        *gaps, "",
        "Host threads' busiest events (µs per call, occurrences per call)", "",
        "| call | thread | event | µs per call | per call |", "|---|---|---|---|---|", *hosts])
    print_and_save(text, a.out, "kgather_step.md")


if __name__ == "__main__":
    main()
