# What ran (warm H100, build 8a2047d): /tmp/p.py detects one 4096x4096 bf16 array, 10% of its
# tiles nonzero, twice per case (32x1 row, 1x4096 col); ncu serialises the kernels and times each.
cat > /tmp/p.py <<'PY'
import jax, jax.numpy as jnp, numpy as np, pit_jax
r = np.random.default_rng(0)
for tile, layout in [((32, 1), "row"), ((1, 4096), "col")]:
    keep = r.random((4096 // tile[0], 4096 // tile[1])) < 0.1
    x = jnp.asarray(np.repeat(np.repeat(keep, tile[0], 0), tile[1], 1) * r.standard_normal((4096, 4096)), jnp.bfloat16)
    f = jax.jit(lambda x: pit_jax.detect(x, tile, layout=layout).counts.sum())
    for _ in range(2): f(x).block_until_ready()
PY
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 5 140 ncu --clock-control none --cache-control none \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum -k regex:pit_detect \
  python3 -P /tmp/p.py 2>&1 | grep -E "pit_detect|duration|bytes" | sed 's/(Plan.*//; s/  */ /g'
