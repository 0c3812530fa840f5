"""The MoE forward projection (tokens gathered, rows in routing order) once with the tiled and
once with the persistent Hopper kernel, for Nsight Compute (issue 4: why the persistent kernel
is not faster):

    ncu --kernel-name regex:pit_moe_forward --section SpeedOfLight \
        --section MemoryWorkloadAnalysis python benchmarks/profile_moe_persistent.py

Cases: Mixtral T=4096 with one-hot routing (compute-bound, balanced tiles) and Qwen3-30B-A3B-like
with uniform routing (memory-bound, many partial tiles). Each case launches the tiled kernel
(PIT_MOE_PERSISTENT=0), then the persistent one; it prints which is which, ncu times them.
"""
from __future__ import annotations

import os

import jax

import pit_jax
from pit_jax.moe import grouped_matmul
from bench_moe import CASES, expert_ids, layer_operands


def main():
    key = jax.random.PRNGKey(0)
    for case, routing_name in (("Mixtral up T=4096", "one-hot"), ("Qwen3-30B-A3B-like", "uniform")):
        t, e, k, d, f = CASES[case]
        ops = layer_operands(key, t, e, k, d, f)
        x, w = ops["x"], ops["w_in"]
        routing = pit_jax.moe_routing(expert_ids(jax.random.fold_in(key, 5), t, e, k, routing_name), e)
        fn = jax.jit(lambda x, w: grouped_matmul(x, w, routing, rows_per_source=k, x_sorted=False, out_sorted=True))
        for persistent in ("0", "1"):
            os.environ["PIT_MOE_PERSISTENT"] = persistent
            print(f"{case}, {routing_name}, PIT_MOE_PERSISTENT={persistent}", flush=True)
            jax.block_until_ready(fn(x, w))


if __name__ == "__main__":
    main()
