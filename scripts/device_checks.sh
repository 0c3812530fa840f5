# Device check of the MoE and detect kernels, in parts that each fit the 10-minute command
# limit; each builds first unless SKIP_BUILD=1 (a warm machine that already has this tree
# installed). Output goes to $OUT/checks.log.
#   PART=tests:    the MoE suites and the detect suites on the GPU (GPU vs CPU / float64).
#   PART=sanitize: compute-sanitizer memcheck and racecheck over the bf16 MoE kernel tests (fused
#                  epilogues, row layouts), the MoE routing tests and the detect kernel tests.
#   PART=bench:    bench_moe_epilogues ($OUT/epilogues), bench_detect ($OUT/detect) and
#                  bench_moe's layer table ($OUT/layer).
#   PART=final:    one pass for a last build: fused-epilogue MoE tests, the detect suites (also
#                  with PIT_DETECT_IN_FLIGHT=8), the sanitizers, bench_moe_epilogues, the 4096²
#                  detect cases twice per in-flight setting, then the full detect and layer tables.
#   PART=kgather:  the k-gather suites on the GPU and bench_sparse_dense for 32x1 tiles without
#                  BCOO ($OUT/sparse_dense): the dW rule against the forced dW kernel.
#   PART=persistent: the persistent Hopper forward (PIT_MOE_PERSISTENT=1): its MoE kernel tests,
#                  memcheck and racecheck on them, and bench_moe_persistent (tiled vs persistent in
#                  one process, $OUT/persistent).
#   PART=hostsync: probe_host_sync.py with XLA's default command buffers and with CONDITIONAL
#                  added ($OUT/hostsync_default, $OUT/hostsync_conditional).
#   PART=ncu_persistent: Nsight Compute sections (speed of light, memory workload) of the tiled and
#                  the persistent forward, Mixtral one-hot and Qwen-like uniform ($OUT/ncu_persistent.txt).
#   PART=colband: the MoE kernel tests, then the forward raster band A/B (PIT_MOE_COL_BAND=1 vs
#                  the handler's shape rule, $OUT/colband) and the Qwen-like layer table ($OUT/layer).
#   PART=verify:   every GPU suite of a build: MoE, detect and k-gather (GPU vs CPU / float64); SUITES="moe" etc.
#                  runs a subset.
#   PART=projection: bench_moe's projection table, Qwen-like and Mixtral T=4096 ($OUT/projection).
#   PART=route_prefetch: the MoE kernel tests, the A/B of the routing kernels' id prefetch
#                  (PIT_MOE_ROUTE_PREFETCH=0 vs default, $OUT/route_prefetch), then PART=sanitize.
#   PART=memcheck_pdl: memcheck over the fused-epilogue MoE tests (verbose, $OUT/memcheck_pdl*.log)
#                  with PIT_MOE_PDL=0, then with dependent launches on.
#   PART=pdl_modes: PIT_MOE_PDL=0 and =2 (routing only) each against the default, 5 rounds.
#   PART=auto:     bench_kgather_auto (tile="auto" as installed vs auto given a detected index, $OUT/auto).
#   PART=detect_probe: bench_detect_ab over CASES (default "0 2") and VARIANTS (default: the handler's
#                  rule against PIT_DETECT_IN_FLIGHT=16), with XLA's column-OR probe and the host
#                  dispatch fraction ($OUT/detect_ab); with CB_FLAGS set, again under XLA_FLAGS=$CB_FLAGS
#                  ($OUT/detect_ab_cb).
#   PART=dispatch: probe_detect_dispatch.py (what the jitted step returns, calls per step; $OUT/dispatch),
#                  then bench_detect.py ($OUT/detect).
#   PART=detect_gpu: the detect suites on the GPU, memcheck and racecheck over the detect kernel tests
#                  (the chunked-path edges included).
#   PART=detect_ab_jit: an in-process A/B with the index kept in the jit (bench_detect_ab --returns counts; "total" before session 29):
#                  PIT_DETECT_IN_FLIGHT=16 against the rule at 4096² ($OUT/ab_inflight); then bench_detect.
#                  (Session 11 also A/B'd a dependent-launch chain for the chunked path here; that switch
#                  was reverted with its patch, see benchmarks/results/2026-11-27_session11/.)
#   PART=kgather_ab: bench_kgather_ab over VARIANTS (environment switches the k-gather handler reads;
#                  session 11 ran "default PIT_KGATHER_STAGED_STORE=0" and "default PIT_KGATHER_STAGES=2",
#                  switches removed once the staged output tile and the 2-stage ring were kept), $OUT/kgather_ab.
#   PART=kgather_gpu: the k-gather suites on the GPU, memcheck and racecheck over the k-gather kernel tests.
#   PART=kgather_final: the k-gather suites, memcheck and racecheck in three chunks (the tool's own process
#                  segfaulted at times over all 52 tests at once), bench_sparse_dense for 32x1 tiles with
#                  BCOO ($OUT/sparse_dense) and bench_kgather_ab with the default only ($OUT/kgather_ab).
#   PART=ncu_kgather: Nsight Compute (speed of light, memory, occupancy, warp stalls) of the k-gather
#                  forward GEMM at 4096³ 90/99% and fc2 99% ($OUT/ncu_forward.txt). Session 12 ran it
#                  beside the kernel tests and A/Bs of ring shapes, dependent launches and bulk-copy loads
#                  (switches removed with their code: benchmarks/results/2026-11-27_session12/).
#   PART=moe_ab:   bench_moe_persistent's A/B of SWITCH ("NAME A B", default tiled vs persistent forward),
#                  forward kernels and the projection's dW ($OUT/moe_ab). Session 12 ran it (then named
#                  moe_release_ab, after the MoE kernel tests) for PIT_MOE_WARP_RELEASE, a switch removed with
#                  its code (benchmarks/results/2026-11-27_session12/).
#   PART=detect_prefix: the detect suites, memcheck and racecheck over the detect kernel tests (word rows
#                  included), the A/B of per-CTA prefix offsets (default vs PIT_DETECT_PREFIX=0, index kept in the
#                  jit, $OUT/ab_prefix), then (unless KGATHER=0) the tile="auto" tests and memcheck over the fp32
#                  k-gather kernel tests.
#   PART=ncu:      ncu per-kernel times of one Mixtral SwiGLU layer step and the language-model
#                  example in bf16.
#   PART=kgather_fused: the fused detect+pack forward (session 13): the k-gather suites with its tests on the
#                  GPU, memcheck and racecheck over its tests, bench_sparse_dense for 32x1 tiles with BCOO
#                  ($OUT/sparse_dense), the A/B against the separate kernels (PIT_KGATHER_FUSED=0, read when
#                  lowering: each variant gets its own jit), $OUT/kgather_ab.
#   (PART=pairs, session 14: the CTA-pair forward's tests, A/B and sanitizers; removed with that code,
#                  benchmarks/results/2026-11-27_session14/.)
#   PART=ncu_dense: Nsight Compute of the dense matmul (cuBLAS) vs pit's forward, Mixtral projection ($OUT/ncu_dense.txt).
#   PART=ncu_stalls: warp stall reasons per issued instruction, dense matmul vs pit's forward ($OUT/ncu_stalls.txt).
#   (PART=kgather_scan, session 14's block-scan A/B: the fused tests now run every scan variant themselves, so
#                  it is PART=kgather_fused TEST_FILES=tests/test_kgather_fused.py SAN=0 SPARSE_DENSE=0
#                  VARIANTS="default PIT_KGATHER_FUSED_SCAN=raking PIT_KGATHER_FUSED_SCAN=warp".)
#   PART=detect_write_order: the detect suites, memcheck and racecheck over the write-order, word-rows,
#                  grouped-prefix, row-bits, chunked-edge and dtype tests, then in-process A/Bs (index kept in the jit) at
#                  CASES (bench_detect's case numbers, default "3 0": 4096² 1x1 and 32x1) and SPARSITIES
#                  (default 0.9 0.5 0.0) of default against VARIANTS (default PIT_DETECT_WARP_IDS=0: each
#                  thread writing its own word's ids), $OUT/ab_write_order_*; then bench_detect ($OUT/detect).
#                  Session 16 also ran it as PART=detect_fill_first with PIT_DETECT_FILL_FIRST=0 (removed with
#                  its code), and as PART=detect_prefix_overlap, now CASES="0 2 1" SPARSITIES=0.9
#                  VARIANTS="PIT_DETECT_PREFIX=serial PIT_DETECT_PREFIX=0"; session 15's PART=detect_rowbits is
#                  CASES="1 5" SPARSITIES=0.9 VARIANTS="PIT_DETECT_ROW_BITS=single PIT_DETECT_ROW_BITS=0".
#   PART=detect_chunked: the detect suites, memcheck and racecheck over the chunked-path edge tests.
#   PART=route_ncu: the routing kernels' ncu device times alone.
#   PART=projection_qwen: bench_moe's projection table for the Qwen-like case alone.
#   PART=layer_qwen: bench_moe's layer table for the Qwen-like case alone.
#   PART=ncu_projection_dram: ncu DRAM bytes, L2 hit rate, SM and DRAM throughput of the gathered forward
#                  (bench_moe case CASE, default Qwen-like; ROUTINGS), tables given, caches flushed, real clocks;
#                  with waves per SM and SM active cycles (mean and max over SMs against the elapsed cycles:
#                  how much of the kernel's time its SMs sit idle in the last wave).
#   PART=detect_segments: the row-bits detect tests on the GPU, memcheck and racecheck over them (new
#                  paths only), then an A/B at 4096² 1×4096 col, 90% sparse and dense: the segments kernel
#                  against VARIANTS (default PIT_DETECT_ROW_BITS=single, one CTA per column block). Session 18
#                  ran it with VARIANTS=PIT_DETECT_SEGMENTS_OLD=1, a switch of its trial tree only.
#   PART=staged:   the staged MoE forward's tests (kernel fixture variant, fused-epilogue and lowering tests
#                  too; STAGED_TESTS another -k), memcheck, racecheck.
#   PART=staged_ab: PIT_MOE_STAGED=0 vs 1 on the forward projection parts ($OUT/staged_ab).
#   PART=staged_layer: the Mixtral layer table on the landed rules, then the staged forward and dW A/Bs at T=16384.
#   PART=moe_suites: the three MoE suites on the GPU.
#   PART=scatter_epilogue: the staged tests, then the scattered projection's A/B (fused vs staged with the
#                  epilogue's SWrite) at Mixtral T=4096 and 16384; PART=scatter_epilogue_san: its sanitizers.
#   PART=staged_split: the staged tests, then the A/B of the forward's row blocks (PIT_MOE_STAGED_SPLIT=0 vs default).
#   PART=examples: the sparse-training MLP and the MoE language model on the GPU, timed.
#   PART=layer_kernels: per-kernel device times of one Mixtral layer training step, pit and dense (JAX profiler).
#   PART=projection_mixtral: bench_moe's projection table for Mixtral T=4096 alone ($OUT/projection_mixtral).
#   PART=layer_mixtral: bench_moe's layer table for Mixtral T=4096 alone ($OUT/layer_mixtral).
#   PART=projection_16k: bench_moe's projection table for Mixtral T=16384 alone ($OUT/projection_16k).
#   PART=route_two_launch: the two-launch routing's tests, ncu times, A/B and sanitizers (session 22; its
#                  PART=route_one_pass, a one-launch routing, was rejected with its code).
#   PART=route_sanitize: memcheck and racecheck over the routing kernel tests.
#   PART=skip_idle_half: session 23: the tiled forward's second warpgroup skipping its MMAs on a last tile of
#                  <= 64 rows — its tests and the fused-kernel tests, the A/B (PIT_MOE_SKIP_IDLE_HALF=0 vs
#                  default) on the Qwen-like shape for three routings; PART=skip_idle_half_san: memcheck and
#                  racecheck over the new tests (then PART=projection_qwen for the table). PART=two_ended: the
#                  forward's row tiles taken alternately from both ends of the routing (PIT_MOE_TWO_ENDED=0 vs 1).
#                  PART=two_ended_default: its A/B once both ends became the default for few rows per expert,
#                  then the Qwen-like table; PART=ab_4calls: both A/Bs with the Qwen-like calls 4 per jitted step.
#   PART=dispatch_bound: probe_dispatch_bound.py (one vs four calls per jitted step; the host's µs per call).
#   PART=nn_moe_suite: tests/test_nn_moe.py alone on the GPU.
#   PART=route_cluster (session 24, ran in session 25, also with order written through per-CTA slices): the
#                  one-cluster routing's tests, sanitizers, ncu and A/B; no gain, removed with its code.
#   PART=prefetch_next (session 24, ran in session 25): PIT_MOE_PREFETCH_NEXT's tests, memcheck and Qwen-like A/B;
#                  no gain, switch removed with its code (benchmarks/results/2026-11-28_session25/).
#   PART=route_tool_crash: the 16384 x 139 routing tests one per process under memcheck and racecheck, rank path
#                  and three launches (the tool crashed there in session 24's chunked run).
#   (PART=route_wide, session 26: the wide routing kernels' tests, A/B and ncu times; removed with that code,
#                  benchmarks/results/2026-11-28_session26/.)
#   (PART=route_batch_loads, PART=route_ballots and PART=route_rank_scan, session 26: the rank kernel's count loads
#                  batched, equal bins found by ballots instead of __match_any_sync, the bin scan by CUB's warp
#                  scans instead of raking — tests, A/Bs or ncu times, route_in_call; removed with their code, no gain.)
#   (PART=l2_prefetch, session 27: the forward's first CTAs asking their likely weights into L2 before the routing
#                  ends, and the rank kernel scheduling its dependents before its wait — tests and A/Bs; removed with
#                  their code: no gain with the routing in the call, 2-8% slower given the tables.)
#   (PART=route_one_cta, session 27: the routing of up to 16384 assignments in one CTA — tests, A/B, ncu; removed
#                  with its code: 49-50 us under ncu on the Qwen-like uniform routing against ~15 for count + rank.)
#   (PART=tail_split, session 27: the gathered forward's ragged last wave split along K — tests, A/B, memcheck,
#                  racecheck; removed with its code: 6-11% slower, benchmarks/results/2026-11-28_session27/.)
#   (PART=route_rank_threads, session 27: the rank kernel with 256 threads, one per bin — tests, A/B, ncu, memcheck,
#                  racecheck; removed with its code: A/B 0.997-1.002, ncu 1.3 us slower on the Qwen-like routing.)
#   PART=route_order: session 27: profile_route_in_call.py alone (its step period and kernel order).
#   PART=route_in_call: profile_route_in_call.py (the routing's exposed time inside the Qwen-like call, with and
#                  without dependent launches) and ncu of the routing kernels at the card's clocks (session 24).
#   PART=ncu_detect_1x1: Nsight Compute sections of the detect 1x1 rows kernel ($OUT/ncu_detect_1x1_rows.txt).
#                  Session 17's part route_profile was PART="route_ncu ncu_detect_1x1 layer_qwen" (its layer
#                  table went to $OUT/layer).
#   PART=moe_fast_rows: MoE forward tests, memcheck, then the A/B of the producer's
#                  unpredicated copies for whole gathered rows (PIT_MOE_FAST_ROWS=0 vs 1, $OUT/moe_fast_rows_ab).
#   PART=kgather_parts: the detect suites on the GPU, then where a sparse_dense call's time goes
#                  (probe_kgather_parts.py: dense, copy, XLA's read of x, detection under VARIANTS, pack +
#                  forward, the whole call) at SHAPES ("M K N@sparsities;..."), then ncu per-kernel times at
#                  real clocks (--clock-control none, L2 not flushed) of one fc2 99% call ($OUT/ncu_parts.txt).
#   PART=detect_one_pass: session 28: the one-pass word-rows detect kernel — the detect suites, then the A/B
#                  (index kept in the jit) of the default against PIT_DETECT_ONE_PASS=0 and =1 over CASES
#                  (default "0 3 4": 4096² 32x1 and 1x1, 16384² 32x1; 7 is 16 x 4096² 32x1) at SPARSITIES
#                  (default 0.9 0.0); TESTS=one_pass runs only the one-pass tests. Session 28 also ran it on a
#                  tree with clusters of CTAs per row block (rejected; benchmarks/results/2026-11-28_session28/).
#   PART=detect_one_pass_san: memcheck over the one-pass tests (default and forced), racecheck over the forced ones.
#   PART=detect_bench: bench_detect alone ($OUT/detect, or $OUT/$BENCH_OUT; BENCH_OUT also names the
#                  bench_detect folder of detect_ab_jit and detect_write_order). About 35 s on an H200.
#   PART=detect_profile: session 29: profile_detect_kernels.py over PROFILE_CASES (bench_detect's CASES,
#                  0-6; default "0 2"), VARIANTS (default "default") and extra step forms FORMS (default
#                  "total"): per-kernel durations and gaps inside the jitted loop ($OUT/detect_profile).
#   PART=detect_san: detect_gpu's memcheck and racecheck sets without the suites.
#   The detect A/B parts run bench_detect_ab.py with --returns $RETURNS (default "counts": the stacked
#   counts; "total", one count sum per call, was the form before session 29).
#   PART=kgather_loads: session 30: forward_ladder.cu first, then the k-gather kernel and fused suites,
#                  memcheck and racecheck, then tests/test_kgather.py (ordered for a short device budget).
#   PART=kgather_swizzle: session 30: the k-gather suites (TESTS=0 skips), forward_ladder.cu (the package's
#                  forward next to the padded-row skeleton it replaced), bench_sparse_dense 32x1 without BCOO
#                  (SPARSE_DENSE=0 skips), then with SAN=1 memcheck and racecheck over the k-gather kernel tests.
#   PART=kgather_san: session 32: memcheck and racecheck over the default k-gather configuration's kernel and
#                  fused tests (SKIP_BUILD=1 on a warm machine reuses the installed build).
#   PART=kgather_race_chunks: racecheck over kgather_san's kernel selection, CHUNK tests per process from FIRST
#                  (to LAST): the tool's own process crashes partway through at times.
#   PART=kgather_e2e: session 31: (TESTS=1: the k-gather suites), bench_sparse_dense 32x1 with BCOO ($OUT/sparse_dense),
#                  then (NCU=0 skips) ncu's per-kernel device times of one forward call per sparsity on 4096³ and fc2.
#   PART=kgather_dw: session 33: (TESTS=1: the k-gather suites), bench_kgather_dw (dW kernel vs dense dW, index given,
#                  $OUT/kgather_dw), then (SAN=1) memcheck and racecheck over the dW tests.
#   PART=kgather_products: session 34: the dW products path's tests, bench_kgather_dw over VARIANTS, sanitizers.
#   PART=kgather_device: session 35: PIT_KGATHER_DW=device's tests (TESTS=0 skips), the staged MoE dW tests
#                  (MOE=0 skips), bench_kgather_dw over VARIANTS at 50-99% with the index given and detected in
#                  the call, memcheck over the bf16 device-mode tests (SAN=0 skips).
#   PART=sparse_nt: session 36: pit_sparse_nt's tests and the dense_sparse / nn suites, sanitizers, bench_nn_linear.
#   PART=nn_linear: session 36: the nn linear layers' tests on the GPU, memcheck over them, bench_nn_linear.
#   PART=ncu_dw_device: session 35: per-kernel times of one PIT_KGATHER_DW=device dW call (ncu, real clocks).
#   PART=bias_kernel: session 39: A/B of the forward without bias registers (variant and switch removed after the run).
#   PART=store39: session 39: the forward store with one body per output layout; k-gather suites, bench.
#   PART=audit40:  session 40: the audit and export tests on the GPU, memcheck over a caller's out-of-range index, bench.
#   PART=kernels40: session 40: the k-gather kernel tests of pack, dx (NT), dW (masks, products, device mode).
#   PART=gaps40:   session 40: profile_kgather_gaps.py (a sparse_dense call's kernels and the idle gaps between them, $OUT/gaps).
#   PART=step40:   session 40: probe_kgather_step.py with XLA's default flags ($OUT/step) and command buffers off ($OUT/step_nocb).
#   PART=chain40:  session 40: the benchmarks with chained calls (no dot merging in the dense baseline): bench_sparse_dense
#                  32x1 ($OUT/sparse_dense), bench_nn_linear ($OUT/nn_linear), probe_kgather_step ($OUT/step).
#   PART=final40:  session 40: the canonical bench_sparse_dense (32x1 with BCOO, chained calls; $OUT/sparse_dense) and
#                  probe_auto_dense_branch.py with XLA's default command buffers and with CONDITIONAL added.
#   PART=auto40:   session 40: bench_kgather_ab at densities 0.2 / 0.175 / 0.15 against the un-merged dense matmul ($OUT/auto_ab).
#   PART=cb40:     session 40: probe_command_buffer.py (which ops XLA captures) with the default flags and with CUSTOM_CALL
#                  listed; probe_kgather_step.py with CUSTOM_CALL ($OUT/step_cc); bf16 forward tests under that flag.
#   PART=verify40: prepared in session 40 for the next device session: the review's tests (broken counts bound directly
#                  on the NT kernel and the transposed pack, negative counts, exported auto), memcheck over them, and
#                  bench_nn_linear with per-call parameters ($OUT/nn_linear).
#   PART=ncu_kgather_dw: session 33: Nsight Compute of the dW path's kernels at 4096³ ($OUT/ncu_dw.txt).
set -u
export PYTHONUNBUFFERED=1
LOG=$OUT/checks.log
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import jax; print('jax', jax.__version__)"; } | tee -a $LOG
for part in ${PART:-tests}; do  # every part named must exist before the build spends device time
  grep -q "^$part)" "$0" || { echo "device_checks: no part named '$part'" | tee -a $LOG; exit 2; }
