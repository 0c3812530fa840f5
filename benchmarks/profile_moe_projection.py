"""pit's gathered forward projection of one bench_moe case with the routing tables given, for
Nsight Compute (issue 4: how many bytes the memory-bound Qwen-like forward takes from DRAM
against the 403 MB of expert weights it must read — do an expert's second row tile's CTAs find
its weights in L2?):

    ncu --kernel-name regex:pit_moe_forward --metrics dram__bytes_read.sum,gpu__time_duration.sum \
        python benchmarks/profile_moe_projection.py --case Qwen3-30B-A3B-like --routing uniform

Prints the case's row tiles (as the routing builds them) and its bytes of expert weights; the
kernel's numbers come from ncu.
"""
from __future__ import annotations

import argparse

import jax
import numpy as np

import pit_jax
from pit_jax.moe import grouped_matmul
from bench_moe import CASES, expert_ids, layer_operands


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="Qwen3-30B-A3B-like", choices=list(CASES))
    ap.add_argument("--routing", default="uniform", choices=("uniform", "zipf", "one-hot"))
    ap.add_argument("--calls", type=int, default=2)
    args = ap.parse_args()
    t, e, k, d, f = CASES[args.case]
    key = jax.random.PRNGKey(0)
    ops = layer_operands(key, t, e, k, d, f)
    x, w = ops["x"], ops["w_in"]
    routing = pit_jax.moe_routing(expert_ids(jax.random.fold_in(key, 5), t, e, k, args.routing), e)
    sizes = np.asarray(routing.group_sizes())
    tiles = int(np.sum(-(-sizes // 128)))
    used = int(np.sum(sizes > 0))
    print(f"{args.case} {args.routing}: {tiles} row tiles of 128 over {used} experts, "
          f"expert weights {used * d * f * 2 / 1e6:.0f} MB, x {t * d * 2 / 1e6:.0f} MB, "
          f"out {t * k * f * 2 / 1e6:.0f} MB", flush=True)
    fn = jax.jit(lambda x, w, r: grouped_matmul(x, w, r, rows_per_source=k, x_sorted=False, out_sorted=True))
    for _ in range(args.calls):
        jax.block_until_ready(fn(x, w, routing))


if __name__ == "__main__":
    main()
