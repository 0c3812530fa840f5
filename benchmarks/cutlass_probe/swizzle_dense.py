"""Dense references for swizzle_probe.cu, same device call: jnp.dot (cuBLAS) on the Mixtral up and
down shapes at 8192 and 32768 rows, bf16, 20 calls back to back after one warm-up.

    python3 benchmarks/cutlass_probe/swizzle_dense.py
"""
import jax
import jax.numpy as jnp

from layer_shapes_dense import per_call_ms

key = jax.random.PRNGKey(0)
for name, rows, k, n in [("up T=4096", 8192, 4096, 14336), ("up T=16384", 32768, 4096, 14336),
                         ("down T=4096", 8192, 14336, 4096)]:
    a = jax.random.normal(key, (rows, k), jnp.bfloat16)
    b = jax.random.normal(key, (k, n), jnp.bfloat16)
    ms = per_call_ms(jax.jit(lambda a, b: a @ b), a, b)
    print(f"| {name} | dense jnp.dot (cuBLAS) | {ms:.3f} ms | {2 * rows * k * n / ms / 1e9:.0f} TFLOP/s |")
