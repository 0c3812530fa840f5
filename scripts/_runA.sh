set -u
export PYTHONUNBUFFERED=1
PIT_ENABLE_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q . > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 -P -m pytest tests/test_kgather.py -k auto_matches -q -rf -p no:cacheprovider 2>&1 | grep -E "FAILED|passed|failed|assert" | head -12
XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout -k 5 150 compute-sanitizer --tool memcheck --kernel-name kns=pit_moe_route python3 -P -m pytest tests/test_moe_kernels.py -k routing_kernel -v -p no:cacheprovider > $OUT/memcheck_route.log 2>&1; echo "memcheck rc $?"
grep -E "PASSED|FAILED|ERROR SUMMARY|Segmentation|routing_kernel" $OUT/memcheck_route.log | tail -12
timeout -k 5 250 python3 benchmarks/bench_moe.py --no-layer --cases "Qwen3-30B-A3B-like" "Mixtral up T=4096" --out $OUT/projection 2>&1 | grep -E "^\| [MQ]|Error" | tail -8
timeout -k 5 100 python3 benchmarks/bench_kgather_auto.py --out $OUT/auto 2>&1 | grep -E "^\| [4O]|Error"
