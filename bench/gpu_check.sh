#!/usr/bin/env bash
# GPU evidence in one run (< 8 minutes on an H100 with the defaults):
#   1. environment.json   GPU, driver, torch / triton / Python versions, commit, and the two measured ceilings
#                         (large bf16 matmul TFLOP/s, device-to-device copy GB/s counting read + write)
#   2. pytest.log / .xml  the GPU tests: every kernel forward and backward in bf16, fp16 and fp32, the
#                         patched towers and FineCLIP on the compiled kernels (pytest-xdist when installed)
#      sanitizer.log      meanwhile, bench/attention_repro.py (bf16 forward + backward at head dims 64-88)
#                         under compute-sanitizer's memcheck, when it is installed
#      warmup/            and sharded warm-up runs of the benches fill Triton's compile cache in
#                         parallel (autotuning compiles every candidate; the timed runs then only load them)
#      aot.log            then the C library's export + CMake build + ctest, its GPU test included (tests/aot)
#   3. one --quick run of each bench (attention, loss, patch_embed, integrations, train_step when present),
#      one after the other on an otherwise idle GPU: JSON / markdown / PNG and a log each
#   4. summary.txt        every stage's exit status and the targets each bench printed
# Usage: bash bench/gpu_check.sh [OUT_DIR] [--full]   (OUT_DIR defaults to $OUT or bench/results/gpu_check)
# FINEVIT_ATTENTION_TUNING=wide in the environment widens the attention autotune lists for the benches (not
# the tests): each candidate's time lands in the attention JSON's "autotune" entries (bench/NOTES.md).
# Each stage has a time limit, so a hung stage costs its limit and the rest still run. Exits non-zero when
# the tests or any bench failed. Needs torch >= 2.11 and triton >= 3.6; no network.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/results/gpu_check}}"
mode="--quick"
[ "${2:-}" = "--full" ] && mode=""
mkdir -p "$out/warmup"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary="$out/summary.txt"
: > "$summary"
failed=0
note() { echo "$*" | tee -a "$summary"; }

# 1. Environment and ceilings.
timeout 120 python bench/_harness.py --environment "$out/environment.json" > "$out/environment.log" 2>&1
note "environment exit $? ($(python -c "import json,sys; e=json.load(open(sys.argv[1])); print(e['env']['gpu'], \
'| torch', e['env']['torch'], '| triton', e['env']['triton'], '| matmul %.0f TFLOP/s | copy %.0f GB/s' % \
(e['ceilings']['matmul']['tflops'], e['ceilings']['copy']['gbps']))" "$out/environment.json" 2>/dev/null))"

# 2. Tests, with the benches' compile-cache warm-up beside them.
benches=(attention loss patch_embed integrations)
[ -f bench/train_step.py ] && benches+=(train_step)
declare -A shards=([attention]=6 [patch_embed]=2 [integrations]=3 [train_step]=2)  # loss: fixed configs
warm_pids=()
for bench in "${benches[@]}"; do
  n=${shards[$bench]:-0}
  for ((k = 0; k < n; k++)); do
    FINEVIT_BENCH_WARMUP="$k/$n" timeout 200 python "bench/$bench.py" $mode --out "$out/warmup/files" \
      > "$out/warmup/$bench-$k.log" 2>&1 &
    warm_pids+=($!)
  done
done
sanitizer_pid=
if command -v compute-sanitizer > /dev/null; then
  timeout 200 compute-sanitizer --tool memcheck --print-limit 5 python bench/attention_repro.py \
    > "$out/sanitizer.log" 2>&1 &
  sanitizer_pid=$!
fi
xdist=$(python -c "import xdist" 2>/dev/null && echo "-n 8")
env -u FINEVIT_ATTENTION_TUNING timeout 200 python -m pytest -q -rfE --maxfail=10 $xdist -p no:cacheprovider --junitxml="$out/pytest.xml" \
  tests/kernels tests/integrations tests/model/test_triton_path.py > "$out/pytest.log" 2>&1
rc=$?
note "tests exit $rc: $(tail -n 1 "$out/pytest.log")"
# The C library (issue 11): export, CMake build and ctest, whose gpu_kernels test runs every exported kernel
# through the C API against finevit.kernels' outputs on this GPU. Needs cmake and a C/C++ compiler.
if command -v cmake > /dev/null && command -v cc > /dev/null; then
  env -u FINEVIT_ATTENTION_TUNING timeout 300 python -m pytest -q -rfE -p no:cacheprovider tests/aot \
    > "$out/aot.log" 2>&1
  aot=$?
  note "C library (tests/aot, ctest gpu_kernels) exit $aot: $(tail -n 1 "$out/aot.log")"
  [ $aot -ne 0 ] && failed=1
else
  note "C library: skipped (no cmake or C compiler on this machine)"
fi
[ "$rc" -eq 0 ] || failed=1
grep -E "^(FAILED|ERROR)" "$out/pytest.log" | head -n 40 | tee -a "$summary"
if [ -n "$sanitizer_pid" ]; then
  wait "$sanitizer_pid"
  note "attention repro under compute-sanitizer exit $?: $(grep -E "ERROR SUMMARY|TOO LARGE" "$out/sanitizer.log" | head -n 3)"
fi
warm_failed=0
for pid in "${warm_pids[@]}"; do wait "$pid" || warm_failed=$((warm_failed + 1)); done
note "warm-up: ${#warm_pids[@]} processes, $warm_failed failed (logs in warmup/)"
rm -rf "$out/warmup/files"

# 3. The timed benches, one at a time.
declare -A limits=([attention]=150 [loss]=120 [patch_embed]=50 [integrations]=60 [train_step]=90)
for bench in "${benches[@]}"; do
  timeout "${limits[$bench]}" python "bench/$bench.py" $mode --out "$out" > "$out/$bench.log" 2>&1
  rc=$?
  note "$bench exit $rc"
  [ "$rc" -eq 0 ] || failed=1
  sed -n '/^Targets/,/^$/p' "$out/$bench.log" | tee -a "$summary"
done
exit "$failed"
