set -u
export PYTHONUNBUFFERED=1
PIT_ENABLE_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q . > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
t() { timeout -k 5 $1 python3 -P -m pytest "${@:2}" -q -rf -p no:cacheprovider 2>&1 | grep -E "FAILED|passed|failed|^E " | head -8; }
t 100 tests/test_moe_kernels.py -k routing_kernel
t 200 tests/test_moe_kernels.py tests/test_moe_matmul.py
for tool in memcheck racecheck; do
  XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout -k 5 120 compute-sanitizer --tool $tool --error-exitcode 97 --kernel-name kns=pit_moe_route python3 -P -m pytest tests/test_moe_kernels.py -k "routing_kernel and not 20000" -v -p no:cacheprovider > $OUT/${tool}_route.log 2>&1; echo "$tool rc $?"
  grep -E "passed|failed|SUMMARY" $OUT/${tool}_route.log | tail -3
done
timeout -k 5 120 python3 benchmarks/bench_moe.py --no-layer --cases "Qwen3-30B-A3B-like" --out $OUT/projection_qwen 2>&1 | grep -E "^\| [MQ]|Error" | tail -4
