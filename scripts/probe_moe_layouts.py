"""Runs each grouped-matmul layout (x_sorted, out_sorted, w transposed) and dW layout once at a
given shape, each in its own process with a time limit, and prints ms or TIMEOUT/ERROR — to find
a configuration that hangs or fails on the device.

    python scripts/probe_moe_layouts.py [T E k d f]
"""
import itertools
import subprocess
import sys

CHILD = r'''
import sys, time, jax, jax.numpy as jnp, numpy as np
import pit_jax
from pit_jax.moe import moe_matmul_p, moe_matmul_tn_p
t, e, k, d, f = map(int, sys.argv[1:6]); kind, xs, os_ = sys.argv[6], sys.argv[7] == "1", sys.argv[8] == "1"
key = jax.random.PRNGKey(0)
ids = jax.random.randint(key, (t, k), 0, e, jnp.int32)
r = pit_jax.moe_routing(ids, e)
x = jax.random.normal(key, (t * k if xs else t, d), jnp.bfloat16)
rps = 1 if xs else k
if kind == "tn":
    dy = jax.random.normal(key, (t * k, f), jnp.bfloat16)
    fn = jax.jit(lambda x, dy: moe_matmul_tn_p.bind(x, dy, r.order, r.group_starts, rows_per_source=rps,
                 num_experts=e, out_dtype=jnp.bfloat16, x_sorted=xs, out_sorted=os_))
    args = (x, dy)
else:
    wt = kind == "fwdT"
    w = jax.random.normal(key, (e, f, d) if wt else (e, d, f), jnp.bfloat16)
    fn = jax.jit(lambda x, w: moe_matmul_p.bind(x, w, *r, rows_per_source=rps, w_transposed=wt,
                 x_sorted=xs, out_sorted=os_))
    args = (x, w)
jax.block_until_ready(fn(*args))
t0 = time.perf_counter()
for _ in range(5):
    out = fn(*args)
jax.block_until_ready(out)
print(f"{(time.perf_counter() - t0) / 5 * 1e3:.3f}")
'''


def main():
    shape = sys.argv[1:6] or ["4096", "8", "2", "1024", "1024"]
    for kind, xs, os_ in itertools.product(("fwd", "fwdT", "tn"), "01", "01"):
        try:
            p = subprocess.run([sys.executable, "-P", "-c", CHILD, *shape, kind, xs, os_], capture_output=True,
                               text=True, timeout=40)
            res = p.stdout.strip() if p.returncode == 0 else "ERROR " + p.stderr.strip().splitlines()[-1][:150]
        except subprocess.TimeoutExpired:
            res = "TIMEOUT"
        print(f"{kind:5s} x_sorted={xs} out_sorted={os_}: {res}", flush=True)


if __name__ == "__main__":
    main()
