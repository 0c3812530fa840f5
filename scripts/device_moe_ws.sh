# One device run for the MoE kernels: build, kernel tests, ncu of a layer step, layer and
# projection tables, memcheck/racecheck of the Hopper kernels. Results under $OUT
# (checks.log: tests, ncu, sanitizers; layer/ and proj/: bench_moe tables).
set -u
export PYTHONUNBUFFERED=1
LOG=$OUT/checks.log
{ date -u; nvidia-smi --query-gpu=name --format=csv,noheader; python3 -c "import jax; print('jax', jax.__version__)"; } | tee -a $LOG
t0=$SECONDS
PIT_ENABLE_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q . > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
echo "build $((SECONDS-t0))s"
timeout 240 python3 -P -m pytest tests/test_moe_kernels.py -q -x -rs -p no:cacheprovider > /tmp/tests.log 2>&1
tail -15 /tmp/tests.log | tee -a $LOG
if ! tail -1 /tmp/tests.log | grep -q " passed" || tail -1 /tmp/tests.log | grep -q "failed"; then echo "TESTS FAILED: stop"; exit 1; fi
echo "tests $((SECONDS-t0))s"
timeout 150 ncu --kernel-name regex:pit_ --metrics gpu__time_duration.sum python3 -P benchmarks/profile_moe.py 2>&1 | grep -E "pit_|gpu__time" | sed 's/(long.*//; s/  */ /g' > /tmp/ncu.txt
cat /tmp/ncu.txt >> $LOG; grep gpu__time /tmp/ncu.txt | tr '\n' ' '; echo
echo "ncu $((SECONDS-t0))s"
timeout 200 python3 benchmarks/bench_moe.py --no-projection --layer-cases "Mixtral up T=4096" "Qwen3-30B-A3B-like" --out $OUT/layer 2>&1 | grep "^|"
echo "layer bench $((SECONDS-t0))s"
timeout 200 python3 benchmarks/bench_moe.py --no-layer --cases ${PROJ_CASES:-"Mixtral up T=4096" "Qwen3-30B-A3B-like"} --out $OUT/proj 2>&1 | grep "^|"
echo "projection bench $((SECONDS-t0))s"
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform
for tool in memcheck racecheck; do
  echo "== $tool" >> $LOG
  timeout 120 compute-sanitizer --tool $tool --error-exitcode 97 --kernel-name kns=pit_moe python3 -P -m pytest tests/test_moe_kernels.py -k "bfloat16 and (gradients or 300)" -q -p no:cacheprovider -x 2>&1 | tail -3 | tee -a $LOG
  echo "$tool $((SECONDS-t0))s"
done
