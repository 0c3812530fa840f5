"""The dense references for grouped_probe.cu, run in the same device call: jnp.dot (cuBLAS) on
[8192, 4096] x [4096, 14336] (Mixtral T=4096 up-projection's FLOPs) and [16384, 2048] x
[2048, 768] (the Qwen-like projection's), and the dW of each (xᵀ dy over the 8192 / 16384 rows;
dw_probe.cu's reference), bf16, 20 calls back to back after one warm-up.

    python3 benchmarks/cutlass_probe/dense_reference.py
"""
import time, jax, jax.numpy as jnp
def t(f, *a, n=20):
    f(*a).block_until_ready()
    s=time.perf_counter()
    for _ in range(n): r=f(*a)
    r.block_until_ready(); return (time.perf_counter()-s)/n*1e3
k=jax.random.PRNGKey(0)
for (m,kk,n,name) in [(8192,4096,14336,"Mixtral up T=4096"),(16384,2048,768,"Qwen3-like (same FLOPs)")]:
    a=jax.random.normal(k,(m,kk),jnp.bfloat16); b=jax.random.normal(k,(kk,n),jnp.bfloat16)
    f=jax.jit(jnp.dot); ms=t(f,a,b)
    print(f"| {name} | dense jnp.dot (cuBLAS) | {ms:.3f} ms | {2*m*kk*n/ms/1e9:.0f} TFLOP/s |")
    ms = t(jax.jit(lambda a, c: jnp.dot(a.T, c)), a, jax.random.normal(k, (m, n), jnp.bfloat16))
    print(f"| {name} dW | dense jnp.dot(xᵀ, dy) (cuBLAS) | {ms:.3f} ms | {2*m*kk*n/ms/1e9:.0f} TFLOP/s |")