done
t0=$SECONDS
source scripts/cutlass_headers.sh  # CUTLASS for the staged MoE forward (a carried .whl on the device)
source scripts/pytest_ids.sh
[[ "${SKIP_BUILD:-0}" == 1 ]] || PIT_ENABLE_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q . > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
echo "build $((SECONDS-t0))s $(cd /tmp && python3 -c 'import pit_jax; i = pit_jax.build_info(); print("moe_staged", i.get("moe_staged"))')"
pytest_gpu() {  # seconds, then pytest's arguments: the installed package (-P), failures and summary to $LOG
  local limit=$1; shift
  echo "== pytest $*" >> $LOG
  timeout -k 5 $limit python3 -P -m pytest "$@" -q -rs -p no:cacheprovider > /tmp/tests.log 2>&1
  grep -E "FAILED|Error" /tmp/tests.log | head -20 | tee -a $LOG
  tail -2 /tmp/tests.log | tee -a $LOG
  echo "tests $((SECONDS-t0))s"
}
sanitize_pytest() {  # compute-sanitizer tool, kernel-name filter ("all": none), then pytest's arguments: one
                    # process under the tool (device allocations without XLA's pool, so the tool sees each
                    # buffer), its summary, pass count and exit status to $LOG
  local tool=$1 kernels=$2; shift 2
  XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout -k 5 ${SAN_TIMEOUT:-200} \
    compute-sanitizer --tool $tool --error-exitcode 97 $([[ $kernels == all ]] || echo --kernel-name kns=$kernels) \
    python3 -P -m pytest "$@" -q -p no:cacheprovider -x > /tmp/san.log 2>&1
  echo "rc $?" >> /tmp/san.log
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|rc " /tmp/san.log | tail -4 | tee -a $LOG
}
run_tool() {  # compute-sanitizer tool, kernel-name filter, test file, -k selection
  echo "== $1 ($3 -k '$4')" | tee -a $LOG
  sanitize_pytest $1 $2 $3 -k "$4"
  echo "$1 $((SECONDS-t0))s"
}
run_tool_chunks() {  # tool, kernel-name filter, test file, -k selection, first test, chunk[, last]: the selection's tests
                    # from the first on, CHUNK at a time, one process each (the tool's own process has crashed
                    # partway through long runs, at a different test each time)
  local tool=$1 kernels=$2 file=$3 expr=$4 first=$5 chunk=$6 last=${7:-} i ids  # last: stop before this test
  mapfile -t ids < <(pytest_ids python3 "$file" "$expr")
  for ((i = first; i < ${last:-${#ids[@]}}; i += chunk)); do
    echo "== $tool $file -k '$expr' tests $i..$((i + chunk - 1)) of ${#ids[@]}" | tee -a $LOG
    SAN_TIMEOUT=${SAN_TIMEOUT:-120} sanitize_pytest $tool $kernels "${ids[@]:i:chunk}"
  done
  echo "$tool $((SECONDS-t0))s"
}
layer_table() {  # seconds, output folder under $OUT, then bench_moe case names: its layer table
  local limit=$1 out=$2; shift 2
  timeout -k 5 ${BENCH_TIMEOUT:-$limit} python3 benchmarks/bench_moe.py --no-projection --layer-cases "$@" \
    --out $OUT/$out 2>&1 | grep "^| [MQ]" | tee -a $LOG
  echo "layer $((SECONDS-t0))s"
}
moe_suites() {  # the three MoE suites on the GPU (GPU vs CPU / float64); seconds for the first two, whose
               # 731 tests took 305 s on an H100 in session 24 (test_nn_moe.py: 64 s, its own limit)
  pytest_gpu $1 tests/test_moe_kernels.py tests/test_moe_matmul.py
  pytest_gpu 150 tests/test_nn_moe.py
}
dw_bench() {  # default sparsities[, index: given (default) or own]: bench_kgather_dw (ROUNDS, VARIANTS, SPARSITY)
             # to $OUT/kgather_dw (index given) or $OUT/kgather_dw_own
  local index=${2:-given}
  (cd benchmarks && PIT_BENCH_ROUNDS=${ROUNDS:-3} timeout -k 5 ${BENCH_TIMEOUT:-200} python3 bench_kgather_dw.py \
     --out $OUT/kgather_dw$([[ $index == given ]] || echo _$index) --index $index --variants ${VARIANTS:-default} \
     --sparsity ${SPARSITY:-$1} 2>&1 | grep -E "^\||Error" | tee -a $LOG)
  echo "dw bench $((SECONDS-t0))s"
}
projection_table() {  # seconds, output folder under $OUT, then bench_moe case names: its projection table
  local limit=$1 out=$2; shift 2
  timeout -k 5 ${BENCH_TIMEOUT:-$limit} python3 benchmarks/bench_moe.py --no-layer --cases "$@" \
    --out $OUT/$out 2>&1 | grep "^| [MQ]" | tee -a $LOG
  echo "projection $((SECONDS-t0))s"
}
moe_ab() {  # seconds, output folder under $OUT, then bench_moe_persistent's arguments (--switch NAME A B,
            # --cases, --parts): its A/B table, ROUNDS rounds (default 4, the bench's own default)
  local limit=$1 out=$2; shift 2
  PIT_BENCH_ROUNDS=${ROUNDS:-4} timeout -k 5 ${BENCH_TIMEOUT:-$limit} python3 benchmarks/bench_moe_persistent.py "$@" \
    --out $OUT/$out > $OUT/$out.log 2>&1
  grep "^| [MQ]" $OUT/$out.log | tee -a $LOG
  grep -q "^| [MQ]" $OUT/$out.log || tail -15 $OUT/$out.log | tee -a $LOG  # no table: say why
  echo "ab $((SECONDS-t0))s"
}
route_in_call_profile() {  # output folder under $OUT: profile_route_in_call.py's table (the caller's environment)
  (cd benchmarks && timeout -k 5 150 python3 profile_route_in_call.py --out $OUT/$1 2>&1 | grep "^|" | tee -a $LOG)
}
route_ncu_each() {  # a per-launch variable, then its values ("default": unset): PART=route_ncu with each
  local var=$1 value; shift
  for value in "$@"; do
    [[ $value == default ]] && unset $var || export $var=$value
    echo "== $var=$value" | tee -a $LOG
    PART=route_ncu SKIP_BUILD=1 bash $0 > /dev/null
  done
  unset $var
}
detect_ab_by_sparsity() {  # seconds per run, output prefix under $OUT, cases, variant, sparsities: bench_detect_ab
                         # (index kept in the jit) of the default against the variant at each sparsity
  local limit=$1 out=$2 cases=$3 variant=$4 sp; shift 4
  for sp in "$@"; do
    (cd benchmarks && timeout -k 5 $limit python3 bench_detect_ab.py --returns ${RETURNS:-counts} --out $OUT/${out}_$sp \
       --cases $cases --sparsity $sp --variants default $variant 2>&1 | grep -E "^\| [0-9]" | sed "s/^/$sp /" | tee -a $LOG)
  done
  echo "ab $((SECONDS-t0))s"
}
bench_detect_table() {  # bench_detect.py's full table into $OUT/${BENCH_OUT:-detect}, its rows into $LOG
  (cd benchmarks && timeout -k 5 250 python3 bench_detect.py --out $OUT/${BENCH_OUT:-detect} 2>&1 | grep -E "^\|" | tee -a $LOG)
  echo "bench $((SECONDS-t0))s"
}
detect_sanitizer_sets() {  # memcheck and racecheck over the detect kernel tests (chunked-path edges included)
  run_tool memcheck pit_detect tests/test_detect.py "gpu and (chunking_edges or dtypes_and_sparsity or unaligned or special)"
  run_tool racecheck pit_detect tests/test_detect.py "gpu and (chunking_edges or dtypes_and_sparsity or unaligned)"
}
forward_ladder() {  # rows to show (an extended regex): builds and runs benchmarks/read_probe/forward_ladder.cu
                   # (it includes the package's kernel source; no package build needed), $OUT/forward_ladder.txt
  (cd benchmarks/read_probe && nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a \
     -isystem=$(python3 -c "import jax.ffi; print(jax.ffi.include_dir())") forward_ladder.cu -o /tmp/forward_ladder \
     && timeout -k 5 120 /tmp/forward_ladder > $OUT/forward_ladder.txt 2>&1)
  grep -E "$1" $OUT/forward_ladder.txt | tee -a $LOG
  echo "ladder $((SECONDS-t0))s"
}
DETECT_SUITES="tests/test_detect.py tests/test_detect_properties.py tests/test_detect_transforms.py tests/test_detect_errors.py"
for part in ${PART:-tests}; do  # PART may name several parts, run in turn after one build
case "$part" in
tests)
  moe_suites ${TEST_TIMEOUT:-280}
  pytest_gpu ${TEST_TIMEOUT:-280} $DETECT_SUITES ;;
sanitize)
  run_tool memcheck pit_moe tests/test_moe_kernels.py "bfloat16 and fused_epilogue"
  run_tool racecheck pit_moe tests/test_moe_kernels.py "bfloat16 and fused_epilogue and (uniform or one_hot)"
  # memcheck's own process segfaulted on the 20000-assignment, 289-bin case (H100, 2026-11-26;
  # the case passes without the tool and under racecheck)
  run_tool memcheck pit_moe_route tests/test_moe_kernels.py "routing_kernel and not 20000"
  run_tool racecheck pit_moe_route tests/test_moe_kernels.py "routing_kernel"
  run_tool memcheck pit_detect tests/test_detect.py "gpu and (dtypes_and_sparsity or unaligned or special)"
  run_tool racecheck pit_detect tests/test_detect.py "gpu and (dtypes_and_sparsity or unaligned)" ;;
bench)
  timeout -k 5 200 python3 benchmarks/bench_moe_epilogues.py --out $OUT/epilogues 2>&1 | grep "^|"
  echo "epilogues $((SECONDS-t0))s"
  timeout -k 5 150 python3 benchmarks/bench_detect.py --out $OUT/detect 2>&1 | grep "^|"
  echo "detect $((SECONDS-t0))s"
  timeout -k 5 200 python3 benchmarks/bench_moe.py --no-projection --out $OUT/layer 2>&1 | grep "^|"
  echo "layer $((SECONDS-t0))s" ;;
final)
  pytest_gpu 200 tests/test_moe_kernels.py tests/test_moe_matmul.py -k "fused or lowers"
  pytest_gpu 120 $DETECT_SUITES
  echo "   (with PIT_DETECT_IN_FLIGHT=8:)" >> $LOG
  PIT_DETECT_IN_FLIGHT=8 pytest_gpu 120 tests/test_detect.py
  PART=sanitize SKIP_BUILD=1 SAN_TIMEOUT=100 bash $0 | grep -E "^==|SUMMARY|passed|rc "
  timeout -k 5 100 python3 benchmarks/bench_moe_epilogues.py --out $OUT/epilogues 2>&1 | grep "^| [MQ]"
  for rep in 1 2; do for f in 16 8; do
    echo "== detect 4096² cases, PIT_DETECT_IN_FLIGHT=$f, repeat $rep" | tee -a $LOG
    PIT_DETECT_IN_FLIGHT=$f timeout -k 5 60 python3 benchmarks/bench_detect.py --quick --out /tmp/dq 2>&1 | grep "^| 4096" | tee -a $LOG
  done; done
  timeout -k 5 100 python3 benchmarks/bench_detect.py --out $OUT/detect 2>&1 | grep "^| [14]"
  echo "bench $((SECONDS-t0))s"
  timeout -k 5 200 python3 benchmarks/bench_moe.py --no-projection --out $OUT/layer 2>&1 | grep "^| [MQ]"
  echo "layer $((SECONDS-t0))s" ;;
