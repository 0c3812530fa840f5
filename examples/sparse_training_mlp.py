"""Sparse training with dynamically pruned weights: an MLP on the handwritten digits dataset that
ships inside scikit-learn (8x8 images, 10 classes; no download), trained with optax, once dense
and once with the two hidden layers' weights magnitude-pruned by micro-tile
(`pit_jax.prune_tiles_by_magnitude`), the mask recomputed every step and applied through
`pit_jax.dense_sparse` (micro-tiles of 1 row x 8 columns; pruned weights
get zero gradient).

    pip install scikit-learn optax && python examples/sparse_training_mlp.py [--steps 600]

On a GPU the sparse path runs pit_jax's k-gather kernels (on the CPU, its jnp reference). The
layers here are tiny (64-256 wide), far below the sizes where skipping tiles pays, so the step
times show the overhead of detection and the extra launches, not PIT's speedup; see
benchmarks/bench_sparse_dense.py for that.
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pit_jax

TILE = (1, 8)  # 1 input feature x 8 output units


def progress(i, n, msg):
    done = int(30 * (i + 1) / n)
    sys.stdout.write(f"\r  [{'#' * done}{'.' * (30 - done)}] {i + 1}/{n} {msg}")
    sys.stdout.flush()
    if i + 1 == n:
        sys.stdout.write("\n")


def load_digits():
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        sys.exit('this example trains on scikit-learn\'s bundled digits: pip install ".[examples]" '
                 "(or scikit-learn)")
    d = sk_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    n_test = len(x) // 5
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def init(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (a, b)) * (2.0 / a) ** 0.5, "b": jnp.zeros(b)}
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def forward(params, x, density):
    h = x
    for i, layer in enumerate(params):
        if density is None or i + 1 == len(params):  # the small classifier layer stays dense
            h = h @ layer["w"] + layer["b"]
        else:  # the mask is recomputed from the current weights at every step, on device
            w = pit_jax.prune_tiles_by_magnitude(layer["w"], TILE, density)
            h = pit_jax.dense_sparse(h, w, bias=layer["b"], tile=TILE, grad="masked")
        if i + 1 < len(params):
            h = jax.nn.relu(h)
    return h


def train(name, density, data, steps, batch, seed=0):
    (xtr, ytr), (xte, yte) = data
    params = init(jax.random.PRNGKey(seed), [64, 256, 256, 10])
    opt = optax.adam(1e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, xb, yb):
        def loss_fn(p):
            logits = forward(p, xb, density)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(seed)
    print(f"{name}:")
    times = []
    for i in range(steps):
        idx = rng.integers(0, len(xtr), batch)
        t0 = time.perf_counter()
        params, state, loss = step(params, state, xtr[idx], ytr[idx])
        loss.block_until_ready()
        if i >= 5:
            times.append(time.perf_counter() - t0)
        if i % 20 == 19 or i + 1 == steps:
            progress(i, steps, f"loss {float(loss):.3f}")
    acc = float(jnp.mean(jnp.argmax(forward(params, xte, density), -1) == yte))
    return acc, float(np.median(times)) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--density", type=float, default=0.2, help="fraction of micro-tiles kept")
    args = ap.parse_args()
    data = load_digits()
    print(f"digits: {len(data[0][0])} train / {len(data[1][0])} test; device "
          f"{jax.devices()[0].device_kind}; pit_jax {pit_jax.build_info()}")
    dense = train("dense", None, data, args.steps, args.batch)
    sparse = train(f"pruned to {args.density:.0%} of {TILE[0]}x{TILE[1]} micro-tiles", args.density,
                   data, args.steps, args.batch)
    print(f"\n{'model':<38}{'test accuracy':>14}{'step ms':>10}")
    print(f"{'dense':<38}{dense[0]:>14.3f}{dense[1]:>10.2f}")
    print(f"{'dense_sparse, density ' + str(args.density):<38}{sparse[0]:>14.3f}{sparse[1]:>10.2f}")


if __name__ == "__main__":
    main()
