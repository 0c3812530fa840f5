"""Dense references for layer_shapes_probe.cu, same device call: jnp.dot (cuBLAS) on the four
non-dW GEMM shapes of a Mixtral T=4096 SwiGLU layer step with 8192 rows, B as stored and
transposed, bf16, 20 calls back to back after one warm-up.

    python3 benchmarks/cutlass_probe/layer_shapes_dense.py
"""
import time

import jax
import jax.numpy as jnp


def per_call_ms(f, *a, n=20):
    f(*a).block_until_ready()
    s = time.perf_counter()
    for _ in range(n):
        r = f(*a)
    r.block_until_ready()
    return (time.perf_counter() - s) / n * 1e3


if __name__ == "__main__":
    key = jax.random.PRNGKey(0)
    for name, k, n, transposed in [("up (B row-major)", 4096, 14336, False), ("down (B row-major)", 14336, 4096, False),
                                   ("up, wT (B column-major)", 4096, 14336, True),
                                   ("down, wT (B column-major)", 14336, 4096, True)]:
        a = jax.random.normal(key, (8192, k), jnp.bfloat16)
        b = jax.random.normal(key, (n, k) if transposed else (k, n), jnp.bfloat16)
        f = jax.jit((lambda a, b: a @ b.T) if transposed else (lambda a, b: a @ b))
        ms = per_call_ms(f, a, b)
        print(f"| {name} | dense jnp.dot (cuBLAS) | {ms:.3f} ms | {2 * 8192 * k * n / ms / 1e9:.0f} TFLOP/s |")
