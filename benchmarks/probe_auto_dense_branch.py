"""Where tile="auto"'s dense-branch overhead comes from (probe, one process, alternating).

    python benchmarks/probe_auto_dense_branch.py

Times per call for OPT fc2 (4096x16384 -> 4096) and 4096^3, bf16, 0% sparsity: x @ w; the
fp32-output matmul rounded to bf16 (kgather._dense_matmul); each inside a lax.cond whose
predicate is computed on device; the sampled density estimate alone; the auto path. Each step's
calls are chained (common.chain_calls), so XLA merges no dots.
"""
import statistics
import sys

import jax
import jax.numpy as jnp

import pit_jax
from pit_jax import kgather
from common import chain_calls, time_per_call

n = 4
# argv "small": a CPU smoke run
SHAPES = [("small", 256, 512, 384)] if sys.argv[1:] == ["small"] else [("OPT fc2", 4096, 16384, 4096), ("4096^3", 4096, 4096, 4096)]
for name, m, k, nn in SHAPES:
    key = jax.random.PRNGKey(0)
    xs = [jax.nn.relu(jax.random.normal(jax.random.fold_in(key, i), (m, k), jnp.bfloat16)) + 0.01 for i in range(n)]
    w = jax.random.normal(key, (k, nn), jnp.bfloat16)
    plain = lambda x, w: x @ w
    f32out = lambda x, w: kgather._dense_matmul(x, w, x.dtype)  # auto's dense branch before session 8
    # the sampled estimate against an unreachable threshold: its cost, and the dense branch taken
    pred = lambda x: kgather.auto_sampled_density(x) < 0.0
    fns = {
        "x @ w": jax.jit(lambda xs, w: chain_calls(lambda x: plain(x, w), xs)),
        "fp32-out matmul -> bf16": jax.jit(lambda xs, w: chain_calls(lambda x: f32out(x, w), xs)),
        "cond(x[0,0]>big, -, x @ w)": jax.jit(lambda xs, w: chain_calls(lambda x: jax.lax.cond(x[0, 0] > 1e30, lambda x, w: -plain(x, w), plain, x, w), xs)),
        "cond(x[0,0]>big, -, fp32-out)": jax.jit(lambda xs, w: chain_calls(lambda x: jax.lax.cond(x[0, 0] > 1e30, lambda x, w: -f32out(x, w), f32out, x, w), xs)),
        "sampled density alone": jax.jit(lambda xs, w: chain_calls(lambda x: pred(x), xs)),
        "cond(sampled, -, x @ w)": jax.jit(lambda xs, w: chain_calls(lambda x: jax.lax.cond(pred(x), lambda x, w: -plain(x, w), plain, x, w), xs)),
        "sparse_dense auto": jax.jit(lambda xs, w: chain_calls(lambda x: pit_jax.sparse_dense(x, w, tile="auto"), xs)),
    }
    times = {k_: [] for k_ in fns}
    for _ in range(3):
        for k_, f in fns.items():
            times[k_].append(time_per_call(lambda xs: f(xs, w), xs, n))
    for k_, t in times.items():
        print(f"| {name} | {k_} | {statistics.median(t) * 1e3:.3f} |", flush=True)
