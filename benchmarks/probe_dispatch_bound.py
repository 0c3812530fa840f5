"""Are bench_moe's Qwen-like projection timings bound by the host's dispatch? Each of its calls is
one jitted dispatch (time_per_call with one call per step); a call of ~0.1 ms of GPU work may
take the host as long to launch. Here the same projection (routing built in the call, or the
routing tables given) is timed with 1 and with CALLS independent calls per jitted step (distinct
tokens, ids rolled so no two routings are equal and XLA cannot merge them): if the per-call time
drops with more calls per step, the one-call number timed the host. Also the host's own time per
call: ENQUEUE_CALLS calls dispatched without waiting (µs per call until the loop returns), for the
dense matmul of the same FLOPs, the routing alone, the projection given the tables and with the
routing in the call, and a jitted `a + 1` on 8 floats (JAX's dispatch with almost no device work);
a pit call whose enqueue time exceeds that baseline's points at the FFI handlers' host work rather
than JAX's dispatch. Where a call's device work takes longer than its dispatch (the dense matmul,
the projection) the loop is held back by the device and measures that instead (session 24's
H100: 62-177 µs per call there).

    python benchmarks/probe_dispatch_bound.py [--case "Qwen3-30B-A3B-like"] [--out DIR]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import pit_jax
from bench_moe import CASES, ROUTINGS, expert_ids
from common import announce, enqueue_and_wall, markdown_report, time_per_call, write_results

CALLS = 4
ENQUEUE_CALLS = 200


def enqueue_us(fn, *args) -> float:
    """Host µs per call to dispatch ENQUEUE_CALLS calls back to back (no sync inside the loop)."""
    return enqueue_and_wall(lambda a: fn(*a), args, ENQUEUE_CALLS)[0] * 1e6


def projection_operands(case: str, calls: int):
    """(key, w [E, d, f], `calls` token arrays [T, d]) of a bench_moe case, bf16: distinct tokens per call."""
    t, e, k, d, f = CASES[case]
    key = jax.random.PRNGKey(0)
    w = (jax.random.normal(jax.random.fold_in(key, 1), (e, d, f), jnp.bfloat16) * d ** -0.5).astype(jnp.bfloat16)
    xs = [jax.random.normal(jax.random.fold_in(key, 10 + i), (t, d), jnp.bfloat16) for i in range(calls)]
    return key, w, xs


def rolled_routings(key, case: str, routing: str, calls: int):
    """`calls` expert-id arrays of a routing, rolled so no two are equal (XLA cannot merge the calls),
    and their routing tables, built once."""
    t, e, k, _, _ = CASES[case]
    ids = expert_ids(jax.random.fold_in(key, 2), t, e, k, routing)
    idss = [jnp.roll(ids, i, axis=0) for i in range(calls)]
    return idss, [pit_jax.moe_routing(i, e) for i in idss]


def parse_case_args() -> argparse.Namespace:
    """--case (a bench_moe case, default the Qwen-like one) and --out (no files unless given)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="Qwen3-30B-A3B-like", choices=list(CASES))
    ap.add_argument("--out", default=None)
    return ap.parse_args()


def main():
    args = parse_case_args()
    meta = announce()
    t, e, k, d, f = CASES[args.case]
    key, w, xs = projection_operands(args.case, CALLS)
    routed = lambda x, w, ids: pit_jax.moe_matmul(x, w, ids)
    given = lambda x, w, ids, tables: pit_jax.moe_matmul(x, w, ids, routing=tables)
    route = jax.jit(lambda ids: pit_jax.moe_routing(ids, e))
    dense = jax.jit(lambda a, b: a @ b)
    dense_a = jax.random.normal(key, (t * k, d), jnp.bfloat16)
    trivial = jax.jit(lambda a: a + 1)  # JAX's own dispatch cost: one tiny elementwise kernel
    small = jnp.zeros((8,), jnp.float32)
    rows = []
    for routing in ROUTINGS:
        idss, tables = rolled_routings(key, args.case, routing, CALLS)
        ids = idss[0]
        one_routed = jax.jit(routed)
        many_routed = jax.jit(lambda xs, w, idss: [routed(x, w, i) for x, i in zip(xs, idss)])
        one_given = jax.jit(given)
        many_given = jax.jit(lambda xs, w, idss, tabs: [given(x, w, i, tb) for x, i, tb in zip(xs, idss, tabs)])
        r = dict(case=args.case, routing=routing,
                 routed_1=time_per_call(lambda a: one_routed(a, w, ids), xs[0], 1) * 1e3,
                 routed_n=time_per_call(lambda a: many_routed(a, w, idss), xs, CALLS) * 1e3,
                 given_1=time_per_call(lambda a: one_given(a, w, ids, tables[0]), xs[0], 1) * 1e3,
                 given_n=time_per_call(lambda a: many_given(a, w, idss, tables), xs, CALLS) * 1e3,
                 enqueue_routed_us=enqueue_us(one_routed, xs[0], w, ids),
                 enqueue_given_us=enqueue_us(one_given, xs[0], w, ids, tables[0]),
                 enqueue_routing_us=enqueue_us(route, ids),
                 enqueue_dense_us=enqueue_us(dense, dense_a, w[0]),
                 enqueue_trivial_us=enqueue_us(trivial, small))
        print(r, flush=True)
        rows.append(r)
    title = f"Dispatch-bound check, {args.case}, {meta['device']}, jax {meta['jax']}, {meta['date']}"
    md = markdown_report(
        title, f"ms per projection call: one call per jitted step vs {CALLS} independent calls per step",
        ["routing", "routing in the call, 1 / step", f"{CALLS} / step", "tables given, 1 / step", f"{CALLS} / step"],
        [[r["routing"]] + [f"{r[c]:.3f}" for c in ("routed_1", "routed_n", "given_1", "given_n")] for r in rows])
    md += "\n" + markdown_report(
        title, f"host µs per call, {ENQUEUE_CALLS} calls dispatched without a sync",
        ["routing", "projection, routing in the call", "given the tables", "routing alone", "dense same-FLOP",
         "a + 1 on 8 floats (JAX's dispatch alone)"],
        [[r["routing"]] + [f"{r[c]:.1f}" for c in ("enqueue_routed_us", "enqueue_given_us", "enqueue_routing_us",
                                                    "enqueue_dense_us", "enqueue_trivial_us")] for r in rows])
    print(md)
    if args.out:
        write_results(args.out, "dispatch_bound", rows, md, meta)

if __name__ == "__main__":
    main()
