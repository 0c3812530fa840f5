"""One dW call (PIT_KGATHER_DW=--mode, default sparse: the dW kernels) on bf16 x with random 32x1
tiles, index given (or, --index own, detected from x in the call), for Nsight Compute:
`ncu --kernel-name regex:tn python3 profile_kgather_dw.py`.

    python benchmarks/profile_kgather_dw.py --shape 4096 4096 4096 --sparsity 0.99 [--mode device --index own]
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp

import pit_jax
from bench_kgather_dw import TILE, dw_sparse
from common import tile_sparse_bf16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=3, default=[4096, 4096, 4096], metavar=("M", "K", "N"))
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.99])
    ap.add_argument("--mode", default="sparse", help="PIT_KGATHER_DW while lowering")
    ap.add_argument("--index", choices=["given", "own"], default="given")
    args = ap.parse_args()
    m, k, n = args.shape
    key = jax.random.PRNGKey(0)
    w = jax.random.normal(jax.random.fold_in(key, 99), (k, n), jnp.bfloat16)
    dy = jax.random.normal(jax.random.fold_in(key, 200), (m, n), jnp.bfloat16)
    os.environ["PIT_KGATHER_DW"] = args.mode
    f = jax.jit(lambda x, idx, dy: dw_sparse(x, idx, w, dy))
    for sp in args.sparsity:
        x = tile_sparse_bf16(key, m, k, TILE, sp, 1, nonnegative=True)[0]
        idx = pit_jax.detect(x, TILE) if args.index == "given" else None
        jax.block_until_ready(f(x, idx, dy))
        print(f"sparsity {sp}: one dW call", flush=True)


if __name__ == "__main__":
    main()
