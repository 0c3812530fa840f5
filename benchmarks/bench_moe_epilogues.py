"""Fused epilogues of the MoE grouped GEMM (issue 4), forward / inference only (under
differentiation the unfused matmuls run): each projection with its epilogue fused into the
kernel (pit_jax.moe.fused_matmul) against the same grouped matmul followed by the epilogue in
XLA — up-projections with relu, gelu and swiglu (one GEMM over gate and up weights), the
down-projection with the top-k combine weights (then the k-sum) against the unweighted matmul
followed by the combine einsum — and moe_ffn's layer forward both ways. Same fixed routing, bf16.

    python benchmarks/bench_moe_epilogues.py [--out benchmarks/results] [--quick]
Writes moe_epilogues.json and moe_epilogues.md into --out.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

import pit_jax
from pit_jax.moe import fused_matmul, grouped_matmul
from pit_jax.moe_reference import apply_epilogue
from pit_jax.nn.moe import moe_ffn
from bench_moe import CASES, QUICK, expert_ids, layer_operands
from common import announce, bench_parser, markdown_report, time_per_call, write_results


def unfused_up(x, w, w_up, routing, k, epilogue):
    """The grouped matmul(s), then the activation in XLA (what the JVP rule runs)."""
    mm = lambda w_: grouped_matmul(x, w_, routing, rows_per_source=k, x_sorted=False, out_sorted=True)
    return apply_epilogue(epilogue, mm, w, (w_up,), routing.order, True).astype(x.dtype)


def fused_up(x, w, w_up, routing, k, epilogue):
    named = dict(w_up=w_up) if epilogue == "swiglu" else {}
    return fused_matmul(x, w, routing, epilogue=epilogue, rows_per_source=k, x_sorted=False, out_sorted=True,
                        **named)


def unfused_down(h, w_out, cw, routing):
    """Unweighted down-projection, then the combine as an fp32 einsum over the k slots."""
    t, k = cw.shape
    out = grouped_matmul(h, w_out, routing, rows_per_source=1, x_sorted=True, out_sorted=False)
    return jnp.einsum("tkd,tk->td", out.reshape(t, k, -1).astype(jnp.float32), cw).astype(h.dtype)


def fused_down(h, w_out, cw, routing):
    """Combine weights in the kernel's epilogue, then only the k-sum."""
    t, k = cw.shape
    out = fused_matmul(h, w_out, routing, epilogue="scale", rows_per_source=1, x_sorted=True, out_sorted=False,
                       scale=cw.reshape(-1))
    return out.reshape(t, k, -1).astype(jnp.float32).sum(1).astype(h.dtype)


def unfused_layer(x, ids, cw, w_in, w_gate, w_out, activation):
    routing = pit_jax.moe_routing(ids, w_in.shape[0])
    if activation == "swiglu":
        h = unfused_up(x, w_gate, w_in, routing, ids.shape[1], "swiglu")
    else:
        h = unfused_up(x, w_in, None, routing, ids.shape[1], activation)
    return unfused_down(h, w_out, cw, routing)


def main():
    args = bench_parser("one tiny shape").parse_args()
    meta = announce()
    cases = QUICK if args.quick else {n: CASES[n] for n in ("Mixtral up T=4096", "Qwen3-30B-A3B-like")}
    rows = []
    ms = lambda fn, a: time_per_call(fn, a, 1) * 1e3
    rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float32) - b.astype(jnp.float32))
                             / jnp.linalg.norm(b.astype(jnp.float32)))
    for name, (t, e, k, d, f) in cases.items():
        key = jax.random.PRNGKey(0)
        ops = layer_operands(key, t, e, k, d, f)
        x, w_in, w_gate, w_out, h, cw = (ops[n] for n in ("x", "w_in", "w_gate", "w_out", "h", "cw"))
        ids = expert_ids(jax.random.fold_in(key, 5), t, e, k, "uniform")
        routing = pit_jax.moe_routing(ids, e)

        def record(part, epilogue, fused_fn, unfused_fn, operands):
            fused_fn, unfused_fn = jax.jit(fused_fn), jax.jit(unfused_fn)
            ran = "@pit_moe_fused(" in fused_fn.lower(operands).as_text()
            r = dict(case=name, T=t, E=e, k=k, d=d, f=f, part=part, epilogue=epilogue, fused_kernel_ran=ran,
                     fused_ms=ms(fused_fn, operands), unfused_ms=ms(unfused_fn, operands),
                     rel_diff=rel(fused_fn(operands), unfused_fn(operands)))
            print(r, flush=True)
            rows.append(r)

        for epi in ("relu", "gelu", "swiglu"):
            w = w_gate if epi == "swiglu" else w_in
            record("up-projection", epi, lambda a, epi=epi: fused_up(a[0], a[1], a[2], routing, k, epi),
                   lambda a, epi=epi: unfused_up(a[0], a[1], a[2], routing, k, epi), (x, w, w_in))
        record("down-projection + combine", "scale", lambda a: fused_down(a[0], a[1], a[2], routing),
               lambda a: unfused_down(a[0], a[1], a[2], routing), (h, w_out, cw))
        for act in ("relu", "swiglu"):
            record("layer forward", act, lambda a, act=act: moe_ffn(a[0], a[1], a[2], a[3:], act),
                   lambda a, act=act: unfused_layer(a[0], a[1], a[2], a[3], a[4], a[5], act),
                   (x, ids, cw, w_in, w_gate, w_out))
    md = markdown_report(
        f"Fused MoE epilogues — {meta['device']}, jax {meta['jax']}, {meta['date']}",
        "bf16, uniform routing, forward only (no AD: under differentiation the unfused matmuls run). "
        "Up-projection: tokens gathered, rows written in routing order; epilogue fused vs grouped matmul(s) "
        "+ XLA activation. Down-projection: routing-ordered rows scattered to (token, slot), combine weights "
        "in the epilogue + k-sum vs unweighted matmul + fp32 combine einsum. Layer: moe_ffn forward, "
        "routing included. rel diff = fused vs unfused output (the unfused path rounds the products to "
        "bf16 before the epilogue)",
        ["case", "part", "epilogue", "fused kernel ran", "fused ms", "unfused ms", "speedup", "rel diff"],
        [[r["case"], r["part"], r["epilogue"], str(r["fused_kernel_ran"]), f"{r['fused_ms']:.3f}",
          f"{r['unfused_ms']:.3f}", f"{r['unfused_ms'] / r['fused_ms']:.2f}", f"{r['rel_diff']:.1e}"] for r in rows])
    print(md)
    write_results(args.out, "moe_epilogues", rows, md, meta)


if __name__ == "__main__":
    main()
