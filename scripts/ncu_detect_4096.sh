# Nsight Compute per-kernel times of one 4096x4096 bf16 detection (10% of tiles nonzero), twice per
# case (run from the repository root); ncu serialises the kernels. Usage: bash scripts/ncu_detect_4096.sh "32x1:row 64x64:row 1x1:row"
set -u
cat > /tmp/ncu_detect_cases.py <<'PY'
import sys
sys.path.insert(0, "benchmarks")  # common.py; -P keeps the source tree's pit_jax off the path
import jax, pit_jax
from common import tile_sparse_bf16
for spec in sys.argv[1:]:
    shape, layout = spec.split(":")
    tile = tuple(int(v) for v in shape.split("x"))
    x = tile_sparse_bf16(jax.random.PRNGKey(0), 4096, 4096, tile, 0.9, 1)[0]
    f = jax.jit(lambda x: pit_jax.detect(x, tile, layout=layout).counts.sum())
    print("case", spec, flush=True)
    for _ in range(2): f(x).block_until_ready()
PY
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 5 ${NCU_TIMEOUT:-150} ncu --clock-control none --cache-control none \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__registers_per_thread \
  -k regex:pit_detect python3 -P /tmp/ncu_detect_cases.py ${1:-32x1:row 64x64:row 1x1:row} 2>&1 \
  | grep -E "^case|pit_detect|duration|bytes|registers" | grep -v "==PROF==" | sed 's/(Plan.*)//; s/(const T1.*) (/ (/; s/  */ /g'