detect_probe)
  detect_ab() {  # XLA_FLAGS, output folder
    (cd benchmarks && XLA_FLAGS="$1" timeout -k 5 ${BENCH_TIMEOUT:-200} python3 bench_detect_ab.py --out $OUT/$2 \
       --cases ${CASES:-0 2} --variants ${VARIANTS:-default PIT_DETECT_IN_FLIGHT=16} 2>&1 | grep -E "^\||probe|dispatch" | tee -a $LOG)
  }
  detect_ab "" detect_ab
  [[ -n "${CB_FLAGS:-}" ]] && { echo "== with XLA_FLAGS=$CB_FLAGS" | tee -a $LOG; detect_ab "$CB_FLAGS" detect_ab_cb; }
  echo "probe $((SECONDS-t0))s" ;;
detect_gpu)
  pytest_gpu ${TEST_TIMEOUT:-200} $DETECT_SUITES
  detect_sanitizer_sets ;;
detect_san)  # detect_gpu's sanitizer sets alone (the suites ran in another part of the same tree)
  detect_sanitizer_sets ;;
detect_ab_jit)
  (cd benchmarks && timeout -k 5 150 python3 bench_detect_ab.py --returns ${RETURNS:-counts} --out $OUT/ab_inflight \
     --cases 0 2 --variants default PIT_DETECT_IN_FLIGHT=16 2>&1 | grep -E "^\||dispatch" | tee -a $LOG)
  echo "ab $((SECONDS-t0))s"
  bench_detect_table ;;
kgather_ab)
  (cd benchmarks && timeout -k 5 ${BENCH_TIMEOUT:-400} python3 bench_kgather_ab.py --out $OUT/kgather_ab \
     --variants ${VARIANTS:-default} --sparsity ${SPARSITY:-0.5 0.9 0.99} 2>&1 | grep -E "^\|" | tee -a $LOG)
  echo "ab $((SECONDS-t0))s" ;;
kgather_gpu)
  pytest_gpu ${TEST_TIMEOUT:-200} tests/test_kgather.py tests/test_kgather_kernels.py
  run_tool memcheck pit_kgather tests/test_kgather_kernels.py "gpu and (0.5 or 1.0 or garbage or many_row or dense_sparse)"
  run_tool racecheck pit_kgather tests/test_kgather_kernels.py "gpu and (0.5 or 1.0 or garbage or many_row or dense_sparse)" ;;
kgather_final)
  pytest_gpu ${TEST_TIMEOUT:-200} tests/test_kgather.py tests/test_kgather_kernels.py
  for tool in memcheck racecheck; do
    for sel in "gpu and 0.5" "gpu and 1.0" "gpu and (garbage or many_row or dense_sparse)"; do
      SAN_TIMEOUT=100 run_tool $tool pit_kgather tests/test_kgather_kernels.py "$sel"
    done
  done
  timeout -k 5 200 python3 benchmarks/bench_sparse_dense.py --tiles 32x1 --out $OUT/sparse_dense 2>&1 | grep -E "^\| [4O]" | tee -a $LOG
  (cd benchmarks && timeout -k 5 150 python3 bench_kgather_ab.py --out $OUT/kgather_ab --variants default 2>&1 | grep -E "^\|" | tee -a $LOG)
  echo "bench $((SECONDS-t0))s" ;;
ncu_kgather)
  # Nsight Compute on the forward GEMM; without XLA's preallocation the replay has memory to save buffers
  for args in "4096 4096 4096 --sparsity 0.9 0.99" "4096 16384 4096 --sparsity 0.99"; do
    echo "== ncu forward, shape $args" >> $OUT/ncu_forward.txt
    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=benchmarks timeout -k 5 150 ncu --kernel-name regex:pit_kgather_forward \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
      --section WarpStateStats --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio \
      python3 -P benchmarks/profile_kgather.py --shape $args >> $OUT/ncu_forward.txt 2>&1
    echo "rc $?" >> $OUT/ncu_forward.txt
  done
  grep -E "^==|pit_kgather_forward|Duration|Throughput|Achieved Occupancy|Theoretical Occupancy|Registers|Warp Cycles Per Issued|rc |ERROR" $OUT/ncu_forward.txt | sed 's/(const T1.*//; s/  */ /g' | tee -a $LOG
  grep -E "stalled" $OUT/ncu_forward.txt | awk '$NF+0 > 0.5' | sed 's/  */ /g' | tee -a $LOG
  echo "ncu $((SECONDS-t0))s" ;;
kgather_fused)
  [[ "${TESTS:-1}" == 1 ]] && pytest_gpu 250 ${TEST_FILES:-tests/test_kgather_fused.py tests/test_kgather.py tests/test_kgather_kernels.py}
  if [[ "${SAN:-1}" == 1 ]]; then
    SAN_TIMEOUT=150 run_tool memcheck pit_kgather tests/test_kgather_fused.py "gpu"
    SAN_TIMEOUT=150 run_tool racecheck pit_kgather tests/test_kgather_fused.py "gpu and (0.5 or 0.99 or special)"
  fi
  [[ "${SPARSE_DENSE:-1}" == 1 ]] && timeout -k 5 200 python3 benchmarks/bench_sparse_dense.py --tiles 32x1 \
     --out $OUT/sparse_dense 2>&1 | grep -E "^\| [4O]" | tee -a $LOG
  echo "bench $((SECONDS-t0))s"
  (cd benchmarks && timeout -k 5 ${BENCH_TIMEOUT:-300} python3 bench_kgather_ab.py --out $OUT/kgather_ab \
     --variants ${VARIANTS:-default PIT_KGATHER_FUSED=0} --sparsity ${SPARSITY:-0.5 0.9 0.99} 2>&1 | grep -E "^\|" | tee -a $LOG)
  echo "ab $((SECONDS-t0))s" ;;
