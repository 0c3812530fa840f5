"""Which of a step's ops XLA puts in command buffers (CUDA graphs), under the XLA_FLAGS this process
runs with: for bench_sparse_dense's step (four chained calls, 4096³, 32x1 tiles at 95%: index
detected, index given) and for the dense matmul, the optimized HLO's custom calls, cuBLAS calls
and fusions inside and outside `command_buffer` computations.

    XLA_FLAGS=... python benchmarks/probe_command_buffer.py [--size 4096]
"""
from __future__ import annotations

import argparse
import collections
import os
import re

import jax
import jax.numpy as jnp

import pit_jax
from common import chain_calls, tile_sparse_bf16


def computations(hlo_text):
    """{computation name: its lines} of an HLO module's text."""
    out, name = collections.defaultdict(list), None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            name = head.group(1)
        elif name is not None:
            out[name].append(line)
    return out


def census(hlo_text):
    """(op kind, inside a command buffer) -> count, for custom calls (by target) and fusions."""
    counts = collections.Counter()
    for name, lines in computations(hlo_text).items():
        inside = "command_buffer" in name
        for line in lines:
            target = re.search(r'custom_call_target="([^"]+)"', line)
            if target:
                counts[(target.group(1), inside)] += 1
            elif re.search(r"= \S+ fusion\(", line):
                counts[("fusion", inside)] += 1
    return counts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096)
    a = ap.parse_args()
    m = k = n = a.size
    key = jax.random.PRNGKey(0)
    w = jax.random.normal(key, (k, n), jnp.bfloat16)
    xs = tile_sparse_bf16(key, m, k, (32, 1), 0.95, 4, nonnegative=True)
    idxs = [pit_jax.detect(x, (32, 1)) for x in xs]
    steps = {
        "dense": (jax.jit(lambda xs, w: chain_calls(jnp.matmul, xs, w)), (xs, w)),
        "detected": (jax.jit(lambda xs, w: chain_calls(lambda x: pit_jax.sparse_dense(x, w), xs)), (xs, w)),
        "given": (jax.jit(lambda xs, w, idxs: chain_calls(lambda xi: pit_jax.sparse_dense(xi[0], w, index=xi[1]),
                                                          list(zip(xs, idxs)))), (xs, w, idxs)),
    }
    print(f"| XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} | step | op | in command buffers | outside |")
    print("|---|---|---|---|---|")
    for label, (fn, args) in steps.items():
        text = fn.lower(*args).compile().as_text()
        counts = census(text)
        for op in sorted({op for op, _ in counts}):
            print(f"| | {label} | {op} | {counts[(op, True)]} | {counts[(op, False)]} |")


if __name__ == "__main__":
    main()
