# Device check of the MoE kernels, in parts that each fit the 10-minute command limit; each
# builds first unless SKIP_BUILD=1 (a warm machine that already has this tree installed).
# PART=tests: the three MoE suites on the GPU ($OUT/checks.log). PART=sanitize: memcheck and
# racecheck of the bf16 kernel tests. PART=bench: ncu per-kernel times of one Mixtral SwiGLU
# layer step, bench_moe's layer table ($OUT/layer) and the language-model example in bf16.
set -u
export PYTHONUNBUFFERED=1
LOG=$OUT/checks.log
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import jax; print('jax', jax.__version__)"; } | tee -a $LOG
t0=$SECONDS
[[ "${SKIP_BUILD:-0}" == 1 ]] || PIT_ENABLE_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q . > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
echo "build $((SECONDS-t0))s"
if [[ "${PART:-tests}" == tests ]]; then
  echo "== pytest tests/test_moe_kernels.py tests/test_moe_matmul.py tests/test_nn_moe.py" >> $LOG
  timeout 500 python3 -P -m pytest tests/test_moe_kernels.py tests/test_moe_matmul.py tests/test_nn_moe.py -q -rs -p no:cacheprovider > /tmp/tests.log 2>&1
  grep -E "FAILED|Error" /tmp/tests.log | head -20 | tee -a $LOG
  tail -3 /tmp/tests.log | tee -a $LOG
  echo "tests $((SECONDS-t0))s"
elif [[ "$PART" == sanitize ]]; then
  export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform
  for tool in memcheck racecheck; do
    sel="bfloat16 and (routing_order or default)"
    echo "== $tool (tests/test_moe_kernels.py -k '$sel')" | tee -a $LOG
    timeout 250 compute-sanitizer --tool $tool --error-exitcode 97 --kernel-name kns=pit_moe python3 -P -m pytest tests/test_moe_kernels.py -k "$sel" -q -p no:cacheprovider -x 2>&1 | tail -3 | tee -a $LOG
    echo "$tool $((SECONDS-t0))s"
  done
else
  echo "== ncu: one SwiGLU layer step, Mixtral shape (T=4096, E=8, k=2, 4096->14336), bf16" >> $LOG
  # ncu writes to a file, not a pipe: a profiled process left behind by the timeout must not hold the pipe open
  timeout -k 5 120 ncu --kernel-name regex:pit_moe --metrics gpu__time_duration.sum python3 -P benchmarks/profile_moe.py > /tmp/ncu.log 2>&1
  grep -E "pit_moe|gpu__time" /tmp/ncu.log | sed 's/(const T1.*//; s/(long.*//; s/  */ /g' >> $LOG
  grep -E "gpu__time" $LOG | tr -s ' ' | tr '\n' ' '; echo
  echo "ncu $((SECONDS-t0))s"
  timeout 260 python3 benchmarks/bench_moe.py --no-projection --out $OUT/layer 2>&1 | grep "^|"
  echo "bench $((SECONDS-t0))s"
  timeout 150 python3 examples/moe_language_model.py --dtype bfloat16 --steps 60 --batch 32 --seq 256 --d 512 --d-ff 1024 --layers 4 --experts 8 --top-k 2 2>&1 | tr '\r' '\n' | grep -v "^  [a-z]* *\[.*\] [0-9]*/" > $OUT/lm_example.log
  tail -6 $OUT/lm_example.log
  echo "lm $((SECONDS-t0))s"
fi