kgather_parts)
  [[ "${TESTS:-1}" == 1 ]] && pytest_gpu 120 tests/test_detect.py -k "gpu"
  [[ "${PROBE:-1}" == 1 ]] || SHAPES=""
  IFS=';' read -ra shape_list <<< "${SHAPES-4096 16384 4096@0.99 0.9;4096 4096 4096@0.99}"
  for spec in "${shape_list[@]}"; do
    (cd benchmarks && timeout -k 5 ${BENCH_TIMEOUT:-200} python3 probe_kgather_parts.py --shape ${spec%@*} \
       --sparsity ${spec#*@} --variants ${VARIANTS:-default} 2>&1 | grep -E "^\||sparsity" | tee -a $LOG)
  done
  echo "probe $((SECONDS-t0))s"
  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=benchmarks timeout -k 5 120 ncu --clock-control none --cache-control none \
    --kernel-name regex:pit_ --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
    python3 -P benchmarks/profile_kgather.py --forward-only --shape ${NCU_SHAPE:-4096 16384 4096} --sparsity 0.99 0.9 > $OUT/ncu_parts.txt 2>&1
  echo "rc $?" >> $OUT/ncu_parts.txt
  grep -E "^  pit_|gpu__time|dram__bytes|rc " $OUT/ncu_parts.txt | sed 's/(.*//; s/  */ /g' | tee -a $LOG
  echo "ncu $((SECONDS-t0))s" ;;
ncu_dense)
  # Nsight Compute of the dense cuBLAS matmul vs pit's forward on the Mixtral projection (session 14)
  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=benchmarks timeout -k 5 400 ncu --kernel-name regex:"pit_moe_forward|nvjet|gemm|xmma|cutlass" \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --section SchedulerStats python3 -P benchmarks/profile_moe_vs_dense.py > $OUT/ncu_dense.txt 2>&1
  echo "rc $?" >> $OUT/ncu_dense.txt
  grep -E "^== |^  [a-z_]|Duration|SM Frequency|Compute \(SM\) Throughput|Memory Throughput|L2 Hit Rate|DRAM Throughput|L1/TEX Hit|Cluster Size|Grid Size|Registers Per|Dynamic Shared|Warp Cycles Per Issued|Issue Slots Busy|Executed Ipc A|rc " $OUT/ncu_dense.txt | sed 's/(const T1.*//; s/  */ /g' | cut -c1-160 | tee -a $LOG
  echo "ncu $((SECONDS-t0))s" ;;
ncu_stalls)
  # per-reason warp stall cycles per issued instruction, dense matmul vs pit's forward (session 14)
  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=benchmarks timeout -k 5 400 ncu --kernel-name regex:"pit_moe_forward|nvjet" \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,gpu__time_duration.sum" \
    python3 -P benchmarks/profile_moe_vs_dense.py > $OUT/ncu_stalls.txt 2>&1
  echo "rc $?" >> $OUT/ncu_stalls.txt
  python3 scripts/ncu_stall_table.py $OUT/ncu_stalls.txt | tee -a $LOG
  echo "ncu $((SECONDS-t0))s" ;;
moe_ab)
  timeout -k 5 ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_moe_persistent.py --switch ${SWITCH:-PIT_MOE_PERSISTENT 0 1} \
    --out $OUT/moe_ab 2>&1 | grep "^| [MQ]" | tee -a $LOG
  echo "ab $((SECONDS-t0))s" ;;
detect_prefix)
  pytest_gpu 200 $DETECT_SUITES
  SAN_TIMEOUT=150 run_tool memcheck pit_detect tests/test_detect.py "gpu and (word_rows or dtypes_and_sparsity or unaligned)"
  SAN_TIMEOUT=150 run_tool racecheck pit_detect tests/test_detect.py "gpu and (word_rows or dtypes_and_sparsity)"
  (cd benchmarks && timeout -k 5 150 python3 bench_detect_ab.py --returns ${RETURNS:-counts} --out $OUT/ab_prefix \
     --cases 0 2 --variants default PIT_DETECT_PREFIX=0 2>&1 | grep -E "^\||dispatch" | tee -a $LOG)
  echo "ab $((SECONDS-t0))s"
  [[ "${KGATHER:-1}" == 1 ]] || exit 0
  pytest_gpu 100 tests/test_kgather.py -k auto
  SAN_TIMEOUT=100 run_tool memcheck pit_kgather tests/test_kgather_kernels.py "gpu and float32 and (0.5 or 1.0)" ;;
dispatch)
  (cd benchmarks && timeout -k 5 ${BENCH_TIMEOUT:-300} python3 probe_detect_dispatch.py --out $OUT/dispatch \
     --cases ${CASES:-0 1 2} 2>&1 | grep -E "^\|" | tee -a $LOG)
  echo "probe $((SECONDS-t0))s"
  (cd benchmarks && timeout -k 5 ${BENCH_TIMEOUT:-300} python3 bench_detect.py --out $OUT/detect 2>&1 | grep -E "^\|" | tee -a $LOG)
  echo "bench $((SECONDS-t0))s" ;;
kgather_loads)  # session 30: the forward's load loops with per-thread copy slots — the ladder first (package
               # forward vs its skeleton), then the k-gather kernel and fused tests, memcheck, racecheck
  forward_ladder "package forward|swz full \\| 2 x 64"
  pytest_gpu 200 tests/test_kgather_kernels.py tests/test_kgather_fused.py
  SAN_TIMEOUT=100 run_tool memcheck pit_kgather tests/test_kgather_kernels.py "gpu and (0.5 or 1.0 or garbage or many_row or dense_sparse)"
  SAN_TIMEOUT=100 run_tool memcheck pit_kgather tests/test_kgather_fused.py "gpu and (0.5 or 0.99 or special)"
  SAN_TIMEOUT=100 run_tool racecheck pit_kgather tests/test_kgather_kernels.py "gpu and (0.5 or 1.0 or garbage or many_row or dense_sparse)"
  pytest_gpu 120 tests/test_kgather.py ;;
kgather_e2e)  # session 31: the final forward end to end — bench_sparse_dense's 32x1 table with BCOO at >= 95%
             # ($OUT/sparse_dense), then per-kernel device times of one call (ncu, unlocked clocks) on 4096³ and fc2;
             # TESTS=1 runs the three k-gather suites first, NCU=0 skips ncu
  [[ "${TESTS:-0}" == 1 ]] && pytest_gpu 250 tests/test_kgather.py tests/test_kgather_kernels.py tests/test_kgather_fused.py
  timeout -k 5 ${BENCH_TIMEOUT:-280} python3 benchmarks/bench_sparse_dense.py --tiles 32x1 --out $OUT/sparse_dense 2>&1 \
     | grep -E "^\| [4O]" | tee -a $LOG
  echo "bench $((SECONDS-t0))s"
  [[ "${NCU:-1}" == 1 ]] || continue
  for shape in "4096 4096 4096" "4096 16384 4096"; do
    echo "== ncu, shape $shape" >> $OUT/ncu_parts.txt
    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=benchmarks timeout -k 5 120 ncu --clock-control none --kernel-name regex:pit_ \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum python3 -P benchmarks/profile_kgather.py \
      --forward-only --shape $shape --sparsity ${SPARSITY:-0.9 0.95 0.99} >> $OUT/ncu_parts.txt 2>&1
    echo "rc $?" >> $OUT/ncu_parts.txt
  done
  grep -E "^==|^  pit_|gpu__time|dram__bytes|rc " $OUT/ncu_parts.txt | sed 's/(.*//; s/  */ /g' | tee -a $LOG
  echo "ncu $((SECONDS-t0))s" ;;
kgather_dw)  # session 33 (there with a packed dW kernel, not kept: benchmarks/results/2026-11-29_session33/) — the
            # k-gather suites on the GPU (TESTS=1), bench_kgather_dw (dW kernel vs dense dW, index given, over VARIANTS,
            # $OUT/kgather_dw), then memcheck and racecheck over the dW tests (SAN=1)
  [[ "${TESTS:-1}" == 1 ]] && pytest_gpu 250 tests/test_kgather.py tests/test_kgather_kernels.py tests/test_kgather_fused.py
  dw_bench "0.5 0.9 0.95 0.99"
  if [[ "${SAN:-1}" == 1 ]]; then
    SAN_TIMEOUT=150 run_tool memcheck pit_kgather tests/test_kgather_kernels.py "gpu and (many_column_blocks or many_row or garbage or (match_float64 and 0.95))"
    SAN_TIMEOUT=150 run_tool racecheck pit_kgather_tn tests/test_kgather_kernels.py "gpu and many_column_blocks"
  fi ;;
kgather_products)  # session 34: the dW products path (PIT_KGATHER_DW=sparse, kgather_dw_products.cuh): the dW tests
                  # of the kernel suite, bench_kgather_dw over VARIANTS ($OUT/kgather_dw), memcheck and racecheck
                  # over the bf16 products tests
  pytest_gpu ${TEST_TIMEOUT:-150} tests/test_kgather_kernels.py -k "gpu and (products or dw or many_row or garbage)"
  dw_bench "0.95 0.98 0.99 0.995"
  if [[ "${SAN:-1}" == 1 ]]; then
    SAN_TIMEOUT=120 run_tool memcheck pit_kgather tests/test_kgather_kernels.py "gpu and products and bfloat16 and not 0.97"
    [[ "${RACE:-1}" == 1 ]] && SAN_TIMEOUT=100 run_tool racecheck pit_kgather_tn_products tests/test_kgather_kernels.py \
      "gpu and products and bfloat16 and 0.5"
  fi ;;
sparse_nt)  # session 36: pit_sparse_nt (x's masked cotangent; dense_sparse(grad="masked")'s weight gradient,
           # kgather_nt.cuh): its tests and the dense_sparse / nn linear suites on the GPU, memcheck and racecheck
           # over a selection of its GPU tests, then bench_nn_linear ($OUT/nn_linear)
  pytest_gpu 300 tests/test_kgather_kernels.py tests/test_kgather.py tests/test_nn_linear.py -k "gpu and (nt_ or masked_grad or dense_sparse or pruned or sparse_linear)"
  if [[ "${SAN:-1}" == 1 ]]; then
    SAN_TIMEOUT=150 run_tool_chunks memcheck all tests/test_kgather_kernels.py \
      "gpu and ((sparse_nt_matches and 0.5 and (bfloat16 or float32)${SAN_SHAPES:+ and ($SAN_SHAPES)}) or masked_grad)" 0 11
    SAN_TIMEOUT=150 run_tool racecheck pit_kgather_nt tests/test_kgather_kernels.py \
      "gpu and sparse_nt_matches and 0.5 and (bfloat16 or float32) and aligned"
  fi
  timeout -k 5 ${BENCH_TIMEOUT:-240} python3 benchmarks/bench_nn_linear.py --layers ${LAYERS:-sparse pruned} --out $OUT/nn_linear 2>&1 | grep -E "^\| [SP]|Error" | tee -a $LOG
  echo "bench $((SECONDS-t0))s" ;;
tpack)  # session 37: dense_sparse hands w to the kernels as it is (pack reads wᵀ's columns from w's rows): the k-gather
       # and nn linear suites on the GPU (TESTS=0 skips), memcheck over the bf16 transposed-pack tests at 0.5 (chunks of
       # 10; SAN=0 skips). No racecheck: pack has no shared memory and the GEMM kernel did not change
  [[ "${TESTS:-1}" == 1 ]] && pytest_gpu ${TEST_TIMEOUT:-300} tests/test_kgather_kernels.py tests/test_kgather.py \
    tests/test_kgather_fused.py tests/test_nn_linear.py -k "not cpu"
  if [[ "${SAN:-1}" == 1 ]]; then
    SAN_TIMEOUT=150 run_tool_chunks memcheck all tests/test_kgather_kernels.py \
      "gpu and transposed_pack_matches and bfloat16 and 0.5" 0 10
  fi ;;
tpack2)  # session 37, second run: the transposed-pack tests at 0.5 and 1.0 sparsity (bf16, fp32) and under vmap of w,
        # the PrunedLinear / tile-index tests, then memcheck over the transposed-pack chunks whose tool process crashed
        # in the first run (tests 10..29 of the bf16 0.5 selection, chunks of 5); then PART=pruned_profile's A/B
        # (SWITCH) unless PROFILE=0. Full pytest logs in $OUT/tests_*.log
  pytest_gpu ${TEST_TIMEOUT:-240} tests/test_kgather_kernels.py \
    -k "gpu and ((transposed_pack_matches and (0.5 or 1.0) and not float16) or under_vmap_of_w)"
  cp /tmp/tests.log $OUT/tests_tpack.log
  pytest_gpu 120 tests/test_nn_linear.py -k "gpu and (pruned or from_mask)"
  cp /tmp/tests.log $OUT/tests_nn.log
  SAN_TIMEOUT=100 run_tool_chunks memcheck all tests/test_kgather_kernels.py \
    "gpu and transposed_pack_matches and bfloat16 and 0.5" 10 5 30
  if [[ "${PROFILE:-1}" == 1 ]]; then
    PYTHONPATH=benchmarks timeout -k 5 ${BENCH_TIMEOUT:-200} python3 -P benchmarks/profile_nn_linear.py \
      --layer pruned --sparsity ${SPARSITY:-0.95} --switch ${SWITCH:-PIT_KGATHER_TRANSPOSED_PACK 0 1} --out $OUT/pruned_profile 2>&1 \
      | tee -a $LOG | grep -E "^###"
    echo "profile $((SECONDS-t0))s"
  fi ;;
pruned_profile)  # session 37: per-kernel device times of an nn linear layer (LAYER=pruned (default): PrunedLinear 4096²;
                # LAYER=sparse: SparseLinear at OPT fc2) forward and step, nnx.Linear and the bare op (JAX profiler), at
                # SPARSITY (default 0.95); SWITCH="NAME A B" for an A/B
  PYTHONPATH=benchmarks timeout -k 5 ${BENCH_TIMEOUT:-240} python3 -P benchmarks/profile_nn_linear.py --layer ${LAYER:-pruned} \
    --sparsity ${SPARSITY:-0.95} ${SWITCH:+--switch $SWITCH} --out $OUT/nn_profile 2>&1 | tee -a $LOG | tail -120
  echo "profile $((SECONDS-t0))s" ;;
