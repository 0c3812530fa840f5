set -u
export PYTHONUNBUFFERED=1
t0=$SECONDS
PIT_ENABLE_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q . > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
echo "build $((SECONDS-t0))s"
timeout 240 python3 benchmarks/sweep_moe_raster.py --out $OUT 2>&1 | grep "^|"
echo "sweep $((SECONDS-t0))s"
for band in 1 8; do
  echo "=== ncu band $band" | tee -a $OUT/ncu_forward.txt
  PIT_MOE_COL_BAND=$band timeout 120 ncu --kernel-name regex:forward_sm90 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats python3 -P benchmarks/profile_moe.py > /tmp/ncu_$band.txt 2>&1
  grep -vE "^==PROF==|^ *$|----" /tmp/ncu_$band.txt | grep -v "^    [A-Z][a-z].*\. *$" >> $OUT/ncu_forward.txt
done
grep -E "Duration|DRAM Throughput|Memory Throughput|L2 Hit|Compute \(SM\)|Stall|Issue Slots|No Eligible|Eligible Warps|Warp Cycles" $OUT/ncu_forward.txt | head -60
echo "ncu $((SECONDS-t0))s"
