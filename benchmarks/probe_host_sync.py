"""Does an op block the host? (issue 3: tile="auto" and the dW rule decide with lax.cond.)

XLA's GPU runtime runs a `conditional` outside a command buffer by copying the predicate to the
host and waiting for the stream (ConditionalThunk), unless CONDITIONAL is among
--xla_gpu_enable_command_buffer (then a CUDA graph conditional node decides on device). This
probe measures, per variant, the device time per call and the share of it the host spends
inside the dispatch loop: 20 calls are enqueued, then one wait. An op that never blocks
returns to the host long before the device finishes (enqueue / total far below 1); one that
waits for its predicate keeps the host busy until the device is done (close to 1). It also
counts the compiled module's conditionals and command-buffer computations.

    XLA_FLAGS=... python benchmarks/probe_host_sync.py [--out DIR] [--quick]
Writes host_sync.json and host_sync.md into --out.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp

import pit_jax
from common import announce, bench_parser, markdown_report, tile_sparse_bf16, time_per_call, write_results

CALLS = 20


def enqueue_share(fn, inputs) -> float:
    """Host time in the loop that enqueues CALLS calls / time until the last one finished."""
    jax.block_until_ready(fn(inputs))
    t0 = time.perf_counter()
    for _ in range(CALLS):
        out = fn(inputs)
    t1 = time.perf_counter()
    jax.block_until_ready(out)
    t2 = time.perf_counter()
    return (t1 - t0) / (t2 - t0)


def compiled_with(env_value, make, inputs):
    """make()'s jitted function compiled for `inputs` with PIT_KGATHER_DW=env_value (read at
    lowering; unset for None), the variable restored afterwards."""
    saved = os.environ.pop("PIT_KGATHER_DW", None)
    if env_value is not None:
        os.environ["PIT_KGATHER_DW"] = env_value
    try:
        return make().lower(inputs).compile()
    finally:
        os.environ.pop("PIT_KGATHER_DW", None)
        if saved is not None:
            os.environ["PIT_KGATHER_DW"] = saved


def main():
    args = bench_parser("one small shape").parse_args()
    meta = announce()
    flags = os.environ.get("XLA_FLAGS", "")
    m = k = n = 512 if args.quick else 4096
    key = jax.random.PRNGKey(0)
    w = jax.random.normal(jax.random.fold_in(key, 9), (k, n), jnp.bfloat16)
    rows = []
    for sparsity in (0.0, 0.9):
        xs = tile_sparse_bf16(key, m, k, (32, 1), sparsity, 4, nonnegative=True)
        loss = lambda f: (lambda w, x: jnp.sum(f(x, w).astype(jnp.float32)))
        variants = {
            "dense x @ w": (None, lambda: jax.jit(lambda xs: [x @ w for x in xs])),
            "sparse_dense tile=(32,1)": (None, lambda: jax.jit(lambda xs: [pit_jax.sparse_dense(x, w) for x in xs])),
            "sparse_dense tile='auto'": (None, lambda: jax.jit(
                lambda xs: [pit_jax.sparse_dense(x, w, tile="auto") for x in xs])),
            "dW dense reference": (None, lambda: jax.jit(
                lambda xs: [jax.grad(loss(lambda x, w: x @ w))(w, x) for x in xs])),
            "dW, rule on device (PIT_KGATHER_DW=auto)": ("auto", lambda: jax.jit(
                lambda xs: [jax.grad(loss(pit_jax.sparse_dense))(w, x) for x in xs])),
            "dW, PIT_KGATHER_DW=dense": ("dense", lambda: jax.jit(
                lambda xs: [jax.grad(loss(pit_jax.sparse_dense))(w, x) for x in xs])),
        }
        for name, (env_value, make) in variants.items():
            fn = compiled_with(env_value, make, xs)
            text = fn.as_text()
            r = dict(variant=name, sparsity=sparsity, xla_flags=flags,
                     ms=time_per_call(fn, xs, len(xs)) * 1e3, enqueue_share=enqueue_share(fn, xs),
                     conditionals=text.count(" conditional("), command_buffers=text.count("command_buffer"))
            print(r, flush=True)
            rows.append(r)
    md = markdown_report(
        f"Host blocking probe — {meta['device']}, jax {meta['jax']}, {meta['date']}",
        f"{m}x{k}x{n} bf16, random 32x1 tiles; XLA_FLAGS={flags!r}. ms = device time per call (4 calls per "
        f"step, back to back); enqueue share = host time enqueueing {CALLS} steps / time until they finished "
        "(near 1: the host waited on the device inside the loop); conditionals / command buffers = "
        "occurrences in the compiled module",
        ["variant", "sparsity", "ms", "enqueue share", "conditionals", "command buffers"],
        [[r["variant"], f"{r['sparsity']:.2f}", f"{r['ms']:.3f}", f"{r['enqueue_share']:.2f}",
          str(r["conditionals"]), str(r["command_buffers"])] for r in rows])
    print(md)
    write_results(args.out, "host_sync", rows, md, meta)


if __name__ == "__main__":
    main()
