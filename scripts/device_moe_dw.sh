set -u
export PYTHONUNBUFFERED=1
date -u; nvidia-smi --query-gpu=name --format=csv,noheader
t0=$SECONDS
PIT_ENABLE_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q . > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
echo "build $((SECONDS-t0))s"
python3 -P -m pytest tests/test_moe_kernels.py -q -rs -p no:cacheprovider 2>&1 | tail -5 | tee $OUT/moe_kernel_tests.log
echo "tests $((SECONDS-t0))s"
timeout 150 ncu --kernel-name regex:pit_ --metrics gpu__time_duration.sum python3 -P benchmarks/profile_moe.py 2>&1 | grep -E "pit_|gpu__time" | sed 's/(long.*//; s/  */ /g' > $OUT/ncu_moe_layer.txt; grep -A0 -E "tn_sm90|tn_kernel|forward_sm90" $OUT/ncu_moe_layer.txt | head -3; grep gpu__time $OUT/ncu_moe_layer.txt | head -20
echo "ncu $((SECONDS-t0))s"
timeout 200 python3 -P benchmarks/bench_moe.py --no-projection --layer-cases "Mixtral up T=4096" "Qwen3-30B-A3B-like" --out $OUT/layer 2>&1 | tail -25
echo "bench $((SECONDS-t0))s"
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform
timeout 150 compute-sanitizer --tool memcheck --error-exitcode 97 --kernel-name kns=pit_ python3 -P -m pytest tests/test_moe_kernels.py -k "gradients and bfloat16" -q -p no:cacheprovider -x 2>&1 | tail -4 | tee $OUT/memcheck_dw.log
echo "memcheck $((SECONDS-t0))s"