bias_kernel)  # session 39: the forward without a bias compiled without the bias registers (78 registers against 96 for
             # bf16). A few GPU tests of both kernels (bf16 forward, bias epilogue at 0.5), then bench_kgather_ab of the
             # default against PIT_KGATHER_BIAS_KERNEL=1 (the bias kernel on calls without a bias), 4096³ and fc2 at
             # 95 / 99% ($OUT/kgather_ab). Sized for a short device budget (about 240 s with the build). It ran once:
             # no difference, so the variant and its switch were removed (today the switch does nothing; the patch is
             # in benchmarks/results/2026-11-29_session39/bias_kernel_ab_h200/).
  pytest_gpu ${TEST_TIMEOUT:-45} tests/test_kgather_kernels.py -k "gpu and bfloat16 and ((forward_and_dw and aligned) or (bias_epilogue_matches and 0.5))"
  (cd benchmarks && PIT_BENCH_ROUNDS=${ROUNDS:-5} timeout -k 5 ${BENCH_TIMEOUT:-80} python3 bench_kgather_ab.py --out $OUT/kgather_ab \
     --variants default PIT_KGATHER_BIAS_KERNEL=1 --sparsity ${SPARSITY:-0.95 0.99} 2>&1 | grep -E "^\| [4O]|Error" | tee -a $LOG)
  echo "bias_kernel $((SECONDS-t0))s" ;;
audit40)  # session 40: the tests sessions 39-40 added, on the GPU: empty dims, ops outside jit, exports with every dim
         # symbolic (M, K, N: the CUDA lowering of a tile larger than M at call time), TileIndex / MoeRouting across a
         # serialized export, drop_over_capacity, nn.MoE's input checks; a caller's index with counts past n_inner and
         # ids out of range (the kernels now clamp counts and skip such ids), also under memcheck; bench_sparse_dense
         # 32x1 without BCOO ($OUT/sparse_dense) for the clamps' cost.
  pytest_gpu ${TEST_TIMEOUT:-200} tests/test_kgather.py tests/test_nn_linear.py tests/test_moe_matmul.py \
    -k "gpu and (export or out_of_range or negative_counts or empty or outside_jit or clamps or routing_crosses or drop_over_capacity or symbolic)"
  pytest_gpu 120 tests/test_nn_moe.py -k "bad_input_type or bad_dtype or no_tokens"
  [[ "${SAN:-1}" == 1 ]] && SAN_TIMEOUT=100 run_tool_chunks memcheck all tests/test_kgather.py \
    "gpu and (out_of_range or negative_counts)" 0 7
  timeout -k 5 ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_sparse_dense.py --tiles 32x1 --no-bcoo --out $OUT/sparse_dense 2>&1 \
     | grep -E "^\| [4O]" | tee -a $LOG
  echo "audit40 $((SECONDS-t0))s" ;;
verify40)  # prepared in session 40 (not run there: the device budget was spent): the tests its review added, on the GPU,
          # memcheck over the kernel-level ones, then bench_nn_linear, whose PrunedLinear rows were upper bounds (the
          # step's calls shared one kernel array, so XLA computed the mask once per step).
  pytest_gpu ${TEST_TIMEOUT:-150} tests/test_kgather_kernels.py tests/test_kgather.py \
    -k "(gpu and (broken_counts or negative_counts or out_of_range or export_symbolic_rows)) or sampled_density_is_the_same"
  [[ "${SAN:-1}" == 1 ]] && SAN_TIMEOUT=100 run_tool_chunks memcheck all tests/test_kgather_kernels.py "gpu and broken_counts" 0 4
  timeout -k 5 ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_nn_linear.py --out $OUT/nn_linear 2>&1 | grep -E "^\| [SP]|Error" | tee -a $LOG
  echo "verify40 $((SECONDS-t0))s" ;;
cb40)  # session 40: pit's ffi_calls ran as separate thunks in step40's traces, though declared kCmdBufferCompatible. Which ops
      # XLA captures by default and with CUSTOM_CALL named; the step's times with it; the forward's tests under capture.
  CC=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN
  (cd benchmarks && timeout -k 5 60 python3 probe_command_buffer.py 2>&1 | grep -E "^\||Error" | tee -a $LOG)
  (cd benchmarks && XLA_FLAGS=$CC timeout -k 5 60 python3 probe_command_buffer.py 2>&1 | grep -E "^\||Error" | tee -a $LOG)
  (cd benchmarks && XLA_FLAGS=$CC timeout -k 5 100 python3 probe_kgather_step.py --out $OUT/step_cc 2>&1 | grep -E "^\|" | head -18 | tee -a $LOG)
  XLA_FLAGS=$CC pytest_gpu 60 tests/test_kgather_kernels.py -k "gpu and forward_and_dw and bfloat16"
  echo "cb40 $((SECONDS-t0))s" ;;
auto40)  # session 40: tile="auto"'s threshold (0.2) was set against the merged dense baseline; where the kernel, detection
        # included, crosses the un-merged dense matmul now.
  (cd benchmarks && timeout -k 5 ${BENCH_TIMEOUT:-300} python3 bench_kgather_ab.py --variants default --sparsity 0.8 0.825 0.85 \
     --out $OUT/auto_ab 2>&1 | grep -E "^\| [4O]|Error" | tee -a $LOG)
  echo "auto40 $((SECONDS-t0))s" ;;
final40)  # session 40: the canonical table on chained calls, with the BCOO peer column; what tile="auto"'s cost at 0%
         # consists of against the un-merged dense matmul (1.13x / 1.11x in chain40), with and without CONDITIONAL
         # command buffers.
  timeout -k 5 ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_sparse_dense.py --tiles 32x1 --out $OUT/sparse_dense 2>&1 \
     | grep -E "^\| [4O]" | tee -a $LOG
  CB=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN
  for variant in "default|" "conditional|--xla_gpu_enable_command_buffer=$CB,CONDITIONAL"; do
    name=${variant%%|*}; flags=${variant#*|}
    echo "== probe_auto_dense_branch, $name: XLA_FLAGS='$flags'" | tee -a $LOG
    (cd benchmarks && XLA_FLAGS="$flags" timeout -k 5 100 python3 probe_auto_dense_branch.py 2>&1 | grep -E "^\||Error" | tee -a $LOG)
  done
  echo "final40 $((SECONDS-t0))s" ;;
chain40)  # session 40: step40 found XLA merging the dense baseline's dots (one GEMM per two calls on concatenated x,
         # plus a concatenate and a copy: 209 µs per 4096³ call against 185 at one call per step). The benchmarks now
         # chain their calls through optimization barriers; their tables again.
  timeout -k 5 ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_sparse_dense.py --tiles 32x1 --no-bcoo --out $OUT/sparse_dense 2>&1 \
     | grep -E "^\| [4O]" | tee -a $LOG
  timeout -k 5 ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_nn_linear.py --out $OUT/nn_linear 2>&1 | grep -E "^\| [SP]|Error" | tee -a $LOG
  (cd benchmarks && timeout -k 5 ${BENCH_TIMEOUT:-120} python3 probe_kgather_step.py --out $OUT/step 2>&1 | grep -E "^\|" | head -18 | tee -a $LOG)
  echo "chain40 $((SECONDS-t0))s" ;;
step40)  # session 40: is the time per call at high sparsity the kernels' or the runtime's (1 / 4 / 16 calls per step,
        # gaps inside and between steps, host events), with the default XLA_FLAGS and with command buffers off.
  (cd benchmarks && timeout -k 5 ${BENCH_TIMEOUT:-200} python3 probe_kgather_step.py --out $OUT/step 2>&1 | grep -E "^\|" | head -40 | tee -a $LOG)
  (cd benchmarks && XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout -k 5 ${BENCH_TIMEOUT:-200} python3 probe_kgather_step.py \
     --out $OUT/step_nocb 2>&1 | grep -E "^\|" | head -18 | tee -a $LOG)
  echo "step40 $((SECONDS-t0))s" ;;
gaps40)  # session 40: where a call's time goes between its kernels (4096³ and fc2 at 90 / 95 / 99%, detected and given).
  (cd benchmarks && timeout -k 5 ${BENCH_TIMEOUT:-240} python3 profile_kgather_gaps.py --out $OUT/gaps 2>&1 | grep -E "^\|" | tee -a $LOG)
  echo "gaps40 $((SECONDS-t0))s" ;;
kernels40)  # session 40: pack, the NT kernel (dx) and the dW column masks now clamp a caller's counts and skip
           # out-of-range ids: their kernel tests on the GPU (bf16 for the large parametrisations).
  pytest_gpu ${TEST_TIMEOUT:-300} tests/test_kgather_kernels.py -k "gpu and (garbage or many_row or dense_sparse_through \
or dw_over_many or dw_rule or masked_grad or ((dw_products or dw_device or sparse_nt or forward_and_dw or transposed_pack_matches) and bfloat16))"
  echo "kernels40 $((SECONDS-t0))s" ;;
store39)  # session 39: the forward's store with one body per output layout (session 38's runtime layout made the copy
         # loop's trip count and line length runtime values; verify38's 4096³ 99% call read 0.051 / 0.045 ms given the
         # index, against 0.044 / 0.040 in session 31). The k-gather kernel and fused suites on the GPU, memcheck over
         # the first 9 bf16 bias tests at 0.5, bench_sparse_dense 32x1 without BCOO twice ($OUT/sparse_dense,
         # $OUT/sparse_dense_2), bench_nn_linear on PrunedLinear ($OUT/nn_linear; its forward writes y transposed).
  pytest_gpu ${TEST_TIMEOUT:-300} tests/test_kgather_kernels.py tests/test_kgather_fused.py -k "not cpu"
  [[ "${SAN:-1}" == 1 ]] && SAN_TIMEOUT=100 run_tool_chunks memcheck all tests/test_kgather_kernels.py \
    "gpu and bias_epilogue_matches and bfloat16 and 0.5" 0 9 9
  for run in "" _2; do
    timeout -k 5 ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_sparse_dense.py --tiles 32x1 --no-bcoo --out $OUT/sparse_dense$run 2>&1 \
       | grep -E "^\| [4O]" | tee -a $LOG
  done
  timeout -k 5 ${BENCH_TIMEOUT:-150} python3 benchmarks/bench_nn_linear.py --layers pruned --out $OUT/nn_linear 2>&1 | grep -E "^\| [SP]|Error" | tee -a $LOG
  echo "store39 $((SECONDS-t0))s" ;;
verify38)  # prepared in session 38 for the next device session: the bias tests on the GPU with their new forward-only
          # check (the kernel's transposed store with the bias, since dense_sparse keeps yᵀ under AD) and the
          # w-copy path with the fused target transposed; memcheck over the bf16 ones at 0.5 (chunks of 9); then
          # bench_sparse_dense's 32x1 table without BCOO ($OUT/sparse_dense) to check that the bare forward did
          # not move with the epilogue (session 31's table). About 100 s build + 400 s.
  pytest_gpu ${TEST_TIMEOUT:-150} tests/test_kgather_kernels.py tests/test_kgather.py -k "gpu and (bias or export)"
  [[ "${SAN:-1}" == 1 ]] && SAN_TIMEOUT=100 run_tool_chunks memcheck all tests/test_kgather_kernels.py \
    "gpu and bias_epilogue_matches and bfloat16 and 0.5" 0 9
  timeout -k 5 ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_sparse_dense.py --tiles 32x1 --no-bcoo --out $OUT/sparse_dense 2>&1 \
     | grep -E "^\| [4O]" | tee -a $LOG
  echo "verify38 $((SECONDS-t0))s" ;;
epilogue4)  # session 38, fourth run: under differentiation dense_sparse's forward keeps the kernel's layout (yᵀ, then
           # XLA's transpose with the bias), since the fused layout made the PrunedLinear step slower (PART=epilogue3);
           # inference keeps the fused epilogue. Build, then bench_nn_linear on PrunedLinear only (device time was short).
  timeout -k 5 ${BENCH_TIMEOUT:-110} python3 benchmarks/bench_nn_linear.py --layers pruned --out $OUT/nn_linear 2>&1 | grep -E "^\| [SP]|Error" | tee -a $LOG
  echo "epilogue4 $((SECONDS-t0))s" ;;
epilogue3)  # session 38, third run: the JVP sums its tangents in the product's layout and transposes once (PART=epilogue2's
           # PrunedLinear step kept two transposes of dy: 539 µs of kernels against 474 in session 37). The bf16 bias
           # tests on the GPU, bench_nn_linear, the PrunedLinear profile.
  pytest_gpu ${TEST_TIMEOUT:-120} tests/test_kgather_kernels.py -k "gpu and bias and bfloat16"
  timeout -k 5 ${BENCH_TIMEOUT:-170} python3 benchmarks/bench_nn_linear.py --out $OUT/nn_linear 2>&1 | grep -E "^\| [SP]|Error" | tee -a $LOG
  PYTHONPATH=benchmarks timeout -k 5 80 python3 -P benchmarks/profile_nn_linear.py --layer pruned --sparsity 0.95 \
    --out $OUT/nn_profile_pruned 2>&1 | tee -a $LOG | grep -E "^###"
  echo "epilogue3 $((SECONDS-t0))s" ;;
epilogue2)  # session 38, second run: the bias read before the main loop and the transposed tile staged by column
           # (PART=epilogue measured the PrunedLinear forward kernel at 56 µs against 47 before the epilogue). The
           # bias tests on the GPU, memcheck over the bf16 ones at 0.5, bench_nn_linear, the PrunedLinear profile.
  pytest_gpu ${TEST_TIMEOUT:-170} tests/test_kgather_kernels.py -k "gpu and bias"
  [[ "${SAN:-1}" == 1 ]] && SAN_TIMEOUT=100 run_tool_chunks memcheck all tests/test_kgather_kernels.py \
    "gpu and bias_epilogue_matches and bfloat16 and 0.5" 0 8
  timeout -k 5 ${BENCH_TIMEOUT:-170} python3 benchmarks/bench_nn_linear.py --out $OUT/nn_linear 2>&1 | grep -E "^\| [SP]|Error" | tee -a $LOG
  for layer in ${PROFILE_LAYERS:-pruned}; do
    PYTHONPATH=benchmarks timeout -k 5 80 python3 -P benchmarks/profile_nn_linear.py --layer $layer --sparsity 0.95 \
      --out $OUT/nn_profile_$layer 2>&1 | tee -a $LOG | grep -E "^###"
  done
  echo "epilogue2 $((SECONDS-t0))s" ;;
