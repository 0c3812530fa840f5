#!/usr/bin/env bash
# GPU check: build pit_jax with CUDA, run the whole test suite on the GPU (every test compares
# the GPU with the CPU reference in the same process), run compute-sanitizer memcheck and
# racecheck over the kernel tests, run the benchmarks, and print a summary.
#
#   bash scripts/gpu_check.sh [RESULTS_DIR]     (default: $OUT if set, else benchmarks/results)
set -uo pipefail
RESULTS=${1:-${OUT:-benchmarks/results}}
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
declare -A STATUS

step() {  # step NAME CMD...: run, record pass/fail
  local name=$1; shift
  echo; echo "=== $name: $*"
  local t0=$SECONDS
  if "$@"; then STATUS[$name]="pass ($((SECONDS - t0))s)"; else STATUS[$name]="FAIL rc=$? ($((SECONDS - t0))s)"; fi
}

echo "date: $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
$PY -c "import sys, jax, jaxlib; print('python', sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
nvcc --version | tail -1

source scripts/cutlass_headers.sh  # CUTLASS headers for the staged MoE forward
# SKIP_BUILD=1: test the installed build (a warm machine that already built this tree)
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  step build env PIT_ENABLE_CUDA=ON $PY -m pip install --no-build-isolation --no-deps -q -v .
fi
$PY -P -c "import pit_jax; print(pit_jax.build_info())"

# -P: do not put the source tree on sys.path, so the installed (compiled) package is tested.
# TESTS="tests/test_x.py ..." narrows the suite (default: all of tests/); TESTS=none skips it.
[[ "${TESTS:-}" == none ]] || step tests $PY -P -m pytest ${TESTS:-tests} -q -rs -p no:cacheprovider

# BENCHES="detect moe" picks benchmarks (default: all); each is bounded by BENCH_TIMEOUT seconds.
# BENCHES=none runs none.
BENCHES=${BENCHES:-$(cd benchmarks && ls bench_*.py | sed 's/^bench_//; s/\.py$//')}
[[ "$BENCHES" == none ]] && BENCHES=""
for b in $BENCHES; do
  step "bench_$b" timeout "${BENCH_TIMEOUT:-300}" $PY "benchmarks/bench_$b.py" --out "$RESULTS"
done

# Per-kernel device times for the largest k-gather case (Nsight Compute; informational).
if [[ "${NCU:-1}" == 1 ]] && command -v ncu >/dev/null; then
  echo; echo "=== ncu: per-kernel times, 16384x16384 bf16, tile 32x1 and 1x16384"
  for c in 4 5; do
    timeout 180 ncu --kernel-name regex:pit_detect --launch-count 8 --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
      $PY benchmarks/bench_detect.py --case $c --out /tmp/ncu_bench 2>&1 | grep -E "pit_detect|gpu__time_duration|dram__bytes" | sed 's/(long.*//' | head -40
  done
fi

if [[ "${NCU:-1}" == 1 ]] && command -v ncu >/dev/null; then
  echo; echo "=== ncu: k-gather kernels, 4096^3 bf16, tile 32x1 (each sparsity: detect, pack, gemm; then dW)"
  timeout 240 ncu --kernel-name regex:pit_ --metrics gpu__time_duration.sum $PY benchmarks/profile_kgather.py --sparsity 0.0 0.5 0.9 0.99 2>&1 \
    | grep -E "sparsity|pit_|gpu__time_duration" | sed 's/(long.*//; s/  */ /g' | head -80
fi

# Sanitizers last (slow); each is bounded so a hang cannot eat the run. SANITIZE=0 skips them.
if [[ "${SANITIZE:-1}" == 1 ]]; then
SAN_TIMEOUT=${SAN_TIMEOUT:-240}
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform  # one cudaMalloc per buffer: OOB is visible
FILTER=()
SAN_HELP=$(compute-sanitizer --help 2>&1 || true)  # no grep -q in a pipe: SIGPIPE under pipefail
if [[ "$SAN_HELP" == *"--kernel-name"* ]]; then FILTER=(--kernel-name kns=pit_); fi
DETECT_SAN=(tests/test_detect.py -k "gpu and (dtypes_and_sparsity or unaligned or special or deterministic or jnp_reference)")
MOE_SAN=(tests/test_moe_kernels.py -k "bfloat16 or float32 or routing")
KGATHER_SAN=(tests/test_kgather_kernels.py -k "gpu and (0.5 or 1.0 or garbage or many_row or dense_sparse)")
for san in memcheck:97 racecheck:98 synccheck:96; do
  tool=${san%%:*}; code=${san##*:}
  [[ "${SAN_SETS:-detect kgather moe}" == *detect* ]] && step "${tool}" timeout $SAN_TIMEOUT compute-sanitizer --tool $tool --error-exitcode $code "${FILTER[@]}" $PY -P -m pytest "${DETECT_SAN[@]}" -q -p no:cacheprovider -x
  [[ "${SAN_SETS:-detect kgather moe}" == *moe* ]] && step "${tool}_moe" timeout $SAN_TIMEOUT compute-sanitizer --tool $tool --error-exitcode $code "${FILTER[@]}" $PY -P -m pytest "${MOE_SAN[@]}" -q -p no:cacheprovider -x
  [[ "${SAN_SETS:-detect kgather moe}" == *kgather* ]] && step "${tool}_kgather" timeout $SAN_TIMEOUT compute-sanitizer --tool $tool --error-exitcode $code "${FILTER[@]}" $PY -P -m pytest "${KGATHER_SAN[@]}" -q -p no:cacheprovider -x
done
unset XLA_PYTHON_CLIENT_PREALLOCATE XLA_PYTHON_CLIENT_ALLOCATOR
fi


echo; echo "=== summary"
for k in build tests $(for b in $BENCHES; do echo "bench_$b"; done) memcheck memcheck_kgather memcheck_moe racecheck racecheck_kgather racecheck_moe synccheck synccheck_kgather synccheck_moe; do
  printf '%-12s %s\n' "$k" "${STATUS[$k]:-not run}"
done
