"""A/B of the Hopper MoE kernels (issue 4): by default the tiled kernel (one CTA per
output tile) against the persistent one (PIT_MOE_PERSISTENT=1: one CTA per SM walking the
routing's tiles); `--switch NAME A B` compares two values of another per-launch variable instead
(any variable the handler reads per launch, e.g. PIT_MOE_COL_BAND 1 4). In one process on the same compiled functions — the
handler reads the variable at every launch, so the two settings alternate rep by rep and share
the machine's state. A variable read when lowering (PIT_MOE_STAGED) gets one compiled function per
value instead (jax's caches cleared between). Forward only, bf16:
the plain projection (tokens gathered, rows in routing order; also with the routing index built
in the timed call: "routed projection"), the SwiGLU up-projection with its
fused epilogue and the down-projection with the fused combine weights; the dense matmul of the
same FLOPs is the reference. The outputs of both kernels are compared (they must agree exactly:
same tiles, same K order). Also the projection's dW (the tn kernel), which the persistent switch
leaves alone.

    python benchmarks/bench_moe_persistent.py [--out benchmarks/results] [--quick] [--switch NAME A B]
Writes moe_persistent.json and moe_persistent.md (or moe_ab_NAME.*) into --out.
"""
from __future__ import annotations

import os
import statistics

import jax
import jax.numpy as jnp

import pit_jax
from pit_jax.moe import fused_matmul, grouped_matmul
from pit_jax.nn.moe import moe_ffn
from bench_moe import CASES, QUICK, ROUTINGS, expert_ids, layer_operands, projection_calls_per_step
from common import announce, bench_parser, markdown_report, round_order, time_per_call, write_results

# alternating A / B timings per point; the median of each is reported
ROUNDS = int(os.environ.get("PIT_BENCH_ROUNDS", "4"))


def set_switch(name: str, value: str) -> None:
    """value "default": the variable unset (the handler's own choice)."""
    if value == "default":
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


# variables read when lowering, not per launch, and per-launch ones that change how many kernels a
# call launches (session 27: XLA's command-buffer update failed when a switch made a call launch one
# kernel instead of two, CUDA_ERROR_GRAPH_EXEC_UPDATE_FAILURE): each value gets its own compiled function
LOWERING_SWITCHES = ("PIT_MOE_STAGED", "PIT_MOE_STAGED_DW")


def timed(fns: dict, operands, name: str, value: str, calls: int) -> float:
    """ms per call; operands holds `calls` copies of one call's operands (bench_moe's calls per jitted step)."""
    set_switch(name, value)
    return time_per_call(fns[value], operands, calls) * 1e3


def compiled_per_value(fn, operands, name: str, values) -> dict:
    out = {}
    for value in values:
        set_switch(name, value)
        jax.clear_caches()  # else the first value's lowering is reused from jax's caches
        out[value] = jax.jit(lambda ops: fn(ops)).lower(operands).compile()
    os.environ.pop(name, None)
    return out


