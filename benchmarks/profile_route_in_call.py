"""Where does the routing built inside a memory-bound projection call spend its time? For the
Qwen-like projection (issue 4: routing in the call 1.29-1.31x its floor, given the tables
1.15-1.25x), a JAX profiler trace of STEPS jitted steps of CALLS independent calls each, with the
routing built in the call and with the tables given: each kernel's median duration on the stream,
and the period between consecutive forwards' ends (one call's device time; medians). Routed period
- given period = the routing's exposed time. (Dependent launches schedule a kernel before the one
ahead of it ends, so its trace interval includes waiting: kernel durations overlap, while the
period between forward ends does not depend on that.)

    python benchmarks/profile_route_in_call.py [--case "Qwen3-30B-A3B-like"] [--out DIR]
"""
from __future__ import annotations

import collections
import re
import statistics

import jax

import pit_jax
from bench_moe import ROUTINGS
from common import announce, markdown_report, write_results
from probe_dispatch_bound import parse_case_args, projection_operands, rolled_routings
from profile_layer_kernels import profile, short

CALLS = 4
STEPS = 10


def kernel_name(name: str) -> str:
    """pit's kernels by their function name (short() leaves 'void pit::' of an anonymous namespace)."""
    m = re.search(r"pit_\w+", name)
    return m.group(0) if m else short(name)


def traced_kernels(step, args):
    """[(name, start µs, µs)] of STEPS steps, after two warm steps."""
    return [(kernel_name(n), s, dur) for n, s, dur in profile(step, args, STEPS, with_start=True)]


def median_durations(events):
    """{kernel: (count, median µs)}."""
    by_name = collections.defaultdict(list)
    for name, _, dur in events:
        by_name[name].append(dur)
    return {n: (len(v), statistics.median(v)) for n, v in by_name.items()}


def forward_period(events, forward_kernel):
    """Median µs between consecutive ends of `forward_kernel` (one call's device time)."""
    ends = sorted(s + dur for name, s, dur in events if name == forward_kernel)
    gaps = [b - a for a, b in zip(ends, ends[1:])]
    return statistics.median(gaps) if gaps else float("nan")


def main():
    args = parse_case_args()
    meta = announce()
    key, w, xs = projection_operands(args.case, CALLS)
    routed = jax.jit(lambda xs, w, idss: [pit_jax.moe_matmul(x, w, i) for x, i in zip(xs, idss)])
    given = jax.jit(lambda xs, w, idss, tabs: [pit_jax.moe_matmul(x, w, i, routing=tb)
                                               for x, i, tb in zip(xs, idss, tabs)])
    rows, cells = [], []
    for routing in ROUTINGS:
        idss, tables = rolled_routings(key, args.case, routing, CALLS)
        ev_routed = traced_kernels(routed, (xs, w, idss))
        ev_given = traced_kernels(given, (xs, w, idss, tables))
        dur_routed, dur_given = median_durations(ev_routed), median_durations(ev_given)
        fwd = next((n for n in dur_given if "forward" in n), None)
        routed_period = forward_period(ev_routed, fwd) if fwd else float("nan")
        given_period = forward_period(ev_given, fwd) if fwd else float("nan")
        r = dict(case=args.case, routing=routing, routed_period_us=routed_period, given_period_us=given_period,
                 exposed_us=routed_period - given_period, routed_kernels=dur_routed, given_kernels=dur_given)
        print(r, flush=True)
        rows.append(r)
        kern = "; ".join(f"{n} ×{c // STEPS}: {m:.1f}" for n, (c, m) in dur_routed.items())
        cells.append([routing, f"{routed_period:.1f}", f"{given_period:.1f}", f"{routed_period - given_period:.1f}",
                      kern])
    title = f"Routing inside the call, {args.case}, {meta['device']}, jax {meta['jax']}, {meta['date']}"
    md = markdown_report(
        title, f"JAX profiler trace, {STEPS} steps of {CALLS} calls; µs, medians. period = time between "
        "consecutive forwards' ends (one call); exposed = routed period - given period",
        ["routing", "period, routing in the call", "period, tables given", "exposed routing",
         "kernels in the routed step (name ×count per step: median µs)"],
        cells)
    print(md)
    if args.out:
        write_results(args.out, "route_in_call", rows, md, meta)


if __name__ == "__main__":
    main()
