"""Per-kernel device time of pit_jax.nn.PrunedLinear (forward and training step) against
nnx.Linear, and of the bare `dense_sparse(x, pruned) + bias`, from JAX's profiler (CUPTI; the
same reader as profile_layer_kernels.py). Answers: which kernels make up the layer's time, and
how much of it is the mask, the index and the transposes around the k-gather kernels?

    python benchmarks/profile_pruned_linear.py [--sparsity 0.95] [--steps 5] [--out DIR]
        [--switch NAME A B]   # the same parts compiled with an environment switch at A, then B

Prints one markdown table per part (kernels grouped by name: calls per call of the layer, µs,
share) and writes them to DIR/pruned_linear_kernels.md.
"""
from __future__ import annotations

import argparse
import os
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

import pit_jax
import pit_jax.nn
from bench_nn_linear import N_INPUTS, forward_fn, step_fn
from common import tile_sparse_bf16
from profile_layer_kernels import profile, table


def parts(sparsity, m=4096, k=4096, n=4096):
    key = jax.random.PRNGKey(0)
    xs = tile_sparse_bf16(key, m, k, (1, 1), 0.0, N_INPUTS)
    kw = dict(param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    dense = nnx.Linear(k, n, **kw)
    pruned = pit_jax.nn.PrunedLinear(k, n, density=1.0 - sparsity, tile=(1, 32), **kw)
    fixed = jnp.where(pruned.mask(), pruned.kernel[...], 0)
    bare = jax.jit(lambda kernel, bias, xs: [pit_jax.dense_sparse(x, kernel, tile=(1, 32)) + bias for x in xs])
    out = []
    for label, make, module in (("PrunedLinear forward", forward_fn, pruned), ("nnx.Linear forward", forward_fn, dense),
                                ("PrunedLinear step", step_fn, pruned), ("nnx.Linear step", step_fn, dense)):
        fn, state = make(module)
        out.append((label, (lambda fn: lambda state, xs: fn(state, xs))(fn), (state, xs)))
    out.append(("bare dense_sparse + bias", lambda kernel, xs: bare(kernel, pruned.bias[...], xs), (fixed, xs)))
    return out


def run(sparsity, steps, env_label=""):
    report = []
    for label, fn, args in parts(sparsity):
        events = profile(fn, args, steps)
        if not events:
            report.append(f"### {label}{env_label}: no GPU kernel events (no GPU, or no stream tracks)\n")
            continue
        # each traced call runs N_INPUTS layer calls: report per layer call
        report.append(table(f"{label}{env_label}, per layer call", events, steps * N_INPUTS))
    return report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--switch", nargs=3, metavar=("NAME", "A", "B"), default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    warnings.filterwarnings("ignore", message="pit_jax: sparse_")
    report = [f"# Kernels of PrunedLinear 4096² at {a.sparsity:.0%} tile sparsity (1x32 tiles), "
              f"{jax.devices()[0].device_kind}, jax {jax.__version__}", "",
              f"bf16; {N_INPUTS} layer calls per jitted call, {a.steps} jitted calls traced; µs per layer call", ""]
    if a.switch is None:
        report += run(a.sparsity, a.steps)
    else:
        name, *values = a.switch
        saved = os.environ.get(name)
        for v in values:  # switches are read when lowering: each value compiles its own functions
            os.environ[name] = v
            report += run(a.sparsity, a.steps, f" [{name}={v}]")
        os.environ.pop(name) if saved is None else os.environ.__setitem__(name, saved)
    text = "\n".join(report)
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "pruned_linear_kernels.md"), "w") as fp:
            fp.write(text)


if __name__ == "__main__":
    main()
