"""MoE expert-projection benchmark (issue 4): pit_jax.moe_matmul against a dense matmul of the
same FLOPs, jax.lax.ragged_dot and Pallas ragged_dot_mgpu (Hopper, forward only), with uniform,
Zipf-skewed and one-hot routing.

    python benchmarks/bench_moe.py [--out benchmarks/results] [--quick]

pit_jax is timed from unsorted tokens (routing, gather and scatter included); the peers get
rows already sorted by expert (their best case). Floor = max(FLOPs at the measured dense rate,
bytes at the measured copy rate), bytes = tokens + the experts actually used + outputs.
By default pit_jax runs its lax.ragged_dot reference; with PIT_EXPERIMENTAL_MOE_KERNELS=1 in the
environment it runs the (not yet GPU-checked) grouped-GEMM kernels; the report says which.
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import pit_jax
from common import announce, bench_parser, markdown_report, time_per_call, write_results

CASES = {  # name: (T, E, k, d, f)
    "Mixtral up T=4096": (4096, 8, 2, 4096, 14336),
    "Mixtral up T=16384": (16384, 8, 2, 4096, 14336),
    "Qwen3-30B-A3B-like": (2048, 128, 8, 2048, 768),
}
QUICK = {"tiny": (256, 8, 2, 128, 192)}


def expert_ids(key, t, e, k, routing):
    if routing == "one-hot":
        return jnp.tile(jnp.arange(k, dtype=jnp.int32), (t, 1))  # every token on experts 0..k-1
    if routing == "uniform":
        logits = jax.random.normal(key, (t, e))
    else:  # zipf: expert popularity ~ 1/rank
        logits = jax.random.gumbel(key, (t, e)) - jnp.log(jnp.arange(1, e + 1, dtype=jnp.float32))
    return jax.lax.top_k(logits, k)[1].astype(jnp.int32)


def mgpu_best(rows, w, sizes):
    """Best of a few block configs of Pallas ragged_dot_mgpu, or None where it cannot run."""
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    except ImportError:
        return None, None
    best = (None, None)
    for bm, bn, steps in ((128, 128, 4), (64, 128, 4), (128, 256, 3)):
        if w.shape[-1] % bn:
            continue
        f = jax.jit(functools.partial(ragged_dot_mgpu.ragged_dot, group_sizes=sizes, block_m=bm,
                                      block_n=bn, block_k=64, max_concurrent_steps=steps, grid_block_n=1))
        try:
            t = time_per_call(lambda r: f(r, w), rows, 1)
        except Exception as err:  # unsupported config or platform: try the next
            print("ragged_dot_mgpu", (bm, bn, steps), type(err).__name__, str(err)[:100])
            continue
        if best[0] is None or t < best[0]:
            best = (t, (bm, bn, steps))
    return best


def main():
    ap = bench_parser("one tiny shape")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="pit_jax: moe_matmul")
    meta = announce()
    on_gpu = jax.devices()[0].platform == "gpu"
    key = jax.random.PRNGKey(0)
    rows_out = []
    for name, (t, e, k, d, f) in (QUICK if args.quick else CASES).items():
        x = jax.random.normal(key, (t, d), jnp.bfloat16)
        w = (jax.random.normal(jax.random.fold_in(key, 1), (e, d, f), jnp.bfloat16) * d ** -0.5).astype(jnp.bfloat16)
        dense_a = jax.random.normal(key, (t * k, d), jnp.bfloat16)
        dense_b = w[0]
        t_dense = time_per_call(jax.jit(lambda a: a @ dense_b), dense_a, 1)
        dense_rate = 2 * t * k * d * f / t_dense
        t_copy = time_per_call(jax.jit(lambda a: -a), w, 1)
        copy_rate = 2 * w.size * 2 / t_copy
        for routing in ("uniform", "zipf", "one-hot"):
            ids = expert_ids(jax.random.fold_in(key, 2), t, e, k, routing)
            order = jnp.argsort(ids.reshape(-1), stable=True)
            sizes = jnp.bincount(ids.reshape(-1), length=e).astype(jnp.int32)
            rows = jnp.take(x, order // k, axis=0)
            ours = jax.jit(pit_jax.moe_matmul)
            out = ours(x, w, ids)
            ref = jnp.einsum("td,tkdf->tkf", x[:64].astype(jnp.float32), w[ids[:64]].astype(jnp.float32))
            err = float(jnp.linalg.norm(out[:64].astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
            t_ours = time_per_call(lambda x: ours(x, w, ids), x, 1)
            t_ragged = time_per_call(jax.jit(lambda r: jax.lax.ragged_dot(r, w, sizes)), rows, 1)
            t_mgpu, cfg = mgpu_best(rows, w, sizes) if on_gpu else (None, None)
            used = int(jnp.sum(sizes > 0))
            bytes_moved = 2 * (t * d + used * d * f + t * k * f)
            floor = max(2 * t * k * d * f / dense_rate, bytes_moved / copy_rate)
            r = dict(case=name, routing=routing, T=t, E=e, k=k, d=d, f=f, rel_err=err,
                     t_pit_ms=t_ours * 1e3, t_dense_same_flops_ms=t_dense * 1e3,
                     t_ragged_dot_ms=t_ragged * 1e3,
                     t_ragged_dot_mgpu_ms=None if t_mgpu is None else t_mgpu * 1e3, mgpu_config=cfg,
                     floor_ms=floor * 1e3, of_floor=floor / t_ours,
                     dense_tflops=dense_rate / 1e12, copy_tbps=copy_rate / 1e12)
            rows_out.append(r)
            print({k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in r.items()}, flush=True)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    md = markdown_report(
        f"MoE expert projection — {meta['device']}, jax {meta['jax']}, {meta['date']}",
        "bf16; pit_jax from unsorted tokens (routing + gather + scatter included), peers from "
        f"rows pre-sorted by expert; CUDA kernels built: {pit_jax.build_info().get('cuda')}; pit_jax path: "
        f"{'experimental kernels' if pit_jax.moe_cuda.enabled() else 'lax.ragged_dot reference'}",
        ["case", "routing", "pit ms", "dense same-FLOP ms", "ragged_dot ms", "ragged_dot_mgpu ms",
         "floor ms", "of floor", "rel err"],
        [[r["case"], r["routing"], fmt(r["t_pit_ms"]), fmt(r["t_dense_same_flops_ms"]),
          fmt(r["t_ragged_dot_ms"]), fmt(r["t_ragged_dot_mgpu_ms"]), fmt(r["floor_ms"]),
          f"{r['of_floor']:.2f}", f"{r['rel_err']:.1e}"] for r in rows_out])
    print(md)
    write_results(args.out, "moe", rows_out, md, meta)


if __name__ == "__main__":
    main()
