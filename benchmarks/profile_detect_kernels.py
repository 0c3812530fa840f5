"""Where one 4096² detection's time goes inside the jitted loop bench_detect.py times (issue 2):
a JAX profiler trace of steps of 16 detections (index kept in the jit), per kernel name its
count and median duration, and per call the time from one call's first kernel start to the
next's (the period the benchmark's time per call measures) split into busy and idle time. The
same for XLA's copy (the benchmark's denominator), its column-OR of x and a flat sum of x.

    python benchmarks/profile_detect_kernels.py [--case 0] [--sparsity 0.9] [--out DIR]
"""
from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp

from bench_detect import CASES, detect_step, xla_column_or
from common import announce, apply_variant, parse_variants, print_and_save, tile_sparse_bf16, time_per_call
from profile_layer_kernels import profile, short

STEPS = 10


def stats_row(label, values):
    """A markdown row: label, count, median, min, max (µs)."""
    return f"| {label} | {len(values)} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |"


def summarize(label, seconds_per_call, events, calls, lines):
    """events: [(name, start µs, dur µs)] of STEPS steps of `calls` calls each; seconds_per_call:
    the same step timed as bench_detect.py times it (outside the trace)."""
    by_name = {}
    for name, _, dur in events:
        by_name.setdefault(short(name), []).append(dur)
    busy = sum(d for _, _, d in events)
    span = events[-1][1] + events[-1][2] - events[0][1]
    n_calls = STEPS * calls
    lines.append(f"### {label}\n")
    lines.append(f"Timed as bench_detect.py does: {seconds_per_call * 1e6:.2f} µs per call.\n")
    lines.append(f"{len(events)} kernels over {n_calls} calls; span {span:.1f} µs = {span / n_calls:.2f} µs per call, "
                 f"busy (sum of kernel durations) {busy / n_calls:.2f} µs per call\n")
    lines.append("| kernel | count | median µs | min µs | max µs |\n|---|---|---|---|---|")
    for name, durs in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
        lines.append(stats_row(name, durs))
    # gaps between consecutive kernels (negative: they overlapped, e.g. a dependent launch)
    gaps = [events[i + 1][1] - (events[i][1] + events[i][2]) for i in range(len(events) - 1)]
    pairs = {}
    for i, g in enumerate(gaps):
        pairs.setdefault((short(events[i][0])[:40], short(events[i + 1][0])[:40]), []).append(g)
    lines.append("\n| gap after → before | count | median µs | min µs | max µs |\n|---|---|---|---|---|")
    for (a, b), gs in sorted(pairs.items(), key=lambda kv: -len(kv[1])):
        lines.append(stats_row(f"{a} → {b}", gs))
    lines.append("")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", type=int, nargs="+", default=[0])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--variants", nargs="+", default=["default"],
                    help="comma-separated NAME=VALUE lists of handler switches ('default' for none)")
    ap.add_argument("--forms", nargs="*", default=["total"],
                    help="more detect_step forms to profile with the default switches")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    meta = announce()
    lines = [f"# Detection kernels in the jitted loop ({meta['device']}, jax {meta['jax']}, {meta['date']})\n"]
    variants, names = parse_variants(args.variants)
    for case_id in args.case:
        m, k, tile, layout = CASES[case_id]
        n = 16
        xs = tile_sparse_bf16(jax.random.PRNGKey(0), m, k, tile, args.sparsity, n)
        lines.append(f"## {m}×{k} {tile[0]}×{tile[1]} {layout}, {args.sparsity:.0%} sparse, {n} calls per step\n")
        probes = [("XLA copy (-x)", jax.jit(lambda xs: [-x for x in xs]), ""),
                  ("XLA flat sum of x", jax.jit(lambda xs: [jnp.sum(x, dtype=jnp.float32) for x in xs]), "")]
        if layout == "row" and m % tile[0] == 0:
            probes.append(("XLA column-OR", jax.jit(lambda xs: [xla_column_or(x, tile[0]) for x in xs]), ""))
        for v in variants:  # each variant's function is compiled, timed and traced under its switches
            probes.append((f"detect, index kept in jit, {v or 'default'}", detect_step(tile, layout, "counts"), v))
        for form in args.forms:
            probes.append((f"detect, default, step returns {form!r}", detect_step(tile, layout, form), ""))
        for label, fn, v in probes:
            apply_variant(v, names)
            t = time_per_call(fn, xs, n)
            summarize(label, t, profile(fn, (xs,), STEPS, with_start=True), n, lines)
    print_and_save("\n".join(lines), args.out, "detect_kernels.md")


if __name__ == "__main__":
    main()
