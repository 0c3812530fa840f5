"""One launch each of the dense matmul of the Mixtral projection's FLOPs (XLA's cuBLAS kernel)
and pit's Hopper forward on the same problem, for Nsight Compute (issue 4: where the forward's
1.2-1.35x over dense goes):

    ncu --kernel-name regex:"pit_moe_forward|nvjet|gemm|xmma|cutlass" --section SpeedOfLight \
        --section LaunchStats ... python benchmarks/profile_moe_vs_dense.py

Mixtral up-projection, T=4096, top-2 (8192 rows, 4096 -> 14336), bf16: the dense [8192, 4096] @
[4096, 14336]; pit with one-hot routing (every row on experts 0 and 1: full 128-row tiles) with
x gathered by the producer (SRead) and with x's rows already in routing order (TMA for both
operands). Each is one jitted call; XLA's autotuner also launches several cuBLAS candidates for the
dense matmul while compiling it (they appear in the profile too, with their tile shapes in their
names). Session 14 also profiled CTA pairs sharing the weight tile here (a rejected variant:
benchmarks/results/2026-11-27_session14/).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

import pit_jax
from pit_jax.moe import grouped_matmul
from bench_moe import CASES, expert_ids, layer_operands


def main():
    key = jax.random.PRNGKey(0)
    t, e, k, d, f = CASES["Mixtral up T=4096"]
    ops = layer_operands(key, t, e, k, d, f)
    x, w = ops["x"], ops["w_in"]
    routing = pit_jax.moe_routing(expert_ids(jax.random.fold_in(key, 5), t, e, k, "one-hot"), e)
    rows = jnp.repeat(x, k, axis=0)[routing.order]  # x's rows in routing order
    dense = jax.jit(lambda a, b: a @ b)
    gathered = jax.jit(lambda x, w: grouped_matmul(x, w, routing, rows_per_source=k, x_sorted=False, out_sorted=True))
    sorted_rows = jax.jit(lambda r, w: grouped_matmul(r, w, routing, rows_per_source=1, x_sorted=True, out_sorted=True))
    runs = [("dense a @ b", dense, (rows, w[0])), ("pit x gathered", gathered, (x, w)),
            ("pit x in routing order", sorted_rows, (rows, w))]
    for name, fn, args in runs:
        print(f"== {name}", flush=True)
        jax.block_until_ready(fn(*args))


if __name__ == "__main__":
    main()
