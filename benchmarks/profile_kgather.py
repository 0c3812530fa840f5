"""One forward (detection included) and one dW of sparse_dense per sparsity, for Nsight Compute:

    ncu --kernel-name regex:pit_ --metrics gpu__time_duration.sum python benchmarks/profile_kgather.py

Prints nothing of its own timing; the per-kernel device times come from ncu.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import pit_jax
from common import tile_sparse_bf16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=3, default=(4096, 4096, 4096), metavar=("M", "K", "N"))
    ap.add_argument("--sparsity", type=float, nargs="+", default=(0.0, 0.9))
    args = ap.parse_args()
    m, k, n = args.shape
    tile = (32, 1)
    w = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.bfloat16)
    fwd = jax.jit(lambda x, w: pit_jax.sparse_dense(x, w, tile=tile))
    dw = jax.jit(jax.grad(lambda w, x: jnp.sum(pit_jax.sparse_dense(x, w, tile=tile).astype(jnp.float32))))
    for sp in args.sparsity:
        x, = tile_sparse_bf16(jax.random.PRNGKey(0), m, k, tile, sp, 1, nonnegative=True)
        jax.block_until_ready((fwd(x, w), dw(w, x)))
        print(f"sparsity {sp}: forward then dW", flush=True)


if __name__ == "__main__":
    main()
