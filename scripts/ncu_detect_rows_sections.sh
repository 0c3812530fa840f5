# Nsight Compute sections (speed of light, memory workload, occupancy, warp states, launch stats) of
# the detect rows kernel at 4096² bf16 1x1 tiles (10% nonzero): 4096 CTAs writing 64 MB of index in
# 43 us (session 16), about 1.4 TB/s. Its second call is profiled. Writes the report to stdout.
set -u
cat > /tmp/ncu_rows_sections.py <<'PY'
import jax, jax.numpy as jnp, numpy as np, pit_jax
r = np.random.default_rng(0)
keep = r.random((4096, 4096)) < 0.1
x = jnp.asarray(keep * r.standard_normal((4096, 4096)), jnp.bfloat16)
f = jax.jit(lambda x: pit_jax.detect(x, (1, 1)).counts.sum())
for _ in range(2):
    f(x).block_until_ready()
PY
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 5 ${NCU_TIMEOUT:-200} ncu --clock-control none --cache-control all \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
  --section LaunchStats --section SchedulerStats -k regex:'pit_detect_rows_kernel' --launch-skip 1 --launch-count 1 \
  python3 -P /tmp/ncu_rows_sections.py 2>&1 | grep -vE "^==PROF==|^    -+|^\s*$|OPT|Est. Speedup|^\s+(This|See|Check|Consider|The |On average|Occupancy|A wave)"
