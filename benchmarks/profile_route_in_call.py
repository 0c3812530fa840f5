"""Where does the routing built inside a memory-bound projection call spend its time? For the
Qwen-like projection (issue 4: routing in the call 1.29-1.31x its floor, given the tables
1.15-1.25x), a JAX profiler trace of STEPS jitted steps of CALLS independent calls each, with the
routing built in the call and with the tables given: each kernel's median duration on the stream,
and the period between consecutive forwards' ends (one call's device time; medians). Routed period
- given period = the routing's exposed time between forwards; the same per call of whole steps, and
the kernels' order in a step, say whether a step runs its routings ahead of its forwards.
(Dependent launches schedule a kernel before the one ahead of it ends, so its trace interval
includes waiting: kernel durations overlap, while the period between forward ends does not depend
on that.)

    python benchmarks/profile_route_in_call.py [--case "Qwen3-30B-A3B-like"] [--out DIR]
"""
from __future__ import annotations

import collections
import itertools
import statistics

import jax

import pit_jax
from bench_moe import ROUTINGS
from common import announce, markdown_report, write_results
from probe_dispatch_bound import parse_case_args, projection_operands, rolled_routings
from profile_layer_kernels import profile, short

CALLS = 4
STEPS = 10


def traced_kernels(step, args):
    """[(name, start µs, µs)] of STEPS steps, after two warm steps."""
    return [(short(n), s, dur) for n, s, dur in profile(step, args, STEPS, with_start=True)]


def median_durations(events):
    """{kernel: (count, median µs)}."""
    by_name = collections.defaultdict(list)
    for name, _, dur in events:
        by_name[name].append(dur)
    return {n: (len(v), statistics.median(v)) for n, v in by_name.items()}


def forward_ends(events, forward_kernel):
    """The end times (µs) of `forward_kernel`'s launches, in order."""
    return sorted(s + dur for name, s, dur in events if name == forward_kernel)


def forward_period(events, forward_kernel):
    """Median µs between consecutive ends of `forward_kernel` (one call's device time)."""
    ends = forward_ends(events, forward_kernel)
    gaps = [b - a for a, b in zip(ends, ends[1:])]
    return statistics.median(gaps) if gaps else float("nan")


def step_period(events, forward_kernel, calls=CALLS):
    """Median over steps of (end of a step's last forward - end of the previous step's) / calls: one
    call's share of a whole step, which forward_period misses where a step runs its routings before
    its forwards (session 26: the median gap between forwards did not grow with the routing inside)."""
    step_ends = forward_ends(events, forward_kernel)[calls - 1::calls]
    spans = [(b - a) / calls for a, b in zip(step_ends, step_ends[1:])]
    return statistics.median(spans) if spans else float("nan")


def step_order(events, forward_kernel, calls=CALLS):
    """The kernels of the second traced step in start order, runs of one name folded ("a ×2, b")."""
    ends = forward_ends(events, forward_kernel)
    if len(ends) < 2 * calls:
        return ""
    first, last = ends[calls - 1], ends[2 * calls - 1]  # after step 1's last forward, up to step 2's
    names = [name.replace("pit_moe_", "") for name, s, dur in sorted(events, key=lambda e: e[1])
             if first < s + dur <= last]
    runs = [(n, len(list(group))) for n, group in itertools.groupby(names)]
    return ", ".join(n if c == 1 else f"{n} ×{c}" for n, c in runs)


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
        routed_step = step_period(ev_routed, fwd) if fwd else float("nan")
        given_step = step_period(ev_given, fwd) if fwd else float("nan")
        order = step_order(ev_routed, fwd) if fwd else ""
        r = dict(case=args.case, routing=routing, routed_period_us=routed_period, given_period_us=given_period,
                 exposed_us=routed_period - given_period, routed_step_us=routed_step, given_step_us=given_step,
                 step_exposed_us=routed_step - given_step, routed_step_order=order,
                 routed_kernels=dur_routed, given_kernels=dur_given)
        print(r, flush=True)
        rows.append(r)
        kern = "; ".join(f"{n} ×{c // STEPS}: {m:.1f}" for n, (c, m) in dur_routed.items())
        cells.append([routing, f"{routed_period:.1f}", f"{given_period:.1f}", f"{routed_period - given_period:.1f}",
                      f"{routed_step:.1f}", f"{given_step:.1f}", f"{routed_step - given_step:.1f}", kern, order])
    title = f"Routing inside the call, {args.case}, {meta['device']}, jax {meta['jax']}, {meta['date']}"
    md = markdown_report(
        title, f"JAX profiler trace, {STEPS} steps of {CALLS} calls; µs, medians. period = time between "
        "consecutive forwards' ends (one call); exposed = routed period - given period; per call of a step = "
        f"time between consecutive steps' last forward ends / {CALLS} (what the benchmarks' wall time sees); "
        "order = the kernels of one routed step in start order",
        ["routing", "period, routing in the call", "period, tables given", "exposed routing",
         "per call of a step, routed", "per call of a step, given", "exposed per call of a step",
         "kernels in the routed step (name ×count per step: median µs)", "order in a routed step"],
        cells)
    print(md)
    if args.out:
        write_results(args.out, "route_in_call", rows, md, meta)


if __name__ == "__main__":
    main()
