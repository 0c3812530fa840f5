# Nsight Compute sections (speed of light, memory workload, occupancy, warp states, launch stats) of
# the detect mask pass at 4096² bf16 32x1 (10% of tiles nonzero), next to XLA's own full read of the
# same array (a max-abs reduction) as the read-bandwidth reference. Writes the report to stdout.
set -u
cat > /tmp/ncu_mask_sections.py <<'PY'
import jax, jax.numpy as jnp, numpy as np, pit_jax
r = np.random.default_rng(0)
keep = r.random((4096 // 32, 4096)) < 0.1
x = jnp.asarray(np.repeat(keep, 32, 0) * r.standard_normal((4096, 4096)), jnp.bfloat16)
f = jax.jit(lambda x: pit_jax.detect(x, (32, 1)).counts.sum())
g = jax.jit(lambda x: jnp.max(jnp.abs(x)))
for _ in range(2):
    f(x).block_until_ready(); g(x).block_until_ready()
PY
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 5 ${NCU_TIMEOUT:-200} ncu --clock-control none --cache-control all \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
  --section LaunchStats --section SchedulerStats -k regex:'pit_detect_mask|reduce|fusion' --launch-skip 2 \
  python3 -P /tmp/ncu_mask_sections.py 2>&1 | grep -vE "^==PROF==|^    -+|^\s*$|OPT|Est. Speedup|^\s+(This|See|Check|Consider|The |On average|Occupancy|A wave)"
