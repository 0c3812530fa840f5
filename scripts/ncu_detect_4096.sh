# Nsight Compute per-kernel times of one 4096x4096 bf16 detection (10% of tiles nonzero), twice per
# case; ncu serialises the kernels. Usage: bash scripts/ncu_detect_4096.sh "32x1:row 64x64:row 1x1:row"
set -u
cat > /tmp/ncu_detect_cases.py <<'PY'
import sys
import jax, jax.numpy as jnp, numpy as np, pit_jax
r = np.random.default_rng(0)
for spec in sys.argv[1:]:
    shape, layout = spec.split(":")
    tile = tuple(int(v) for v in shape.split("x"))
    keep = r.random((4096 // tile[0], 4096 // tile[1])) < 0.1
    x = jnp.asarray(np.repeat(np.repeat(keep, tile[0], 0), tile[1], 1) * r.standard_normal((4096, 4096)), jnp.bfloat16)
    f = jax.jit(lambda x: pit_jax.detect(x, tile, layout=layout).counts.sum())
    print("case", spec, flush=True)
    for _ in range(2): f(x).block_until_ready()
PY
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 5 ${NCU_TIMEOUT:-150} ncu --clock-control none --cache-control none \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__registers_per_thread \
  -k regex:pit_detect python3 -P /tmp/ncu_detect_cases.py ${1:-32x1:row 64x64:row 1x1:row} 2>&1 \
  | grep -E "^case|pit_detect|duration|bytes|registers" | grep -v "==PROF==" | sed 's/(Plan.*)//; s/(const T1.*) (/ (/; s/  */ /g'
