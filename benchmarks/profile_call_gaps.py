"""Is the GPU idle inside back-to-back MoE projection calls? For the Mixtral T=4096 projection
(routing given, output in routing order: the staged path on Hopper by default) and the dense
matmul of its FLOPs: wall time per call as bench_moe_persistent.py times it (10 calls launched
back to back, one sync), against the kernels' busy time and the idle gaps between kernels in a
JAX profiler trace of the same 10 calls.

    python benchmarks/profile_call_gaps.py [--case "Mixtral up T=4096"] [--out DIR]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp

import pit_jax
from pit_jax.moe import grouped_matmul
from bench_moe import CASES, expert_ids, layer_operands
from common import print_and_save
from profile_layer_kernels import kernel_events, short

CALLS = 10


def measure(label, fn, args):
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(CALLS):
        out = fn(*args)
    jax.block_until_ready(out)
    wall = (time.perf_counter() - t0) / CALLS * 1e6
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(CALLS):
                out = fn(*args)
            jax.block_until_ready(out)
        ks = kernel_events(d, with_start=True)
    if not ks:
        return f"| {label} | {wall:.0f} | no kernel events | | | |"
    busy = sum(dur for _, _, dur in ks) / CALLS
    span = (ks[-1][1] + ks[-1][2] - ks[0][1]) / CALLS
    gaps = sorted(((ks[i + 1][1] - (ks[i][1] + ks[i][2]), short(ks[i][0]), short(ks[i + 1][0]))
                   for i in range(len(ks) - 1)), reverse=True)[:3]
    top = "; ".join(f"{g:.0f} µs {a} → {b}" for g, a, b in gaps)
    return (f"| {label} | {wall:.0f} | {span:.0f} | {busy:.0f} | {len(ks) / CALLS:g} | {top} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="Mixtral up T=4096", choices=sorted(CASES))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    t, e, k, d, f = CASES[a.case]
    key = jax.random.PRNGKey(0)
    ops = layer_operands(key, t, e, k, d, f)
    x, w = ops["x"], ops["w_in"]
    dense_a = jax.random.normal(jax.random.fold_in(key, 8), (t * k, d), jnp.bfloat16)
    rows = [f"# Idle time inside back-to-back calls, {a.case}, {jax.devices()[0].device_kind}, jax {jax.__version__}", "",
            f"wall = µs per call, {CALLS} calls back to back and one sync; span = first kernel start to last kernel "
            "end / calls (trace); busy = kernel time per call; top gaps between consecutive kernels", "",
            "| call | wall µs | span µs | busy µs | kernels / call | largest gaps |", "|---|---|---|---|---|---|"]
    rows.append(measure("dense jnp.dot", jax.jit(lambda p, q: p @ q), (dense_a, w[0])))
    for routing_name in ("uniform", "one-hot"):
        ids = expert_ids(jax.random.fold_in(key, 5), t, e, k, routing_name)
        routing = pit_jax.moe_routing(ids, e)
        for out_sorted in (True, False):
            fn = jax.jit(lambda x, w, r, s=out_sorted: grouped_matmul(x, w, r, rows_per_source=k, x_sorted=False,
                                                                     out_sorted=s))
            rows.append(measure(f"projection {routing_name}, out_sorted={out_sorted}", fn, (x, w, routing)))
    print_and_save("\n".join(rows), a.out, "call_gaps.md")


if __name__ == "__main__":
    main()
