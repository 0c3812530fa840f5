"""pit_jax's routing index built a few times on one shape, for Nsight Compute (per-kernel device
times of count, scan and scatter):

    ncu --kernel-name regex:pit_moe_route --metrics gpu__time_duration.sum \
        python benchmarks/profile_moe_route.py --shape 2048 128 8 --routing uniform

Prints nothing of its own timing.
"""
from __future__ import annotations

import argparse

import jax

import pit_jax
from bench_moe import expert_ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=3, default=(2048, 128, 8), metavar=("T", "E", "k"))
    ap.add_argument("--routing", default="uniform", choices=("uniform", "zipf", "one-hot"))
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args()
    t, e, k = args.shape
    ids = expert_ids(jax.random.PRNGKey(0), t, e, k, args.routing)
    build = jax.jit(lambda ids: pit_jax.moe_routing(ids, e))
    for _ in range(args.calls):
        jax.block_until_ready(build(ids))


if __name__ == "__main__":
    main()
