"""One forward (detection included) and one dW of sparse_dense per sparsity, for Nsight Compute:

    ncu --kernel-name regex:pit_ --metrics gpu__time_duration.sum python benchmarks/profile_kgather.py

Prints nothing of its own timing; the per-kernel device times come from ncu.
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp

import pit_jax
from common import tile_sparse_bf16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=3, default=(4096, 4096, 4096), metavar=("M", "K", "N"))
    ap.add_argument("--sparsity", type=float, nargs="+", default=(0.0, 0.9))
    ap.add_argument("--forward-only", action="store_true", help="no dW call")
    args = ap.parse_args()
    m, k, n = args.shape
    tile = (32, 1)
    w = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.bfloat16)
    fwd = jax.jit(lambda x, w: pit_jax.sparse_dense(x, w, tile=tile))
    dw = jax.jit(jax.grad(lambda w, x: jnp.sum(pit_jax.sparse_dense(x, w, tile=tile).astype(jnp.float32))))
    for sp in args.sparsity:
        x, = tile_sparse_bf16(jax.random.PRNGKey(0), m, k, tile, sp, 1, nonnegative=True)
        jax.block_until_ready(fwd(x, w) if args.forward_only else (fwd(x, w), dw(w, x)))
        print(f"sparsity {sp}: forward{'' if args.forward_only else ' then dW'}", flush=True)
    # ncu over this process segfaulted at JAX's teardown (H200, 2026-11-27) and lost its report;
    # leaving without the teardown keeps it
    os._exit(0)


if __name__ == "__main__":
    main()
