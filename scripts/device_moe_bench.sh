# Device check of the MoE work, part 2: bench_moe's projection table (Mixtral T=4096 and 16384,
# Qwen3-like; uniform, Zipf, one-hot) and layer table. Results under $OUT/bench.
set -u
export PYTHONUNBUFFERED=1
t0=$SECONDS
python3 -c "import pit_jax, sys; sys.exit(0 if pit_jax.cuda_available() else 1)" 2>/dev/null || \
  source scripts/cutlass_headers.sh; PIT_ENABLE_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q . > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
echo "build $((SECONDS-t0))s"
timeout 520 python3 benchmarks/bench_moe.py --out $OUT/bench 2>&1 | grep -E "^\||^#"
echo "bench $((SECONDS-t0))s"
