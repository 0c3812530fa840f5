"""pit_jax.nn.SparseLinear and PrunedLinear against flax's nnx.Linear, forward and training step.

    python benchmarks/bench_nn_linear.py [--out benchmarks/results] [--quick] [--layers sparse pruned]

SparseLinear: an FFN's second layer (OPT fc2: 4096 tokens as [4, 1024, 16384] -> 4096) on
ReLU-like inputs with random 32x1 micro-tiles zero at the given sparsity; it is compared with
nnx.Linear and with the bare `pit_jax.sparse_dense(x, kernel, bias=bias)` on the same arrays (the
module's own overhead: flattening, casts, bias). PrunedLinear: a 4096 -> 4096 layer on dense
inputs, its kernel pruned to the given density of 1x32 tiles at every call (the mask's sort
included). "step" = the loss's gradient with respect to the parameters and the input (what
backpropagation through a hidden layer needs). bf16 parameters and inputs; times per call with
4 distinct inputs per jitted step, steps launched back to back.
"""
from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

import pit_jax
import pit_jax.nn
from common import announce, bench_parser, chain_calls, markdown_report, tile_sparse_bf16, time_per_call, write_results

N_INPUTS = 4


def per_call_params(step):
    """step(states, xs) -> f(params, xs) that hands each call its own copy of the parameters, as
    separate arguments of the jit: with one shared array XLA computes work that depends only on
    the weights (PrunedLinear's mask and index) once for the step's calls (session 40's review)."""
    fn = jax.jit(step)
    return lambda params, xs: fn([params] * len(xs), xs)


def forward_fn(module):
    graphdef, state = nnx.split(module)
    return per_call_params(lambda states, xs: chain_calls(
        lambda sx: nnx.merge(graphdef, sx[0])(sx[1]), list(zip(states, xs)))), state


def step_fn(module):
    """Loss and its gradient w.r.t. the parameters and x. The loss is ½·Σ c ⊙ y² with a fixed
    random c, so dy = c ⊙ y: dense, full rank and different for every input. (Until session 37 the
    loss was linear in y, Σ c ⊙ y: its dy was the same array for every input, so XLA computed
    dx = dy·Wᵀ once for the step's 4 inputs, on both sides, and the step times undercounted dx;
    with sum(y), XLA also rewrites the dense layer's dot as a reduction.)"""
    graphdef, state = nnx.split(module)
    c = jax.random.normal(jax.random.PRNGKey(7), (module.out_features,), jnp.float32)

    def loss(state, x):
        y = nnx.merge(graphdef, state)(x).astype(jnp.float32)
        return 0.5 * jnp.sum(c * jnp.square(y))
    step = lambda state, x: jax.value_and_grad(loss, argnums=(0, 1))(state, x)
    return per_call_params(lambda states, xs: chain_calls(lambda sx: step(*sx), list(zip(states, xs)))), state


def timed(make, module, xs, steps=10, env=None):
    """ms per call; `env`: environment switches set while the step compiles (read when lowering)."""
    fn, state = make(module)
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        jax.block_until_ready(fn(state, xs))  # compile under `env`
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return time_per_call(lambda xs: fn(state, xs), xs, N_INPUTS, steps=steps) * 1e3