def main():
    ap = bench_parser("one tiny shape")
    ap.add_argument("--switch", nargs=3, default=["PIT_MOE_PERSISTENT", "0", "1"], metavar=("NAME", "A", "B"),
                    help="environment variable read per launch (or at lowering: PIT_MOE_STAGED) and its two values, 'default' = unset "
                         "(default: tiled vs persistent)")
    ap.add_argument("--cases", nargs="+", default=["Mixtral up T=4096", "Qwen3-30B-A3B-like"], metavar="CASE",
                    help="bench_moe case names (default: Mixtral up T=4096 and the Qwen-like shape)")
    ap.add_argument("--routings", nargs="+", default=["uniform", "one-hot"], choices=ROUTINGS,
                    help="bench_moe routings (default: uniform and one-hot)")
    ap.add_argument("--parts", nargs="+", default=None, metavar="PART",
                    help="time only these parts (e.g. 'routed projection'); default: all")
    args = ap.parse_args()
    var, val_a, val_b = args.switch
    label_a, label_b = ("tiled", "persistent") if var == "PIT_MOE_PERSISTENT" else (f"{var}={val_a}", f"{var}={val_b}")
    meta = announce()
    cases = QUICK if args.quick else {n: CASES[n] for n in args.cases}
    rows = []
    for name, (t, e, k, d, f) in cases.items():
        key = jax.random.PRNGKey(0)
        ops = layer_operands(key, t, e, k, d, f)
        x, w_in, w_gate, w_out, h, cw = (ops[n] for n in ("x", "w_in", "w_gate", "w_out", "h", "cw"))
        a = jax.random.normal(jax.random.fold_in(key, 8), (t * k, d), jnp.bfloat16)
        dense = jax.jit(lambda ops: ops[0] @ ops[1])
        # short calls (Qwen-like) several per jitted step, else one call per step timed the host's dispatch
        calls = projection_calls_per_step((t, e, k, d, f))
        dense_ms = time_per_call(jax.jit(lambda many: [dense(o) for o in many]), [(a, w_in[0])] * calls, calls) * 1e3
        for routing_name in args.routings:
            ids = expert_ids(jax.random.fold_in(key, 5), t, e, k, routing_name)
            routing = pit_jax.moe_routing(ids, e)
            parts = {
                # the routing index built inside the timed call (its kernels and the gap to the GEMM)
                "routed projection": (lambda ops: grouped_matmul(ops[1], ops[2], pit_jax.moe_routing(ops[0], e),
                                                                 rows_per_source=k, x_sorted=False, out_sorted=True),
                                      (ids, x, w_in)),
                "projection": (lambda ops: grouped_matmul(ops[0], ops[1], routing, rows_per_source=k,
                                                          x_sorted=False, out_sorted=True), (x, w_in)),
                # the same with the output in assignment order (moe_matmul's layout: SWrite of [T·k, f])
                "scattered projection": (lambda ops: grouped_matmul(ops[0], ops[1], routing, rows_per_source=k,
                                                                    x_sorted=False, out_sorted=False), (x, w_in)),
                # x copied into routing order by XLA first, then the kernel reads both operands by TMA
                # (how a permute-then-GEMM MoE works; the copy's cost against the gather's)
                "copied projection": (lambda ops: grouped_matmul(jnp.take(ops[0], ops[2].order // k, axis=0), ops[1],
                                                                 ops[2], rows_per_source=1, x_sorted=True,
                                                                 out_sorted=True), (x, w_in, routing)),
                "up swiglu": (lambda ops: fused_matmul(ops[0], ops[1], routing, epilogue="swiglu", rows_per_source=k,
                                                       x_sorted=False, out_sorted=True, w_up=ops[2]),
                              (x, w_gate, w_in)),
                "down scale": (lambda ops: fused_matmul(ops[0], ops[1], routing, epilogue="scale", rows_per_source=1,
                                                        x_sorted=True, out_sorted=False, scale=ops[2].reshape(-1)),
                               (h, w_out, cw)),
                # dW of the projection (pit_moe_matmul_tn: gathered x, dy in routing order)
                "projection dW": (lambda ops: jax.grad(lambda w: jnp.sum(grouped_matmul(
                    ops[0], w, routing, rows_per_source=k, x_sorted=False, out_sorted=True).astype(jnp.float32)))(ops[1]),
                                  (x, w_in)),
                # a SwiGLU layer's training step (moe_ffn fwd + bwd, routing given): every grouped matmul and dW
                # as the lowering rules pick them; its gradients (tokens, combine weights, three weights)
                "layer step": (lambda ops: jax.grad(lambda x, cw, *ws: jnp.mean(jnp.square(moe_ffn(
                    x, ids, cw, ws, "swiglu", routing=routing).astype(jnp.float32))), argnums=(0, 1, 2, 3, 4))(*ops),
                               (x, cw, w_in, w_gate, w_out)),
            }
            for part, (fn, operands) in parts.items():
                if args.parts is not None and part not in args.parts:
                    continue
                text = jax.jit(fn).lower(operands).as_text()  # the default's choice
                step, operands = (lambda f_: lambda many: [f_(o) for o in many])(fn), [operands] * calls
                ran = any(s in text for s in ("@pit_moe_fused(", "@pit_moe_matmul(", "@pit_moe_matmul_tn(",
                                              "@pit_moe_matmul_staged("))
                # one function per value where the switch is read when lowering, else one for both
                fns = (compiled_per_value(step, operands, var, (val_a, val_b)) if var in LOWERING_SWITCHES
                       else dict.fromkeys((val_a, val_b), jax.jit(step)))
                times_a, times_b = [], []
                for rnd in range(ROUNDS):
                    for value, times in round_order([(val_a, times_a), (val_b, times_b)], rnd):
                        times.append(timed(fns, operands, var, value, calls))
                set_switch(var, val_a)
                ref = fns[val_a](operands)
                set_switch(var, val_b)
                got = fns[val_b](operands)
                os.environ.pop(var, None)
                # gate and up: twice the dense FLOPs; the layer step: 3 forward, 3 dx and 3 dW matmuls
                flops_scale = {"up swiglu": 2.0, "layer step": 9.0}.get(part, 1.0)
                r = dict(case=name, routing=routing_name, part=part, kernel_call_lowered=ran, switch=var, calls_per_step=calls,
                         a=val_a, b=val_b,
                         a_ms=statistics.median(times_a), b_ms=statistics.median(times_b),
                         dense_same_flops_ms=dense_ms * flops_scale,
                         max_abs_diff=max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r_.astype(jnp.float32))))
                                          for g, r_ in zip(jax.tree.leaves(got), jax.tree.leaves(ref))))
                print(r, flush=True)
                rows.append(r)
    md = markdown_report(
        f"MoE kernels: {label_a} vs {label_b} — {meta['device']}, jax {meta['jax']}, {meta['date']}",
        f"bf16, forward kernels and one dW, same jitted function with {var}={val_a} / {val_b} timed in {ROUNDS} rounds "
        "(Qwen-like: 4 calls per jitted step, as bench_moe), "
        "A then B in even rounds and B then A in odd ones (median of each). projection: tokens gathered, rows in routing order (no epilogue); routed projection: "
        "the same with the routing index built inside the timed call; scattered projection: the output in assignment order; copied projection: x copied into routing order by XLA (jnp.take) "
        "in the timed call, then both operands by TMA; up swiglu: gate "
        "and up weights in one GEMM, silu(gate)·up fused; down scale: routing-ordered rows scattered to "
        "(token, slot) × the combine weight; projection dW: jax.grad of the projection w.r.t. w (the tn kernel); layer step: "
        "jax.grad of a SwiGLU moe_ffn's mean square w.r.t. tokens, combine weights and its three weights, routing given. "
        "dense = a [T·k, d] × [d, f] matmul (×2 for SwiGLU's two weights, ×9 for the layer step's matmuls: its "
        f"elementwise work not counted). max |diff| = {label_b} vs {label_a} output",
        ["case", "routing", "part", f"{label_a} ms", f"{label_b} ms", f"{label_a} / {label_b}", "dense ms",
         f"{label_b} / dense", "max abs diff"],
        [[r["case"], r["routing"], r["part"], f"{r['a_ms']:.3f}", f"{r['b_ms']:.3f}",
          f"{r['a_ms'] / r['b_ms']:.3f}", f"{r['dense_same_flops_ms']:.3f}",
          f"{r['b_ms'] / r['dense_same_flops_ms']:.2f}", f"{r['max_abs_diff']:.1e}"] for r in rows])
    print(md)
    write_results(args.out, "moe_persistent" if var == "PIT_MOE_PERSISTENT" else f"moe_ab_{var}", rows, md, meta)


if __name__ == "__main__":
    main()