epilogue)  # session 38: the forward's epilogue adds the bias and (dense_sparse) writes y instead of yᵀ. The bias tests
          # on the GPU (every path, dtype, sparsity 0/0.5/1, odd N; vmap), the nn linear suite, memcheck over the bf16
          # bias tests at 0.5 (chunks of 8), then bench_nn_linear ($OUT/nn_linear) and the SparseLinear / PrunedLinear
          # kernel profiles at 95% ($OUT/nn_profile_sparse, $OUT/nn_profile_pruned). About 100 s build + 450 s.
  pytest_gpu ${TEST_TIMEOUT:-200} tests/test_kgather_kernels.py tests/test_nn_linear.py -k "not cpu and (bias or Linear or linear)"
  [[ "${SAN:-1}" == 1 ]] && SAN_TIMEOUT=100 run_tool_chunks memcheck all tests/test_kgather_kernels.py \
    "gpu and bias_epilogue_matches and bfloat16 and 0.5" 0 8
  timeout -k 5 ${BENCH_TIMEOUT:-170} python3 benchmarks/bench_nn_linear.py --out $OUT/nn_linear 2>&1 | grep -E "^\| [SP]|Error" | tee -a $LOG
  for layer in sparse pruned; do
    PYTHONPATH=benchmarks timeout -k 5 80 python3 -P benchmarks/profile_nn_linear.py --layer $layer --sparsity 0.95 \
      --out $OUT/nn_profile_$layer 2>&1 | tee -a $LOG | grep -E "^###"
  done
  echo "epilogue $((SECONDS-t0))s" ;;
memcheck_given)  # session 38: memcheck of the 4 given-index transposed-pack tests (15-18 of the bf16 0.5 selection) whose
                # tool process segfaulted (rc 139) when two ran in one process (sessions 37, 38): one test per process,
                # then, for any that crash again, the same test with XLA's command buffers off
  SAN_TIMEOUT=90 run_tool_chunks memcheck all tests/test_kgather_kernels.py \
    "gpu and transposed_pack_matches and bfloat16 and 0.5" 15 1 19
  XLA_FLAGS=--xla_gpu_enable_command_buffer= SAN_TIMEOUT=90 run_tool_chunks memcheck all tests/test_kgather_kernels.py \
    "gpu and transposed_pack_matches and bfloat16 and 0.5" 15 2 19 ;;
dx_fix)  # prepared in session 37, not yet run: the 16-bit dense dx on CUDA (_dense_tangent_matmul) and what session 37
        # left unchecked. GPU tests of the gradient paths and the nn layers; memcheck over the 10 given-index
        # transposed-pack tests whose tool process crashed in session 37 (chunks of 2); bench_nn_linear; the SparseLinear
        # step's kernels (profile_nn_linear --layer sparse). About 120 s build + 400 s.
  pytest_gpu 200 tests/test_kgather.py tests/test_nn_linear.py -k "not cpu and (half_gradients or grad or sparse_linear or SparseLinear or pruned)"
  SAN_TIMEOUT=90 run_tool_chunks memcheck all tests/test_kgather_kernels.py \
    "gpu and transposed_pack_matches and bfloat16 and 0.5" 15 2 20
  SAN_TIMEOUT=90 run_tool_chunks memcheck all tests/test_kgather_kernels.py \
    "gpu and transposed_pack_matches and bfloat16 and 0.5" 25 2 30
  timeout -k 5 ${BENCH_TIMEOUT:-150} python3 benchmarks/bench_nn_linear.py --out $OUT/nn_linear 2>&1 | grep -E "^\| [SP]|Error" | tee -a $LOG
  PYTHONPATH=benchmarks timeout -k 5 100 python3 -P benchmarks/profile_nn_linear.py --layer sparse --sparsity 0.95 \
    --out $OUT/nn_profile 2>&1 | tee -a $LOG | grep -E "^###"
  echo "dx_fix $((SECONDS-t0))s" ;;
nn_linear)  # session 36: pit_jax.nn.SparseLinear / PrunedLinear and the pruning functions on the GPU, memcheck over
           # their GPU tests (chunks of 8), bench_nn_linear ($OUT/nn_linear); KGATHER=1 adds the k-gather suites
  [[ "${TESTS:-1}" == 1 ]] && pytest_gpu 200 tests/test_nn_linear.py
  [[ "${SAN:-1}" == 1 ]] && SAN_TIMEOUT=150 run_tool_chunks memcheck all tests/test_nn_linear.py \
    "gpu and (SparseLinear or sparse_linear or pruned_linear) and not optax" 0 8
  timeout -k 5 ${BENCH_TIMEOUT:-240} python3 benchmarks/bench_nn_linear.py --out $OUT/nn_linear 2>&1 | grep -E "^\| [SP]|Error" | tee -a $LOG
  echo "bench $((SECONDS-t0))s"
  [[ "${KGATHER:-0}" == 1 ]] && pytest_gpu ${TEST_TIMEOUT:-300} tests/test_kgather.py tests/test_kgather_kernels.py ;;
kgather_device)  # session 35: PIT_KGATHER_DW=device (the products path or the gated dense GEMM,
                # kgather_dw_dense_sm90.cu): the device-mode and dW tests, the staged MoE dW tests (the
                # shared CUTLASS header), bench_kgather_dw over VARIANTS, memcheck over the bf16 device-mode tests
  [[ "${TESTS:-1}" == 1 ]] && pytest_gpu ${TEST_TIMEOUT:-200} tests/test_kgather_kernels.py -k "gpu and (device_mode or products or dw)"
  [[ "${MOE:-1}" == 1 ]] && pytest_gpu 150 tests/test_moe_kernels.py -k "staged and (tn or dw)"
  dw_bench "0.5 0.9 0.95 0.98 0.99" given
  dw_bench "0.5 0.9 0.95 0.98 0.99" own
  # memcheck in processes of 7 tests (the tool's own process crashed after 6 tests over a longer selection)
  [[ "${SAN:-1}" == 1 ]] && SAN_TIMEOUT=150 run_tool_chunks memcheck all tests/test_kgather_kernels.py \
    "gpu and device_mode and ((bfloat16 and 0.5 and not 64) or garbage)" 0 7 ;;
ncu_dw_device)  # session 35: per-kernel times (real clocks, L2 not flushed) of one PIT_KGATHER_DW=device dW call, index
               # detected in the call, at 4096³ and fc2 over SPARSITY (default 0.99 0.9), $OUT/ncu_dw_device.txt
  for shape in "4096 4096 4096" "4096 16384 4096"; do
    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=benchmarks timeout -k 5 150 ncu --clock-control none --cache-control none \
      --kernel-name regex:'pit_kgather|gated|cutlass|device_kernel' --section SpeedOfLight \
      python3 -P benchmarks/profile_kgather_dw.py --shape $shape --mode device --index own \
      --sparsity ${SPARSITY:-0.99 0.9} >> $OUT/ncu_dw_device.txt 2>&1
    echo "rc $? ($shape)" >> $OUT/ncu_dw_device.txt
  done
  grep -E "^  [a-zA-Z_].*\(|Duration|DRAM Throughput|rc |sparsity" $OUT/ncu_dw_device.txt | sed 's/(const T1.*//; s/  */ /g' | tee -a $LOG
  echo "ncu $((SECONDS-t0))s" ;;
ncu_kgather_dw)  # session 33: Nsight Compute on the dW path's kernels at 4096³, SPARSITY (default 0.99 0.9), $OUT/ncu_dw.txt
  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=benchmarks timeout -k 5 200 ncu \
    --kernel-name regex:'pit_kgather_(tn|pack|colmask)' \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio \
    python3 -P benchmarks/profile_kgather_dw.py --sparsity ${SPARSITY:-0.99 0.9} >> $OUT/ncu_dw.txt 2>&1
  echo "rc $?" >> $OUT/ncu_dw.txt
  grep -E "^==|pit_kgather|Duration|Throughput|Achieved Occupancy|Registers|Warp Cycles Per Issued|Issued Warp|No Eligible|rc |ERROR|sparsity" $OUT/ncu_dw.txt | sed 's/(const T1.*//; s/  */ /g' | tee -a $LOG
  grep -E "stalled" $OUT/ncu_dw.txt | awk '$NF+0 > 0.3' | sed 's/  */ /g' | tee -a $LOG
  echo "ncu $((SECONDS-t0))s" ;;
kgather_san)  # session 32: memcheck and racecheck over the default k-gather configuration (dependent launches on
             # the fused path, the one-tile forward; session 32 ran it on 152b4ad, with "not persistent"): kernel-suite and fused-suite selections, one process each
  SAN_TIMEOUT=150 run_tool memcheck pit_kgather tests/test_kgather_kernels.py "gpu and (0.5 or 1.0 or garbage or many_row or dense_sparse)"
  SAN_TIMEOUT=150 run_tool memcheck pit_kgather tests/test_kgather_fused.py "gpu and not overlap"
  SAN_TIMEOUT=150 run_tool racecheck pit_kgather tests/test_kgather_kernels.py "gpu and (0.5 or 1.0 or garbage or many_row or dense_sparse)"
  SAN_TIMEOUT=150 run_tool racecheck pit_kgather tests/test_kgather_fused.py "gpu and not overlap and (0.5 or 1.0 or many)" ;;
kgather_race_chunks)  # session 32: racecheck over kgather_san's kernel-suite selection, CHUNK tests per process
                     # (its one-process run ended in a segmentation fault of the tool's process)
  SAN_TIMEOUT=150 run_tool_chunks racecheck pit_kgather tests/test_kgather_kernels.py \
    "gpu and (0.5 or 1.0 or garbage or many_row or dense_sparse)" ${FIRST:-0} ${CHUNK:-9} ${LAST:-}  ;;
kgather_swizzle)  # session 30: the forward's swizzled (unpadded) stage rows — the k-gather suites, the
                 # forward_ladder probe (the package's kernel next to the padded skeleton it replaced, same
                 # process), bench_sparse_dense's 32x1 table (no BCOO), then memcheck and racecheck (SAN=1)
  [[ "${TESTS:-1}" == 1 ]] && pytest_gpu 250 tests/test_kgather.py tests/test_kgather_kernels.py tests/test_kgather_fused.py
  forward_ladder "package forward|\\| full \\| 2 x 64"
  [[ "${SPARSE_DENSE:-1}" == 1 ]] && timeout -k 5 ${BENCH_TIMEOUT:-250} python3 benchmarks/bench_sparse_dense.py --no-bcoo \
     --tiles 32x1 --out $OUT/sparse_dense 2>&1 | grep -E "^\| [4O]" | tee -a $LOG
  echo "bench $((SECONDS-t0))s"
  if [[ "${SAN:-0}" == 1 ]]; then
    SAN_TIMEOUT=150 run_tool memcheck pit_kgather tests/test_kgather_kernels.py "gpu and (0.5 or 1.0 or garbage or many_row or dense_sparse)"
    SAN_TIMEOUT=150 run_tool racecheck pit_kgather tests/test_kgather_kernels.py "gpu and (0.5 or 1.0 or garbage or many_row or dense_sparse)"
    SAN_TIMEOUT=150 run_tool memcheck pit_kgather tests/test_kgather_fused.py "gpu"
  fi ;;
kgather)
  pytest_gpu ${TEST_TIMEOUT:-200} tests/test_kgather.py tests/test_kgather_kernels.py
  timeout -k 5 ${BENCH_TIMEOUT:-280} python3 benchmarks/bench_sparse_dense.py --no-bcoo --tiles 32x1 --out $OUT/sparse_dense 2>&1 | grep "^| [4O]"
  echo "bench $((SECONDS-t0))s" ;;
persistent)
  pytest_gpu 250 tests/test_moe_kernels.py -k persistent
  for tool in memcheck racecheck; do
    SAN_TIMEOUT=100 run_tool $tool pit_moe tests/test_moe_kernels.py "bfloat16 and persistent and (uniform or one_hot)"
  done
  timeout -k 5 ${BENCH_TIMEOUT:-250} python3 benchmarks/bench_moe_persistent.py --out $OUT/persistent 2>&1 | grep "^| [MQ]" | tee -a $LOG
  echo "bench $((SECONDS-t0))s" ;;
hostsync)
  CB=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN
  for variant in "default|" "conditional|--xla_gpu_enable_command_buffer=$CB,CONDITIONAL" \
                 "conditional_min1|--xla_gpu_enable_command_buffer=$CB,CONDITIONAL --xla_gpu_graph_min_graph_size=1"; do
    name=${variant%%|*}; flags=${variant#*|}
    echo "== host sync probe, $name: XLA_FLAGS='$flags'" | tee -a $LOG
    XLA_FLAGS="$flags" timeout -k 5 ${BENCH_TIMEOUT:-150} python3 benchmarks/probe_host_sync.py --out $OUT/hostsync_$name 2>&1 | grep -E "^\| [ds]|Error" | tee -a $LOG
    echo "probe $((SECONDS-t0))s"
  done ;;
ncu_persistent)
  timeout -k 5 300 ncu --kernel-name regex:pit_moe_forward --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section LaunchStats python3 benchmarks/profile_moe_persistent.py > $OUT/ncu_persistent.txt 2>&1
  echo "rc $?" >> $OUT/ncu_persistent.txt
  grep -E "PIT_MOE_PERSISTENT=|pit_moe_forward|Duration|DRAM Throughput|Compute \(SM\) Throughput|L2 Hit Rate|Mem Busy|Grid Size|rc " $OUT/ncu_persistent.txt | sed 's/(const T1.*//; s/  */ /g' | tee -a $LOG
  echo "ncu $((SECONDS-t0))s" ;;
