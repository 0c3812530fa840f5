"""Where PIT_KGATHER_DW=device's time goes (session 35): the parts of its dW, each jitted alone on
the same bf16 arrays (random 32x1 tiles of x at the given sparsity), ms per call:

  dense      jnp.matmul(x.T, dy) (XLA's GEMM, what the default dW runs)
  gated      pit_dense_tn_gated alone with a gate that says run: CUTLASS's Hopper GEMM for xᵀ·dy
  skipped    pit_dense_tn_gated with a gate that says skip: its args kernel and an empty GEMM launch
  zeros      the zero dW both of them take as their aliased operand (a memset; part of their times)
  products   pit_sparse_tn_products without the masked fallback (the products path; over its
             cap, only the offsets kernel and early-returning launches)
  detect     pit_jax.detect(x, (32, 1)) (the index the dW needs when sparse_dense detected its own)

    python benchmarks/probe_gated_dw.py --out DIR [--sparsity 0.9 0.99]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import pit_jax
from pit_jax import kgather_cuda as kc
from bench_sparse_dense import shapes
from common import announce, bench_parser, markdown_report, tile_sparse_bf16, time_per_call, write_results

TILE = (32, 1)
N_INPUTS = 4


def main():
    ap = bench_parser("one small shape")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.9, 0.99])
    args = ap.parse_args()
    meta = announce()
    key = jax.random.PRNGKey(0)
    rows = []
    for name, m, k, n in shapes(args.quick):
        dys = [jax.random.normal(jax.random.fold_in(key, 200 + i), (m, n), jnp.bfloat16) for i in range(N_INPUTS)]
        plan = kc.products_plan((m, k), n, 1, jnp.bfloat16)
        cap_rows, n_slab = plan
        pws = kc.products_workspace_bytes([], m, k, 1, 2, cap_rows, n_slab)

        def gated(x, dy, total):
            gate = jax.lax.bitcast_convert_type(total.reshape(1), jnp.uint8).reshape(4)  # the total alone
            dw0 = jnp.zeros((k, n), jnp.bfloat16)
            dw, _ = jax.ffi.ffi_call("pit_dense_tn_gated", (jax.ShapeDtypeStruct((k, n), jnp.bfloat16),
                                                            jax.ShapeDtypeStruct((kc.GATED_DW_WORKSPACE_BYTES,),
                                                                                 jnp.uint8)),
                                     input_output_aliases={3: 0})(x, dy, gate, dw0, gate_offset=np.int64(0),
                                                                  cap=np.int64(cap_rows))
            return dw

        def products(x, dy, idx):
            dw, _ = jax.ffi.ffi_call("pit_sparse_tn_products", (jax.ShapeDtypeStruct((k, n), jnp.bfloat16),
                                                                jax.ShapeDtypeStruct((pws,), jnp.uint8)))(
                x, dy, idx.counts, idx.indices, tile_m=np.int64(32), tile_k=np.int64(1),
                cap_rows=np.int64(cap_rows), n_slab=np.int64(n_slab), masked_fallback=False)
            return dw

        run = jnp.int32(cap_rows + 1)
        skip = jnp.int32(0)
        parts = {
            "dense": jax.jit(lambda xs, dys: [jnp.matmul(x.T, dy, preferred_element_type=jnp.float32).astype(x.dtype)
                                              for x, dy in zip(xs, dys)]),
            "gated": jax.jit(lambda xs, dys: [gated(x, dy, run) for x, dy in zip(xs, dys)]),
            "skipped": jax.jit(lambda xs, dys: [gated(x, dy, skip) for x, dy in zip(xs, dys)]),
            "detect": jax.jit(lambda xs, dys: [pit_jax.detect(x, TILE).counts for x in xs]),
            # the zero dW that gated/skipped alias in (subtract it from theirs)
            "zeros": jax.jit(lambda xs, dys: [jnp.zeros((k, n), jnp.bfloat16) for _ in xs]),
        }
        for sp in args.sparsity:
            xs = tile_sparse_bf16(key, m, k, TILE, sp, N_INPUTS, nonnegative=True)
            idxs = [pit_jax.detect(x, TILE) for x in xs]
            prod = jax.jit(lambda xs, dys: [products(x, dy, i) for x, dy, i in zip(xs, dys, idxs)])
            want = parts["dense"](xs[:1], dys[:1])[0].astype(jnp.float32)
            got = parts["gated"](xs[:1], dys[:1])[0].astype(jnp.float32)
            err = float(jnp.linalg.norm(got - want) / (jnp.linalg.norm(want) + 1e-30))
            row = dict(shape=name, sparsity=sp, gated_rel_err=err)
            for part, fn in list(parts.items()) + [("products", prod)]:
                row[part + "_ms"] = time_per_call(lambda a: fn(a, dys), xs, N_INPUTS) * 1e3
            rows.append(row)
            print({k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)
    cols = ["dense", "gated", "skipped", "zeros", "products", "detect"]
    md = markdown_report(
        f"PIT_KGATHER_DW=device, its parts — {meta['device']}, jax {meta['jax']}, {meta['date']}",
        "bf16, random 32×1 tiles of x; each part jitted alone, 4 calls per step, median ms per call; gated rel err: "
        "the gated GEMM against XLA's dense dW.",
        ["shape", "sparsity"] + [c + " ms" for c in cols] + ["gated rel err"],
        [[r["shape"], f"{r['sparsity']:.2f}"] + [f"{r[c + '_ms']:.3f}" for c in cols] + [f"{r['gated_rel_err']:.1e}"]
         for r in rows])
    print(md)
    write_results(args.out, "gated_dw_parts", rows, md, meta)


if __name__ == "__main__":
    main()
