"""One SwiGLU MoE layer forward + backward through pit_jax (uniform routing), for Nsight Compute:

    ncu --kernel-name regex:pit_ --metrics gpu__time_duration.sum python benchmarks/profile_moe.py

Prints nothing of its own timing; the per-kernel device times (routing, forward and dx grouped
GEMMs, dW) come from ncu.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from pit_jax.nn.moe import moe_ffn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=5, default=(4096, 8, 2, 4096, 14336), metavar=("T", "E", "k", "d", "f"))
    t, e, k, d, f = ap.parse_args().shape
    key = jax.random.PRNGKey(0)
    normal = lambda i, s, scale: (jax.random.normal(jax.random.fold_in(key, i), s, jnp.bfloat16) * scale).astype(jnp.bfloat16)
    x = normal(0, (t, d), 1.0)
    ws = normal(1, (e, d, f), d ** -0.5), normal(2, (e, d, f), d ** -0.5), normal(3, (e, f, d), f ** -0.5)
    ids = jax.lax.top_k(jax.random.normal(jax.random.fold_in(key, 4), (t, e)), k)[1].astype(jnp.int32)
    cw = jnp.full((t, k), 1.0 / k, jnp.float32)
    loss = lambda x, cw, ws: jnp.mean(jnp.square(moe_ffn(x, ids, cw, ws, "swiglu").astype(jnp.float32)))
    step = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
    jax.block_until_ready(step(x, cw, ws))


if __name__ == "__main__":
    main()