colband)
  pytest_gpu 250 tests/test_moe_kernels.py
  timeout -k 5 150 python3 benchmarks/bench_moe_persistent.py --switch PIT_MOE_COL_BAND 1 default --out $OUT/colband 2>&1 | grep "^| [MQ]" | tee -a $LOG
  echo "bench $((SECONDS-t0))s"
  timeout -k 5 180 python3 benchmarks/bench_moe.py --no-projection --layer-cases Qwen3-30B-A3B-like --out $OUT/layer 2>&1 | grep "^| [MQ]" | tee -a $LOG
  echo "layer $((SECONDS-t0))s" ;;
detect_write_order)
  pytest_gpu 200 $DETECT_SUITES
  SAN_TIMEOUT=150 run_tool memcheck pit_detect tests/test_detect.py "gpu and (write_order or word_rows or grouped_prefix or (row_bits and not off) or chunking_edges or dtypes_and_sparsity or unaligned)"
  SAN_TIMEOUT=150 run_tool racecheck pit_detect tests/test_detect.py "gpu and (write_order or word_rows or grouped_prefix or (row_bits and not off and not 70000) or chunking_edges or dtypes_and_sparsity)"
  detect_ab_by_sparsity 100 ab_write_order "${CASES:-3 0}" "${VARIANTS:-PIT_DETECT_WARP_IDS=0}" ${SPARSITIES:-0.9 0.5 0.0}
  bench_detect_table ;;
moe_fast_rows)
  pytest_gpu 300 tests/test_moe_kernels.py -k "kernel_matches or fused"
  SAN_TIMEOUT=150 run_tool memcheck pit_moe_forward tests/test_moe_kernels.py "default and bfloat16 and kernel_matches"
  timeout -k 5 ${BENCH_TIMEOUT:-250} python3 benchmarks/bench_moe_persistent.py --switch PIT_MOE_FAST_ROWS 0 1 \
    --out $OUT/moe_fast_rows_ab 2>&1 | grep "^| [MQ]" | tee -a $LOG
  echo "ab $((SECONDS-t0))s" ;;
verify)
  # SUITES picks a subset: on an H100 (session 15) the three did not fit one 600 s call with the build
  # (MoE past 280 s, detect 50 s, k-gather 124 s), so run "moe" and "detect kgather" as two calls there.
  for suite in ${SUITES:-moe detect kgather}; do
    case $suite in
      moe) moe_suites 400 ;;
      detect) pytest_gpu 200 $DETECT_SUITES ;;  # 85-110 s on an H200 (sessions 28, 29)
      kgather) pytest_gpu 200 tests/test_kgather.py tests/test_kgather_kernels.py ;;
    esac
  done ;;
detect_one_pass)
  [[ "${TESTS:-all}" == all ]] && pytest_gpu 200 $DETECT_SUITES
  [[ "${TESTS:-all}" == one_pass ]] && pytest_gpu 100 tests/test_detect.py -k "gpu and one_pass" -rf
  detect_ab_by_sparsity 150 ab_one_pass "${CASES:-0 3 4}" "${VARIANTS:-PIT_DETECT_ONE_PASS=0 PIT_DETECT_ONE_PASS=1}" \
    ${SPARSITIES:-0.9 0.0} ;;
detect_one_pass_san)
  SAN_TIMEOUT=200 run_tool memcheck pit_detect tests/test_detect.py "gpu and one_pass and not never and (bfloat16 or float32)"
  SAN_TIMEOUT=150 run_tool racecheck pit_detect tests/test_detect.py "gpu and one_pass and forced and (bfloat16 or float32)" ;;
detect_bench)
  bench_detect_table ;;
detect_profile)  # session 29: per-kernel durations and gaps of the 4096² detections inside the jitted loop, next to
                 # XLA's copy, column-OR and flat sum (profile_detect_kernels.py, $OUT/detect_profile)
  (cd benchmarks && timeout -k 5 ${PROFILE_TIMEOUT:-200} python3 profile_detect_kernels.py --case ${PROFILE_CASES:-0 2} \
    --variants ${VARIANTS:-default} --forms ${FORMS:-total} --out $OUT/detect_profile 2>&1 | grep -v "^{" | tee -a $LOG)
  echo "profile $((SECONDS-t0))s" ;;
detect_segments)
  pytest_gpu 90 tests/test_detect.py -k "gpu and (row_bits or dtypes_and_sparsity)"
  SAN_TIMEOUT=70 run_tool memcheck pit_detect tests/test_detect.py "gpu and row_bits and not off"
  SAN_TIMEOUT=70 run_tool racecheck pit_detect tests/test_detect.py "gpu and row_bits and not off and not 70000"
  detect_ab_by_sparsity 60 ab_segments 1 "${VARIANTS:-PIT_DETECT_ROW_BITS=single}" 0.9 0.0 ;;
staged)  # the staged MoE forward (gather, CUTLASS grouped GEMM, scatter): its tests, the kernel fixture's
         # "staged" variant, the fused-epilogue and lowering tests (STAGED_TESTS: another -k), then memcheck
         # and racecheck over every kernel of its bf16 tests
  pytest_gpu ${TEST_TIMEOUT:-300} tests/test_moe_kernels.py -k "${STAGED_TESTS:-staged or fused_epilogue or lowers}"
  SAN_TIMEOUT=150 run_tool memcheck all tests/test_moe_kernels.py "(staged_forward or staged_dw) and bfloat16"
  SAN_TIMEOUT=150 run_tool racecheck all tests/test_moe_kernels.py "(staged_forward or staged_dw) and bfloat16 and not one_hot" ;;
scatter_epilogue)  # session 21: the staged forward's scatter epilogue — the staged tests (forward in four layouts,
                  # the kernel fixture's staged variant, lowering), then the A/B of the scattered projection
                  # (PIT_MOE_STAGED=0: fused kernel; default: staged, the epilogue's SWrite) at T=4096 and 16384
  pytest_gpu ${TEST_TIMEOUT:-300} tests/test_moe_kernels.py -k "${STAGED_TESTS:-staged or lowers}"
  moe_ab 300 scatter_ab --switch PIT_MOE_STAGED 0 default --cases "Mixtral up T=4096" "Mixtral up T=16384" \
    --parts "projection" "scattered projection" ;;
staged_split)  # session 21: the staged forward's large experts split into row blocks — the staged tests, then the A/B
              # (PIT_MOE_STAGED_SPLIT=0 vs default, read per launch) of the projections at T=16384 (T=4096 has no
              # expert large enough to split)
  pytest_gpu ${TEST_TIMEOUT:-300} tests/test_moe_kernels.py -k "${STAGED_TESTS:-staged or lowers}"
  moe_ab 300 split_ab --switch PIT_MOE_STAGED_SPLIT 0 default --cases "Mixtral up T=16384" \
    --parts "projection" "scattered projection" ;;
scatter_epilogue_san)  # memcheck and racecheck over every kernel of the bf16 staged-forward tests
  SAN_TIMEOUT=150 run_tool memcheck all tests/test_moe_kernels.py "staged_forward and bfloat16"
  SAN_TIMEOUT=150 run_tool racecheck all tests/test_moe_kernels.py "staged_forward and bfloat16 and not one_hot" ;;
staged_dw_ab)  # A/B of the staged dW (PIT_MOE_STAGED_DW=0 vs 1, chosen when lowering): the projection's dW
  moe_ab 250 staged_dw_ab --switch PIT_MOE_STAGED_DW 0 1 --parts "projection dW" ;;
staged_ab)  # A/B of the staged forward (PIT_MOE_STAGED=0 vs 1, chosen when lowering), forward parts
  moe_ab 250 staged_ab --switch PIT_MOE_STAGED 0 1 --parts "projection" "scattered projection" "up swiglu" "down scale" ;;
staged_layer)  # the Mixtral layer table on the landed rules (staged forward and staged dW), then the staged
               # forward and staged dW A/Bs on Mixtral T=16384
  layer_table 220 layer_mixtral "Mixtral up T=4096"
  moe_ab 200 staged_ab_16k --switch PIT_MOE_STAGED 0 default --cases "Mixtral up T=16384" \
    --parts "projection" "scattered projection"
  moe_ab 200 staged_dw_ab_16k --switch PIT_MOE_STAGED_DW 0 default --cases "Mixtral up T=16384" --parts "projection dW"
  echo "staged_layer $((SECONDS-t0))s" ;;
layer_kernels)  # per-kernel device time of one Mixtral layer step, pit and dense (JAX profiler; $OUT/layer_kernels)
  timeout -k 5 ${BENCH_TIMEOUT:-200} python3 benchmarks/profile_layer_kernels.py --out $OUT/layer_kernels 2>&1 | grep -E "^(###|\| )" | head -${ROWS:-60} | tee -a $LOG
  echo "layer_kernels $((SECONDS-t0))s" ;;
examples)  # the issue examples on the GPU with their timings ($OUT/*.log): the sparse-training MLP (k-gather
           # dense_sparse; scikit-learn installed offline from .whl/ when the box lacks it: put its wheels there
           # first, pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
           # manylinux2014_x86_64 scikit-learn joblib threadpoolctl -d .whl) and the MoE language model in bf16
  python3 -c "import sklearn" 2>/dev/null || pip install --no-index --no-deps -q .whl/scikit_learn-*.whl .whl/joblib-*.whl \
    .whl/threadpoolctl-*.whl 2>&1 | tail -2 | tee -a $LOG
  timeout -k 5 ${EX_TIMEOUT:-240} python3 examples/sparse_training_mlp.py 2>&1 | tr '\r' '\n' | grep -v "^  \[" > $OUT/sparse_training_mlp.log
  echo "rc ${PIPESTATUS[0]}" >> $OUT/sparse_training_mlp.log
  tail -10 $OUT/sparse_training_mlp.log | tee -a $LOG
  timeout -k 5 150 python3 examples/moe_language_model.py --dtype bfloat16 --steps 60 --batch 32 --seq 256 --d 512 --d-ff 1024 --layers 4 --experts 8 --top-k 2 2>&1 | tr '\r' '\n' | grep -v "^  [a-z]* *\[.*\] [0-9]*/" > $OUT/lm_example.log
  tail -6 $OUT/lm_example.log | tee -a $LOG
  echo "examples $((SECONDS-t0))s" ;;
ab_4calls)  # session 23: the skip-idle-half and two-ended A/Bs again, Qwen-like calls now 4 per jitted step
  for sw in "PIT_MOE_SKIP_IDLE_HALF 0 default" "PIT_MOE_TWO_ENDED 0 1"; do
    moe_ab 220 ab_4calls_${sw%% *} --switch $sw --cases "Qwen3-30B-A3B-like" --routings uniform zipf one-hot \
      --parts "projection" "scattered projection" "up swiglu"
  done ;;
dispatch_bound)  # session 23: the Qwen-like projection with 1 and 4 calls per jitted step (probe_dispatch_bound.py)
  (cd benchmarks && timeout -k 5 200 python3 probe_dispatch_bound.py --out $OUT/dispatch_bound 2>&1 | grep "^|" | tee -a $LOG) ;;
route_order)  # session 27: profile_route_in_call.py alone (dependent launches on): per call of a whole step and one
             # routed step's kernel order, first run on a GPU ($OUT/route_in_call)
  route_in_call_profile route_in_call
  echo "route_order $((SECONDS-t0))s" ;;
route_in_call)  # session 24: the routing's exposed time inside the Qwen-like call (profiler trace, with
                # dependent launches and with PIT_MOE_PDL=0), then the routing kernels under ncu at the card's clocks
  route_in_call_profile route_in_call
  PIT_MOE_PDL=0 route_in_call_profile route_in_call_nopdl
  for routing in uniform one-hot; do
    (cd benchmarks && timeout -k 5 120 ncu --clock-control none --kernel-name regex:pit_moe_route --launch-skip 2 --launch-count 2 \
      --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats \
      python3 profile_moe_route.py --shape 2048 128 8 --routing $routing > $OUT/ncu_route_$routing.txt 2>&1)
    grep -E "pit_moe_route|Duration|Stall|Warp Cycles Per Issued" $OUT/ncu_route_$routing.txt | sed 's/(const.*//; s/  */ /g' | head -30 | tee -a $LOG
  done
  # session 24: ncu failed on the rank kernel above ("An error occurred while trying to profile"); again without
  # dependent launches, replaying the application, with the warp stall samples per source line
  (cd benchmarks && PIT_MOE_PDL=0 timeout -k 5 150 ncu --clock-control none --replay-mode application \
    --kernel-name regex:pit_moe_route_rank --launch-skip 1 --launch-count 1 --section SpeedOfLight --section WarpStateStats \
    --section SourceCounters python3 profile_moe_route.py --shape 2048 128 8 --routing uniform --calls 3 \
    > $OUT/ncu_route_rank_uniform.txt 2>&1)
  grep -E "pit_moe_route|Duration|==ERROR==|Stall" $OUT/ncu_route_rank_uniform.txt | sed 's/(const.*//; s/  */ /g' | head -20 | tee -a $LOG
  echo "route_in_call $((SECONDS-t0))s" ;;
