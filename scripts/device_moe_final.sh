# Device check of the MoE work, part 1: build, the MoE test suites on the GPU, memcheck and
# racecheck of the kernel tests, per-kernel ncu times of one Mixtral layer step, and the
# language-model example in bf16. Results under $OUT (checks.log, lm_example.log).
set -u
export PYTHONUNBUFFERED=1
LOG=$OUT/checks.log
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import jax; print('jax', jax.__version__)"; } | tee -a $LOG
t0=$SECONDS
PIT_ENABLE_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q . > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
echo "build $((SECONDS-t0))s"
echo "== pytest tests/test_moe_kernels.py tests/test_moe_matmul.py tests/test_nn_moe.py" >> $LOG
timeout 300 python3 -P -m pytest tests/test_moe_kernels.py tests/test_moe_matmul.py tests/test_nn_moe.py -q -rs -p no:cacheprovider > /tmp/tests.log 2>&1
tail -8 /tmp/tests.log | tee -a $LOG
echo "tests $((SECONDS-t0))s"
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform
for tool in memcheck racecheck; do
  echo "== $tool (tests/test_moe_kernels.py -k 'bfloat16 or routing')" | tee -a $LOG
  timeout 150 compute-sanitizer --tool $tool --error-exitcode 97 --kernel-name kns=pit_moe python3 -P -m pytest tests/test_moe_kernels.py -k "bfloat16 or routing" -q -p no:cacheprovider -x 2>&1 | tail -3 | tee -a $LOG
  echo "$tool $((SECONDS-t0))s"
done
unset XLA_PYTHON_CLIENT_PREALLOCATE XLA_PYTHON_CLIENT_ALLOCATOR
echo "== ncu: one SwiGLU layer step, Mixtral shape (T=4096, E=8, k=2, 4096->14336), bf16" >> $LOG
timeout 120 ncu --kernel-name regex:pit_moe --metrics gpu__time_duration.sum python3 -P benchmarks/profile_moe.py 2>&1 | grep -E "pit_moe|gpu__time" | sed 's/(long.*//; s/  */ /g' >> $LOG
grep gpu__time $LOG | tr -s ' ' | tr '\n' ' '; echo
echo "ncu $((SECONDS-t0))s"
timeout 200 python3 examples/moe_language_model.py --dtype bfloat16 --steps 60 --batch 32 --seq 256 --d 512 --d-ff 1024 --layers 4 --experts 8 --top-k 2 2>&1 | tr '\r' '\n' | grep -v "^  [a-z]* *\[.*\] [0-9]*/" > $OUT/lm_example.log
tail -6 $OUT/lm_example.log
echo "lm $((SECONDS-t0))s"
