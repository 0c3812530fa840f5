# Quick device check of the MoE kernels (iteration loop): build, kernel tests, per-kernel ncu times of one
# Mixtral layer step, forward projection times (raster sweep script, band 1), layer table.
set -u
export PYTHONUNBUFFERED=1
t0=$SECONDS
source scripts/cutlass_headers.sh; PIT_ENABLE_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q . > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
echo "build $((SECONDS-t0))s"
timeout 240 python3 -P -m pytest tests/test_moe_kernels.py -q -x -p no:cacheprovider 2>&1 | tail -3
echo "tests $((SECONDS-t0))s"
timeout 120 ncu --kernel-name regex:pit_moe --metrics gpu__time_duration.sum python3 -P benchmarks/profile_moe.py 2>&1 | grep -E "gpu__time" | tr -s ' ' | tr '\n' ' '
echo; echo "ncu $((SECONDS-t0))s"
timeout 240 python3 benchmarks/sweep_moe_raster.py --bands 1 --out $OUT/fwd 2>&1 | grep "^|"
[[ "${LAYER:-1}" == 1 ]] && timeout 200 python3 benchmarks/bench_moe.py --no-projection --layer-cases "Mixtral up T=4096" "Qwen3-30B-A3B-like" --out $OUT/layer 2>&1 | grep "^|"
echo "bench $((SECONDS-t0))s"