route_tool_crash)  # session 24: the 16384-assignment, 139-expert routing tests (the rank path's largest count
                   # array, 140 x 64 = 8960) alone under memcheck and racecheck, each of the 4 (crowded / one-hot
                   # ids, rank path / three launches) in its own process; session 24's chunked sanitizers crashed
                   # the tool there (memcheck on one-hot, racecheck on crowded), session 22's ran them clean
  for tool in memcheck racecheck; do
    for ids in crowded one_hot; do
      for path in default 0; do
        SAN_TIMEOUT=120 run_tool $tool pit_moe_route tests/test_moe_kernels.py "routing_kernel and $ids-$path-16384-139"
      done
    done
  done ;;
san_moe_rest)  # session 25: the MoE sanitizer chunks session 24's run left (its tool crashed or the budget ended):
              # racecheck over the routing tests and the bf16 kernel tests from the 61st, memcheck over the
              # routing tests and the bf16 staged tests from the 31st (20000-assignment routing case left out)
  run_tool_chunks racecheck pit_moe_route tests/test_moe_kernels.py "routing_kernel and not 20000" 0 14
  run_tool_chunks memcheck pit_moe_route tests/test_moe_kernels.py "routing_kernel and not 20000" 0 14
  run_tool_chunks racecheck pit_ tests/test_moe_kernels.py "bfloat16 and not staged" 60 15
  run_tool_chunks memcheck all tests/test_moe_kernels.py "(staged_forward or staged_dw) and bfloat16" 30 20 ;;  # CUTLASS's kernels too
nn_moe_suite)  # tests/test_nn_moe.py alone on the GPU (session 23: moe_suites ran past its 400 s in that suite)
  pytest_gpu ${TEST_TIMEOUT:-400} tests/test_nn_moe.py ;;
moe_suites)  # the three MoE suites on the GPU (GPU vs CPU / float64): PART=verify SUITES=moe
  moe_suites ${TEST_TIMEOUT:-400} ;;
moe_refresh)  # session 32: bench_moe's projection table (Qwen-like and Mixtral T=4096) and layer table (both) on
             # main's MoE kernels, for the canonical benchmarks/results/moe.md ($OUT/projection, $OUT/layer)
  projection_table 260 projection "Qwen3-30B-A3B-like" "Mixtral up T=4096"
  layer_table 230 layer "Mixtral up T=4096" "Qwen3-30B-A3B-like" ;;
projection_mixtral)  # bench_moe's projection table for Mixtral T=4096 alone ($OUT/projection_mixtral)
  projection_table 200 projection_mixtral "Mixtral up T=4096" ;;
projection_16k)  # last run in session 6 (2026-11-26_h200_moe_final)
  projection_table 420 projection_16k "Mixtral up T=16384" ;;
projection)
  # all three cases ran past 220 s on an H100 (session 8); these two took 157 s
  projection_table 300 projection "Qwen3-30B-A3B-like" "Mixtral up T=4096" ;;
route_prefetch)  # the MoE kernel tests, the routing's id prefetch A/B (5 rounds), then the sanitize part
  pytest_gpu 200 tests/test_moe_kernels.py
  PIT_BENCH_ROUNDS=5 timeout -k 5 ${BENCH_TIMEOUT:-120} python3 benchmarks/bench_moe_persistent.py --switch PIT_MOE_ROUTE_PREFETCH 0 default --out $OUT/route_prefetch 2>&1 | grep "^| [MQ]" | tee -a $LOG
  echo "prefetch A/B $((SECONDS-t0))s"
  PART=sanitize SKIP_BUILD=1 bash $0 | grep -v "^build" ;;
memcheck_pdl)  # memcheck over the fused-epilogue MoE tests, verbose, with PIT_MOE_PDL=0 and then default
  for pdl in 0 1; do
    echo "== memcheck fused_epilogue PIT_MOE_PDL=$pdl" | tee -a $LOG
    PIT_MOE_PDL=$pdl XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout -k 5 150 \
      compute-sanitizer --tool memcheck --error-exitcode 97 --kernel-name kns=pit_moe python3 -P -m pytest tests/test_moe_kernels.py \
      -k "bfloat16 and fused_epilogue" -v -p no:cacheprovider -x > $OUT/memcheck_pdl$pdl.log 2>&1
    echo "rc $?" | tee -a $LOG
    grep -E "PASSED|FAILED" $OUT/memcheck_pdl$pdl.log | tail -2 | tee -a $LOG
    grep -E "ERROR SUMMARY|passed|failed" $OUT/memcheck_pdl$pdl.log | tail -2 | tee -a $LOG
  done ;;
pdl_modes)  # PIT_MOE_PDL 0 (off) and 2 (routing only) against the default (routing and forward), 5 rounds
  for mode in 0 2; do
    PIT_BENCH_ROUNDS=5 timeout -k 5 ${BENCH_TIMEOUT:-150} python3 benchmarks/bench_moe_persistent.py --switch PIT_MOE_PDL $mode default --out $OUT/pdl$mode 2>&1 | grep "^| [MQ]" | tee -a $LOG
    echo "pdl $mode A/B $((SECONDS-t0))s"
  done ;;
auto)
  timeout -k 5 ${BENCH_TIMEOUT:-150} python3 benchmarks/bench_kgather_auto.py --out $OUT/auto 2>&1 | grep "^| [4O]" | tee -a $LOG
  echo "auto $((SECONDS-t0))s" ;;
detect_chunked)  # the detect suites, memcheck and racecheck over the chunked-path and dtype tests
  pytest_gpu ${TEST_TIMEOUT:-200} $DETECT_SUITES
  run_tool memcheck pit_detect tests/test_detect.py "gpu and (chunking_edges or dtypes_and_sparsity)"
  run_tool racecheck pit_detect tests/test_detect.py "gpu and chunking_edges" ;;
route_ncu)  # the routing kernels' device times (ncu) on the Qwen-like and Mixtral shapes
  for args in "2048 128 8 --routing uniform" "2048 128 8 --routing one-hot" "4096 8 2 --routing uniform"; do
    echo "== ncu routing $args" | tee -a $LOG
    (cd benchmarks && timeout -k 5 90 ncu --kernel-name regex:pit_moe_route --metrics gpu__time_duration.sum,launch__grid_size \
      python3 profile_moe_route.py --shape $args > /tmp/ncu_route.log 2>&1)
    grep -E "pit_moe_route|gpu__time|launch__grid" /tmp/ncu_route.log | sed 's/(const.*//; s/(int.*//; s/  */ /g' | tee -a $LOG
  done ;;
route_two_launch)  # session 22: the routing's scan and scatter in one launch for small problems — the routing
                 # kernel tests (both paths), the routing kernels' device times (ncu, base clocks) with it on and off, the A/B
                 # (PIT_MOE_ROUTE_TWO_LAUNCH=0 vs default, read per launch) of the projection with the routing built
                 # in the call ("projection", routing outside, is the A/A control), then memcheck and racecheck
  pytest_gpu 200 tests/test_moe_kernels.py -k "routing_kernel"
  route_ncu_each PIT_MOE_ROUTE_TWO_LAUNCH default 0
  moe_ab 250 route_two_launch_ab --switch PIT_MOE_ROUTE_TWO_LAUNCH 0 default --cases "Qwen3-30B-A3B-like" \
    "Mixtral up T=4096" --parts "routed projection" "projection"
  SAN_TIMEOUT=120 run_tool memcheck pit_moe_route tests/test_moe_kernels.py "routing_kernel and not 20000"
  SAN_TIMEOUT=120 run_tool racecheck pit_moe_route tests/test_moe_kernels.py "routing_kernel and default" ;;
skip_idle_half)  # see the header
  pytest_gpu 300 tests/test_moe_kernels.py -k "warpgroup_halves or (kernel_matches and default) or (gradients and default) or (fused_epilogue and tiled)"
  moe_ab 300 skip_idle_half_ab --switch PIT_MOE_SKIP_IDLE_HALF 0 default --cases "Qwen3-30B-A3B-like" \
    --routings uniform zipf one-hot --parts "projection" "scattered projection" "routed projection" "up swiglu" "down scale"
  ;;
two_ended)  # session 23: row tiles alternately from both ends (PIT_MOE_TWO_ENDED=1 vs 0), Qwen-like A/B
  pytest_gpu 200 tests/test_moe_kernels.py -k "warpgroup_halves"
  moe_ab 300 two_ended_ab --switch PIT_MOE_TWO_ENDED 0 1 --cases "Qwen3-30B-A3B-like" \
    --routings uniform zipf one-hot --parts "projection" "scattered projection" "up swiglu" "down scale" ;;
two_ended_default)  # the same switch's A/B once it is the default for few rows per expert (ROUNDS), then the table
  pytest_gpu 300 tests/test_moe_kernels.py -k "warpgroup_halves or (kernel_matches and default) or (gradients and default) or (fused_epilogue and tiled)"
  moe_ab 300 two_ended_default_ab --switch PIT_MOE_TWO_ENDED 0 default --cases "Qwen3-30B-A3B-like" \
    --routings zipf one-hot uniform --parts "projection" "routed projection" "up swiglu" "down scale"
  projection_table 200 projection_qwen "Qwen3-30B-A3B-like" ;;
skip_idle_half_san)  # memcheck and racecheck over skip_idle_half's new tests
  SAN_TIMEOUT=150 run_tool memcheck pit_moe_forward tests/test_moe_kernels.py "warpgroup_halves and bfloat16"
  SAN_TIMEOUT=150 run_tool racecheck pit_moe_forward tests/test_moe_kernels.py "warpgroup_halves and bfloat16 and default" ;;
projection_qwen)  # bench_moe's projection table, Qwen-like only ($OUT/projection_qwen)
  projection_table 200 projection_qwen "Qwen3-30B-A3B-like" ;;
layer_mixtral)  # bench_moe's layer table, Mixtral T=4096 only ($OUT/layer_mixtral)
  layer_table 220 layer_mixtral "Mixtral up T=4096" ;;
layer_qwen)  # bench_moe's layer table, Qwen-like only ($OUT/layer_qwen: routing % of the layer forward)
  layer_table 200 layer_qwen "Qwen3-30B-A3B-like" ;;
ncu_projection_dram)  # DRAM bytes, L2 hit rate and time of the gathered forward, Qwen-like (CASE), tables given
  for routing in ${ROUTINGS:-uniform zipf one-hot}; do
    echo "== ncu forward ${CASE:-Qwen3-30B-A3B-like} $routing" | tee -a $LOG
    (cd benchmarks && timeout -k 5 120 ncu --kernel-name regex:pit_moe_forward --launch-skip 1 --launch-count 1 \
      --clock-control none --cache-control all --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,sm__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__grid_size,launch__waves_per_multiprocessor,sm__cycles_active.avg,sm__cycles_active.max,sm__cycles_elapsed.max \
      python3 profile_moe_projection.py --case "${CASE:-Qwen3-30B-A3B-like}" --routing $routing > /tmp/ncu_proj.log 2>&1)
    grep -E "row tiles|gpu__time|dram__|lts__|sm__thr|sm__cycles|launch__" /tmp/ncu_proj.log | sed 's/  */ /g' | tee -a $LOG
  done
  echo "ncu $((SECONDS-t0))s" ;;
route_sanitize)  # memcheck and racecheck over the routing kernel tests (memcheck without the case its own process crashes on)
  run_tool memcheck pit_moe_route tests/test_moe_kernels.py "routing_kernel and not 20000"
  run_tool racecheck pit_moe_route tests/test_moe_kernels.py "routing_kernel" ;;
ncu_detect_1x1)  # Nsight Compute sections of the detect 1x1 rows kernel ($OUT/ncu_detect_1x1_rows.txt)
  NCU_TIMEOUT=120 bash scripts/ncu_detect_sections.sh 1x1 pit_detect_rows_kernel 1 1 > $OUT/ncu_detect_1x1_rows.txt 2>&1
  grep -E "Duration|DRAM Throughput|Memory Throughput|Registers|Achieved Occupancy|Block Limit" $OUT/ncu_detect_1x1_rows.txt | head -12 | tee -a $LOG
  echo "detect ncu $((SECONDS-t0))s" ;;
ncu)
  echo "== ncu: one SwiGLU layer step, Mixtral shape (T=4096, E=8, k=2, 4096->14336), bf16" >> $LOG
  # ncu writes to a file, not a pipe: a profiled process left behind by the timeout must not hold the pipe open
  timeout -k 5 120 ncu --kernel-name regex:pit_moe --metrics gpu__time_duration.sum python3 -P benchmarks/profile_moe.py > /tmp/ncu.log 2>&1
  grep -E "pit_moe|gpu__time" /tmp/ncu.log | sed 's/(const T1.*//; s/(long.*//; s/  */ /g' >> $LOG
  grep -E "gpu__time" $LOG | tr -s ' ' | tr '\n' ' '; echo
  echo "ncu $((SECONDS-t0))s"
  timeout -k 5 150 python3 examples/moe_language_model.py --dtype bfloat16 --steps 60 --batch 32 --seq 256 --d 512 --d-ff 1024 --layers 4 --experts 8 --top-k 2 2>&1 | tr '\r' '\n' | grep -v "^  [a-z]* *\[.*\] [0-9]*/" > $OUT/lm_example.log
  tail -6 $OUT/lm_example.log
  echo "lm $((SECONDS-t0))s" ;;
*)  # a misspelt or missing part must not pass silently (session 17 lost a run to one)
  echo "device_checks: no part named '$part'" | tee -a $LOG
  exit 2 ;;
esac
done
