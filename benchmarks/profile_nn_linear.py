"""Per-kernel device time of pit_jax.nn.PrunedLinear or SparseLinear (forward and training step)
against nnx.Linear, and of the bare op, from JAX's profiler (CUPTI; the same reader as
profile_layer_kernels.py). Answers: which kernels make up the layer's time (the mask, the index,
the transposes around the k-gather kernels, the backward's GEMMs)?

    python benchmarks/profile_nn_linear.py [--layer pruned|sparse] [--sparsity 0.95] [--steps 5]
        [--out DIR] [--switch NAME A B]   # the same parts compiled with a switch at A, then B

--layer pruned: PrunedLinear 4096 -> 4096 on 4096 dense rows, bare = dense_sparse(x, pruned, bias=bias).
--layer sparse: SparseLinear as OPT fc2 ([4, 1024, 16384] -> 4096) on ReLU-like inputs with random
32x1 tiles zero at the sparsity, bare = sparse_dense(x, kernel, bias=bias). The step is
bench_nn_linear's (loss ½·Σ c·y²). Prints one markdown table per part (kernels grouped by name:
calls per layer call, µs, share) and writes them to DIR/<layer>_linear_kernels.md.
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


def parts(layer, sparsity, quick=False):
    key = jax.random.PRNGKey(0)
    kw = dict(param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    if layer == "pruned":
        m, k, n = (256, 256, 256) if quick else (4096, 4096, 4096)
        xs = tile_sparse_bf16(key, m, k, (1, 1), 0.0, N_INPUTS)
        dense = nnx.Linear(k, n, **kw)
        module = pit_jax.nn.PrunedLinear(k, n, density=1.0 - sparsity, tile=(1, 32), **kw)
        fixed = jnp.where(module.mask(), module.kernel[...], 0)
        bare_jit = jax.jit(lambda kernel, bias, xs: [pit_jax.dense_sparse(x, kernel, bias=bias, tile=(1, 32)) for x in xs])
    else:
        lead, k, n = ((2, 128), 512, 256) if quick else ((4, 1024), 16384, 4096)
        xs = [x.reshape(*lead, k) for x in
              tile_sparse_bf16(key, lead[0] * lead[1], k, (32, 1), sparsity, N_INPUTS, nonnegative=True)]
        dense = nnx.Linear(k, n, **kw)
        module = pit_jax.nn.SparseLinear(k, n, **kw)
        module.kernel[...] = dense.kernel[...]
        fixed = module.kernel[...]
        bare_jit = jax.jit(lambda kernel, bias, xs: [pit_jax.sparse_dense(x, kernel, bias=bias) for x in xs])
    name = type(module).__name__
    out = []
    for label, make, mod in ((f"{name} forward", forward_fn, module), ("nnx.Linear forward", forward_fn, dense),
                             (f"{name} step", step_fn, module), ("nnx.Linear step", step_fn, dense)):
        fn, state = make(mod)
        out.append((label, (lambda fn: lambda state, xs: fn(state, xs))(fn), (state, xs)))
    bare = "dense_sparse" if layer == "pruned" else "sparse_dense"
    out.append((f"bare {bare}(bias=)", lambda kernel, xs: bare_jit(kernel, module.bias[...], xs), (fixed, xs)))
    return out


def run(layer, sparsity, steps, env_label="", quick=False):
    report = []
    for label, fn, args in parts(layer, sparsity, quick):
        events = profile(fn, args, steps)
        if not events:
            report.append(f"### {label}{env_label}: no GPU kernel events (no GPU, or no stream tracks)\n")
            continue
        # each traced call runs N_INPUTS layer calls: report per layer call
        report.append(table(f"{label}{env_label}, per layer call", events, steps * N_INPUTS))
    return report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", choices=["pruned", "sparse"], default="pruned")
    ap.add_argument("--quick", action="store_true", help="small shapes (a CPU smoke run)")
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--switch", nargs=3, metavar=("NAME", "A", "B"), default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    warnings.filterwarnings("ignore", message="pit_jax: sparse_")
    what = ("PrunedLinear 4096² at {:.0%} tile sparsity (1x32 tiles)" if a.layer == "pruned" else
            "SparseLinear [4, 1024, 16384] -> 4096 at {:.0%} tile sparsity of x (32x1 tiles)").format(a.sparsity)
    report = [f"# Kernels of {what}, {jax.devices()[0].device_kind}, jax {jax.__version__}", "",
              f"bf16; {N_INPUTS} layer calls per jitted call, {a.steps} jitted calls traced; µs per layer call", ""]
    if a.switch is None:
        report += run(a.layer, a.sparsity, a.steps, quick=a.quick)
    else:
        name, *values = a.switch
        saved = os.environ.get(name)
        for v in values:  # switches are read when lowering: each value compiles its own functions
            os.environ[name] = v
            report += run(a.layer, a.sparsity, a.steps, f" [{name}={v}]", a.quick)
        os.environ.pop(name) if saved is None else os.environ.__setitem__(name, saved)
    text = "\n".join(report)
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"{a.layer}_linear_kernels.md"), "w") as fp:
            fp.write(text)


if __name__ == "__main__":
    main()
