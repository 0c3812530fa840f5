"""Are bench_moe's Qwen-like projection timings bound by the host's dispatch? Each of its calls is
one jitted dispatch (time_per_call with one call per step); a call of ~0.1 ms of GPU work may
take the host as long to launch. Here the same projection (routing built in the call, or the
routing tables given) is timed with 1 and with CALLS independent calls per jitted step (distinct
tokens, ids rolled so no two routings are equal and XLA cannot merge them): if the per-call time
drops with more calls per step, the one-call number timed the host.

    python benchmarks/probe_dispatch_bound.py [--case "Qwen3-30B-A3B-like"] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

import pit_jax
from bench_moe import CASES, ROUTINGS, expert_ids
from common import announce, time_per_call

CALLS = 4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="Qwen3-30B-A3B-like", choices=list(CASES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    meta = announce()
    t, e, k, d, f = CASES[args.case]
    key = jax.random.PRNGKey(0)
    w = (jax.random.normal(jax.random.fold_in(key, 1), (e, d, f), jnp.bfloat16) * d ** -0.5).astype(jnp.bfloat16)
    xs = [jax.random.normal(jax.random.fold_in(key, 10 + i), (t, d), jnp.bfloat16) for i in range(CALLS)]
    routed = lambda x, w, ids: pit_jax.moe_matmul(x, w, ids)
    given = lambda x, w, ids, tables: pit_jax.moe_matmul(x, w, ids, routing=tables)
    rows = []
    for routing in ROUTINGS:
        ids = expert_ids(jax.random.fold_in(key, 2), t, e, k, routing)
        idss = [jnp.roll(ids, i, axis=0) for i in range(CALLS)]
        tables = [pit_jax.moe_routing(i, e) for i in idss]
        one_routed = jax.jit(routed)
        many_routed = jax.jit(lambda xs, w, idss: [routed(x, w, i) for x, i in zip(xs, idss)])
        one_given = jax.jit(given)
        many_given = jax.jit(lambda xs, w, idss, tabs: [given(x, w, i, tb) for x, i, tb in zip(xs, idss, tabs)])
        r = dict(case=args.case, routing=routing,
                 routed_1=time_per_call(lambda a: one_routed(a, w, ids), xs[0], 1) * 1e3,
                 routed_n=time_per_call(lambda a: many_routed(a, w, idss), xs, CALLS) * 1e3,
                 given_1=time_per_call(lambda a: one_given(a, w, ids, tables[0]), xs[0], 1) * 1e3,
                 given_n=time_per_call(lambda a: many_given(a, w, idss, tables), xs, CALLS) * 1e3)
        print(r, flush=True)
        rows.append(r)
    lines = [f"# Dispatch-bound check, {args.case}, {meta['device']}, jax {meta['jax']}, {meta['date']}", "",
             f"ms per projection call: one call per jitted step vs {CALLS} independent calls per step", "",
             f"| routing | routing in the call, 1 / step | {CALLS} / step | tables given, 1 / step | {CALLS} / step |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['routing']} | {r['routed_1']:.3f} | {r['routed_n']:.3f} | {r['given_1']:.3f} | {r['given_n']:.3f} |"
              for r in rows]
    md = "\n".join(lines)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "dispatch_bound.md"), "w") as fh:
            fh.write(md + "\n")
        with open(os.path.join(args.out, "dispatch_bound.json"), "w") as fh:
            json.dump(dict(meta=meta, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
