"""Fused SwiGLU up-projection (issue 4): the SwiGLU MoE layer's forward (inference, no AD) with
the gate and up projections fused into one grouped GEMM whose epilogue applies silu(g)·u,
against the same layer with the two grouped matmuls and XLA's activation (what runs under
differentiation), and the up-projection alone both ways. Same fixed routing, bf16.

    python benchmarks/bench_moe_swiglu.py [--out benchmarks/results] [--quick]
Writes moe_swiglu.json and moe_swiglu.md into --out.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

import pit_jax
from pit_jax.moe import grouped_matmul, swiglu_matmul
from pit_jax.nn.moe import moe_ffn
from bench_moe import CASES, QUICK, expert_ids
from common import announce, bench_parser, markdown_report, time_per_call, write_results


def unfused_up(x, w_gate, w_in, routing, k):
    mm = lambda w: grouped_matmul(x, w, routing, rows_per_source=k, x_sorted=False, out_sorted=True)
    return jax.nn.silu(mm(w_gate)) * mm(w_in)


def unfused_layer(x, ids, cw, w_in, w_gate, w_out):
    """moe_ffn's SwiGLU layer with the up-projection unfused."""
    t, k = ids.shape
    routing = pit_jax.moe_routing(ids, w_in.shape[0])
    h = unfused_up(x, w_gate, w_in, routing, k)
    out = grouped_matmul(h, w_out, routing, rows_per_source=1, x_sorted=True, out_sorted=False)
    return jnp.einsum("tkd,tk->td", out.reshape(t, k, -1).astype(jnp.float32), cw).astype(x.dtype)


def fused_layer(x, ids, cw, w_in, w_gate, w_out):
    return moe_ffn(x, ids, cw, (w_in, w_gate, w_out), "swiglu")


def main():
    args = bench_parser("one tiny shape").parse_args()
    meta = announce()
    cases = QUICK if args.quick else {n: CASES[n] for n in ("Mixtral up T=4096", "Qwen3-30B-A3B-like")}
    rows = []
    for name, (t, e, k, d, f) in cases.items():
        key = jax.random.PRNGKey(0)
        normal = lambda i, s, sc: (jax.random.normal(jax.random.fold_in(key, i), s, jnp.float32) * sc).astype(jnp.bfloat16)
        x = normal(1, (t, d), 1.0)
        w_in, w_gate, w_out = normal(2, (e, d, f), d ** -0.5), normal(3, (e, d, f), d ** -0.5), normal(4, (e, f, d), f ** -0.5)
        ids = expert_ids(jax.random.fold_in(key, 5), t, e, k, "uniform")
        cw = jax.nn.softmax(jax.random.normal(jax.random.fold_in(key, 6), (t, k)), axis=-1)
        routing = pit_jax.moe_routing(ids, e)
        up_fused = jax.jit(lambda a: swiglu_matmul(a[0], a[1], a[2], routing, rows_per_source=k, x_sorted=False,
                                                    out_sorted=True))
        up_unfused = jax.jit(lambda a: unfused_up(a[0], a[1], a[2], routing, k))
        lowered = up_fused.lower((x, w_gate, w_in)).as_text()
        ms = lambda fn, a: time_per_call(fn, a, 1) * 1e3
        r = dict(case=name, T=t, E=e, k=k, d=d, f=f, fused_kernel_ran="@pit_moe_swiglu(" in lowered,
                 up_fused_ms=ms(up_fused, (x, w_gate, w_in)), up_unfused_ms=ms(up_unfused, (x, w_gate, w_in)),
                 layer_fwd_fused_ms=ms(jax.jit(lambda a: fused_layer(*a)), (x, ids, cw, w_in, w_gate, w_out)),
                 layer_fwd_unfused_ms=ms(jax.jit(lambda a: unfused_layer(*a)), (x, ids, cw, w_in, w_gate, w_out)))
        a = up_fused((x, w_gate, w_in)).astype(jnp.float32)
        b = up_unfused((x, w_gate, w_in)).astype(jnp.float32)
        r["rel_diff_fused_vs_unfused"] = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        print(r, flush=True)
        rows.append(r)
    md = markdown_report(
        f"Fused SwiGLU up-projection — {meta['device']}, jax {meta['jax']}, {meta['date']}",
        "bf16, uniform routing, forward only (no AD: under differentiation the unfused matmuls run); "
        "up = silu(x·Wg)·(x·Wu) into routing-ordered rows; layer = moe_ffn's SwiGLU layer forward; "
        "rel diff = fused vs unfused up-projection output (the unfused one rounds g and u to bf16)",
        ["case", "fused kernel ran", "up fused ms", "up unfused ms", "up speedup", "layer fwd fused ms",
         "layer fwd unfused ms", "layer speedup", "rel diff"],
        [[r["case"], str(r["fused_kernel_ran"]), f"{r['up_fused_ms']:.3f}", f"{r['up_unfused_ms']:.3f}",
          f"{r['up_unfused_ms'] / r['up_fused_ms']:.2f}", f"{r['layer_fwd_fused_ms']:.3f}",
          f"{r['layer_fwd_unfused_ms']:.3f}", f"{r['layer_fwd_unfused_ms'] / r['layer_fwd_fused_ms']:.2f}",
          f"{r['rel_diff_fused_vs_unfused']:.1e}"] for r in rows])
    print(md)
    write_results(args.out, "moe_swiglu", rows, md, meta)


if __name__ == "__main__":
    main()
