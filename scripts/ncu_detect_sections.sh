# Nsight Compute sections (speed of light, memory workload, occupancy, warp states, launch stats) of
# one 4096x4096 bf16 detection (10% of TILE's tiles nonzero), called twice, next to XLA's own full
# read of the same array (a max-abs reduction, the read-bandwidth reference). Caches flushed before
# each kernel. Writes the report to stdout.
#   bash scripts/ncu_detect_sections.sh TILE KERNEL_REGEX [LAUNCH_SKIP] [LAUNCH_COUNT]
# Session 16 ran the mask pass against the reduction:  32x1 'pit_detect_mask|reduce|fusion' 2
# Session 17 ran the 1x1 rows kernel (4096 CTAs writing 64 MB of index): 1x1 'pit_detect_rows_kernel' 1 1
# (both sessions built x with numpy's generator inline; it now comes from benchmarks/common.py).
set -u
tile=$1 kernels=$2 skip=${3:-0} count=${4:-}
cat > /tmp/ncu_detect_sections.py <<'PY'
import sys
sys.path.insert(0, "benchmarks")  # common.py; -P keeps the source tree's pit_jax off the path
import jax, jax.numpy as jnp, pit_jax
from common import tile_sparse_bf16
tm, tk = (int(v) for v in sys.argv[1].split("x"))
x = tile_sparse_bf16(jax.random.PRNGKey(0), 4096, 4096, (tm, tk), 0.9, 1)[0]
f = jax.jit(lambda x: pit_jax.detect(x, (tm, tk)).counts.sum())
g = jax.jit(lambda x: jnp.max(jnp.abs(x)))
for _ in range(2):
    f(x).block_until_ready(); g(x).block_until_ready()
PY
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 5 ${NCU_TIMEOUT:-200} ncu --clock-control none --cache-control all \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
  --section LaunchStats --section SchedulerStats -k regex:"$kernels" --launch-skip "$skip" ${count:+--launch-count "$count"} \
  python3 -P /tmp/ncu_detect_sections.py "$tile" 2>&1 | grep -vE "^==PROF==|^    -+|^\s*$|OPT|Est. Speedup|^\s+(This|See|Check|Consider|The |On average|Occupancy|A wave)"