def rel_err(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def sparse_linear_rows(key, quick):
    lead, k, n = ((2, 128), 512, 384) if quick else ((4, 1024), 16384, 4096)
    rows = []
    kw = dict(param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    dense, sparse = nnx.Linear(k, n, **kw), pit_jax.nn.SparseLinear(k, n, **kw)
    sparse.kernel[...] = dense.kernel[...]
    dense.bias[...] = sparse.bias[...] = jax.random.normal(key, (n,), jnp.bfloat16)
    bare = per_call_params(lambda kbs, xs: chain_calls(
        lambda kbx: pit_jax.sparse_dense(kbx[1], kbx[0][0], bias=kbx[0][1]), list(zip(kbs, xs))))
    m = lead[0] * lead[1]
    for sp in (0.9, 0.95, 0.99):
        xs = [x.reshape(*lead, k) for x in tile_sparse_bf16(key, m, k, (32, 1), sp, N_INPUTS, nonnegative=True)]
        y_sparse = forward_fn(sparse)[0](nnx.split(sparse)[1], xs[:1])[0]
        y_dense = forward_fn(dense)[0](nnx.split(dense)[1], xs[:1])[0]
        t_bare = time_per_call(lambda xs: bare((sparse.kernel[...], sparse.bias[...]), xs), xs, N_INPUTS) * 1e3
        row = dict(layer="SparseLinear", shape=f"[{lead[0]}, {lead[1]}, {k}] -> {n}", sparsity=sp,
                   t_nnx_ms=timed(forward_fn, dense, xs), t_pit_ms=timed(forward_fn, sparse, xs), t_bare_ms=t_bare,
                   t_nnx_step_ms=timed(step_fn, dense, xs, steps=5), t_pit_step_ms=timed(step_fn, sparse, xs, steps=5),
                   t_pit_step_dw_device_ms=timed(step_fn, sparse, xs, steps=5, env={"PIT_KGATHER_DW": "device"}),
                   rel_err=rel_err(y_sparse, y_dense))
        rows.append(row)
        print(row, flush=True)
    return rows


def pruned_linear_rows(key, quick):
    m, k, n = (256, 512, 384) if quick else (4096, 4096, 4096)
    xs = tile_sparse_bf16(key, m, k, (1, 1), 0.0, N_INPUTS)
    kw = dict(param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    dense = nnx.Linear(k, n, **kw)
    bare = per_call_params(lambda kbs, xs: chain_calls(
        lambda kbx: pit_jax.dense_sparse(kbx[1], kbx[0][0], bias=kbx[0][1], tile=(1, 32)), list(zip(kbs, xs))))
    rows = []
    for density in (0.5, 0.1, 0.05):
        pruned = pit_jax.nn.PrunedLinear(k, n, density=density, tile=(1, 32), **kw)
        want = xs[0] @ jnp.where(pruned.mask(), pruned.kernel[...], 0) + pruned.bias[...]
        got = forward_fn(pruned)[0](nnx.split(pruned)[1], xs[:1])[0]
        fixed = jnp.where(pruned.mask(), pruned.kernel[...], 0)
        t_bare = time_per_call(lambda xs: bare((fixed, pruned.bias[...]), xs), xs, N_INPUTS) * 1e3
        row = dict(layer="PrunedLinear", shape=f"[{m}, {k}] -> {n}", sparsity=1.0 - density,
                   t_nnx_ms=timed(forward_fn, dense, xs), t_pit_ms=timed(forward_fn, pruned, xs),
                   t_bare_ms=t_bare, t_nnx_step_ms=timed(step_fn, dense, xs, steps=5),
                   t_pit_step_ms=timed(step_fn, pruned, xs, steps=5), t_pit_step_dw_device_ms=float("nan"),
                   rel_err=rel_err(got, want))
        rows.append(row)
        print(row, flush=True)
    return rows


def main():
    ap = bench_parser("small shapes")
    ap.add_argument("--layers", nargs="+", default=["sparse", "pruned"], choices=["sparse", "pruned"])
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="pit_jax: sparse_")
    meta = announce()
    key = jax.random.PRNGKey(0)
    rows = (sparse_linear_rows(key, args.quick) if "sparse" in args.layers else []) + \
        (pruned_linear_rows(key, args.quick) if "pruned" in args.layers else [])
    md = markdown_report(
        f"pit_jax.nn linear layers vs nnx.Linear — {meta['device']}, jax {meta['jax']}, {meta['date']}",
        "bf16; SparseLinear: x ReLU-like with random 32x1 tiles zero at the given sparsity, bare = "
        "`sparse_dense(x, kernel, bias=bias)` without the module; PrunedLinear: dense x, kernel pruned to "
        "(1 - sparsity) of its 1x32 tiles by magnitude inside every call, bare = `dense_sparse(x, pruned, bias=bias)` "
        "with the pruned kernel made once (no mask in the call); step = forward, loss ½·Σ c·y² (c a fixed "
        "random row, so dy = c·y is dense and differs per input) and its gradient w.r.t. the parameters and x; dW device = the same step "
        "compiled with PIT_KGATHER_DW=device (SparseLinear's dW by the products path or the gated dense GEMM); rel err = relative L2 error of the forward against nnx.Linear (SparseLinear) or "
        "x @ (pruned kernel) in XLA (PrunedLinear)",
        ["layer", "shape", "sparsity", "nnx.Linear ms", "pit ms", "speedup", "bare op ms",
         "nnx.Linear step ms", "pit step ms", "step speedup", "pit step, dW device ms", "its speedup", "rel err"],
        [[r["layer"], r["shape"], f"{r['sparsity']:.2f}", f"{r['t_nnx_ms']:.3f}", f"{r['t_pit_ms']:.3f}",
          f"{r['t_nnx_ms'] / r['t_pit_ms']:.2f}×", f"{r['t_bare_ms']:.3f}", f"{r['t_nnx_step_ms']:.3f}",
          f"{r['t_pit_step_ms']:.3f}", f"{r['t_nnx_step_ms'] / r['t_pit_step_ms']:.2f}×",
          f"{r['t_pit_step_dw_device_ms']:.3f}", f"{r['t_nnx_step_ms'] / r['t_pit_step_dw_device_ms']:.2f}×",
          f"{r['rel_err']:.1e}"]
         for r in rows])
    print(md)
    write_results(args.out, "nn_linear", rows, md, meta)


if __name__ == "__main__":
    main()
