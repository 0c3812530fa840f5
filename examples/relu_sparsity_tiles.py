"""How much work PIT's micro-tiles can skip in a ReLU MLP, measured on device with pit_jax.detect.

A small two-layer ReLU MLP is trained for a few hundred steps on a synthetic teacher task; then
the hidden activations h = relu(x W1) of a batch are handed to `pit_jax.detect` with several
micro-tile shapes. For the second layer y = h W2 (a k-gather), a zero micro-tile of h is a
block of multiply-adds that never needs doing. Thin micro-tiles (32x1) find far more of them
than GPU-sized dense tiles (128x128): that gap is what PIT turns into speed.

    python examples/relu_sparsity_tiles.py [--steps 300] [--plot tiles.png]
Runs on whatever device JAX picks (GPU if present, else CPU).
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

import pit_jax

TILES = [(128, 128), (64, 64), (32, 32), (32, 8), (32, 1), (1, 1)]


def progress(i, n, msg):
    w = 30
    done = int(w * (i + 1) / n)
    sys.stdout.write(f"\r[{'#' * done}{'.' * (w - done)}] {i + 1}/{n} {msg}")
    sys.stdout.flush()
    if i + 1 == n:
        sys.stdout.write("\n")


def init(key, d_in, d_hidden, d_out):
    k1, k2, k3 = jax.random.split(key, 3)
    # Negative biases of varied size make neurons fire at very different rates, as in trained
    # ReLU FFNs (OPT): many rarely fire, which is what column-thin micro-tiles exploit.
    return {"w1": jax.random.normal(k1, (d_in, d_hidden)) / d_in**0.5,
            "b1": -2.5 * jnp.abs(jax.random.normal(k3, (d_hidden,))),
            "w2": jax.random.normal(k2, (d_hidden, d_out)) / d_hidden**0.5}


def hidden(p, x):
    return jax.nn.relu(x @ p["w1"] + p["b1"])


def loss_fn(p, x, y):
    return jnp.mean((hidden(p, x) @ p["w2"] - y) ** 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--plot", default=None, help="write a bar chart PNG here (needs matplotlib)")
    args = ap.parse_args()
    d_in, d_hidden, d_out = 256, 1024, 64
    key = jax.random.PRNGKey(0)
    teacher = jax.random.normal(jax.random.fold_in(key, 1), (d_in, d_out)) / d_in**0.5
    params = init(key, d_in, d_hidden, d_out)

    @jax.jit
    def step(p, k):
        x = jax.random.normal(k, (args.batch, d_in))
        y = jnp.tanh(x @ teacher)
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        return jax.tree.map(lambda a, b: a - 0.05 * b, p, g), loss

    print(f"device: {jax.devices()[0].device_kind}; pit_jax build: {pit_jax.build_info()}")
    for i in range(args.steps):
        params, loss = step(params, jax.random.fold_in(key, 100 + i))
        if i % 10 == 9 or i + 1 == args.steps:
            progress(i, args.steps, f"loss {float(loss):.4f}")

    x = jax.random.normal(jax.random.fold_in(key, 7), (args.batch, d_in))
    h = hidden(params, x).astype(jnp.bfloat16)
    elem_density = float(jnp.mean(h != 0))
    print(f"\nhidden activations {h.shape}, element density {elem_density:.3f}")
    print(f"{'micro-tile':>12} {'nonzero tiles':>14} {'work kept':>10} {'detect ms':>10}")
    results = []
    for tile in TILES:
        detect = jax.jit(lambda h, tile=tile: pit_jax.detect(h, tile))
        idx = jax.block_until_ready(detect(h))
        t0 = time.perf_counter()
        for _ in range(20):
            idx = detect(h)
        jax.block_until_ready(idx)
        ms = (time.perf_counter() - t0) / 20 * 1e3
        nb_m, nb_k = idx.grid
        kept = float(idx.density)
        results.append((tile, kept))
        print(f"{tile[0]:>5}x{tile[1]:<6} {int(idx.nnz):>8}/{nb_m * nb_k:<6} {kept:>9.1%} {ms:>10.3f}")
    print("'work kept' = fraction of h @ W2's multiply-adds a PIT k-gather kernel must do.")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar([f"{t[0]}x{t[1]}" for t, _ in results], [k for _, k in results])
        ax.axhline(elem_density, color="k", ls="--", label="element density")
        ax.set_ylabel("work kept"); ax.set_xlabel("micro-tile"); ax.legend()
        fig.tight_layout(); fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
