#!/usr/bin/env bash
# The whole GPU check in one bounded run: it always ends, with a report, within its budget (default 330 s: a
# lent GPU session has 15 minutes of device time in all, start-up included, so one check and one rerun fit).
#
# Usage: bash bench/gpu_check.sh [OUT_DIR] [--full] [--cpu]     (OUT_DIR defaults to $OUT or bench/results/gpu_check)
#
# Stages, in order; each runs under `timeout` with min(its limit, time left before the deadline), is sent SIGINT
# at that limit (pytest then still prints its summary) and SIGKILL 5 s later, and appends exactly one line to
# summary.txt:   [name] ok | failed (exit N) | cut at N s | skipped: REASON  ·  wall seconds  ·  key result
# (details, such as failing test names or a bench's Targets block, follow it indented).
#   environment   60 s  python bench/_harness.py --environment: GPU, driver, versions, commit, measured matmul and
#                       copy ceilings
#   warmup        75 s  a time box, not a test: Triton's compile caches filled in parallel by the benches' sharded
#                       warm-up processes (FINEVIT_BENCH_WARMUP=k/n, only for the benches selected) and by
#                       8 bench/warm_kernels.py shards (every kernel forward + backward once per dtype at the tests'
#                       shapes, fp32 attention first: its compiles are the slowest); processes still compiling at the
#                       box are stopped (what they compiled stays cached) and counted, not failed; a process that
#                       fails fails the stage
#   pytest       150 s  tests/kernels tests/integrations tests/model/test_triton_path.py on the GPU, without the
#                       compile check's CPU-side triton matrix (CI runs it; it needs the network): -v (one line
#                       per test, so a cut run still names its failures and the test it was running), pytest-xdist
#                       -n 12 and pytest-timeout --timeout 90 per test when installed, junit xml; the failing test
#                       ids go to the summary
#   repro         60 s  bench/attention_repro.py: bf16 forward + backward errors vs float64 at head dims 64, 72, 80,
#                       88, 128 with and without RoPE, both backwards (deterministic, and atomic: dQ added with
#                       atomics), against PyTorch's bf16 error (table in the summary);
#                       TRITON_CACHE_AUTOTUNING=1 keeps its autotune choices on disk for the next stage
#   bench_train_step 90 s, bench_attention 90 s, bench_loss 120 s (its 1M-pair probe alone takes ~1 min),
#                       bench_patch_embed 60 s (both strategies pinned besides the dispatched one), bench_rope 45 s
#                       (3 cases; its torch.compile baseline's compiles come from the warm-up's caches),
#                       bench_integrations 45 s:
#                       one --quick run each (train_step's --quick runs b16 and so400m14, head dim 72, at 16k
#                       tokens), one after the other; their Targets blocks, and train_step's host syncs per step,
#                       go to the summary
#   sanitizer     60 s  the same repro under compute-sanitizer memcheck (PYTORCH_NO_CUDA_MEMORY_CACHING=1, so an
#                       access past a tensor is past its allocation; the autotune choices come from the disk cache,
#                       so only the chosen kernels run instrumented); when compute-sanitizer is installed
#   aot           90 s  tests/aot: the C library's export, CMake build and ctest (its GPU test runs every exported
#                       kernel through the C API); when cmake and a C compiler exist
# The stages together can ask for more than the budget: later stages get what is left and report "skipped: no time
# left" when under 15 s remain. They run in order of what the evidence needs first (correctness, the training step,
# attention, then the rest). A second run can take what the first skipped, e.g. with
# FINEVIT_GPU_CHECK_STAGES=environment,warmup,bench,sanitizer,aot (a name selects that stage, or every stage it
# prefixes + "_"): a lent GPU's 15 minutes hold start-up and two runs.
# The limits are estimates: this script has not yet run on a GPU (its CPU mode is what CI runs). The summaries,
# the result line and the packing get the last 12 s of the budget.
#
# Output (a lent machine hands back at most 8 files, at most 2 folders deep): OUT_DIR/summary.txt (GPU, driver,
# torch, triton, commit and date first, then the stage lines as they finish, then the result line) and
# OUT_DIR/gpu_check.tar.gz with everything else: each stage's log, pytest.xml, attention_repro.json, warm-up logs,
# and results/ with the benches' json / md / png (the files committed under bench/results/). Intermediate files live
# in a temporary folder, packed by an EXIT trap, so a cut or interrupted run still leaves the two files.
# Exit status: 0 every stage ok or skipped for a missing tool; 1 a stage failed or was cut (or the run was
# interrupted); 2 none failed but a stage was skipped for lack of time.
#
# --full: the benches without --quick (far over the default budget). --cpu or FINEVIT_GPU_CHECK_CPU=1: the CPU mode
# that CI runs (tests/bench/test_gpu_check.py): CUDA hidden, budget 240 s, each stage's CPU equivalent with small
# limits (environment with --cpu-smoke ceilings; warm-up: warm_kernels.py in Triton's interpreter and one patch_embed
# shard; pytest: tests/kernels/test_dispatch.py; repro: fp16 at head dim 72, both backwards, interpreted; sanitizer:
# skipped; aot: one tests/aot case; benches: --cpu-smoke).
# Environment: FINEVIT_GPU_CHECK_BUDGET (s), FINEVIT_GPU_CHECK_STAGES (comma list), FINEVIT_GPU_CHECK_LIMIT_<STAGE>
# (s, e.g. FINEVIT_GPU_CHECK_LIMIT_PYTEST=120), FINEVIT_GPU_CHECK_XDIST (workers, 0 = none),
# FINEVIT_GPU_CHECK_TEST_TIMEOUT (s per test), FINEVIT_GPU_CHECK_PYTEST (the pytest stage's selection),
# FINEVIT_GPU_CHECK_HANG (comma list of stages that sleep forever before their work: a self-test of the limits),
# FINEVIT_ATTENTION_TUNING=wide (widens the attention autotune lists for the benches, not the tests: each
# candidate's time lands in the attention JSON's "autotune" entries, bench/NOTES.md), GIT_COMMIT (the commit to
# record when the tree has no .git), PYTHON (interpreter, default python). Needs torch >= 2.11, triton >= 3.6,
# GNU coreutils timeout; no network.
set -uo pipefail

out="" full=0 cpu=${FINEVIT_GPU_CHECK_CPU:-0}
for arg in "$@"; do
  case $arg in
    --full) full=1 ;;
    --cpu) cpu=1 ;;
    -h | --help) sed -n '2,/^set -uo/{/^set -uo/d; s/^# \{0,1\}//; p}' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) if [ -n "$out" ]; then echo "gpu_check.sh: one OUT_DIR only, got $out and $arg" >&2; exit 2; fi; out=$arg ;;
  esac
done
out=${out:-${OUT:-$(dirname "$0")/results/gpu_check}}  # a relative OUT_DIR is taken from the caller's folder
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
[ "$cpu" = 1 ] || cpu=0

now_ms() {  # wall clock in ms (bash 5's EPOCHREALTIME, else date)
  if [ -n "${EPOCHREALTIME:-}" ]; then local t=${EPOCHREALTIME//[!0-9]/}; echo $((t / 1000)); else echo $(($(date +%s%N) / 1000000)); fi
}
t_start=$(now_ms)
if [ "$cpu" = 1 ]; then
  budget=${FINEVIT_GPU_CHECK_BUDGET:-240} reserve=6 min_stage=3
  export CUDA_VISIBLE_DEVICES=""
else
  budget=${FINEVIT_GPU_CHECK_BUDGET:-330} reserve=12 min_stage=15
fi
grace=5                                            # SIGINT at the limit, SIGKILL this much later
deadline=$((t_start + (budget - reserve) * 1000))  # no stage runs past it; the reserve is for summaries and packing

export PYTHON=${PYTHON:-python} PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" cpu full
scratch=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
export work="$scratch/gpu_check"
mkdir -p "$work/results"
summary="$out/summary.txt"
rm -f "$summary" "$out/gpu_check.tar.gz"
benches=(train_step attention loss patch_embed rope integrations)  # the order they run in: what the issues ask for first
all_stages=(environment warmup pytest repro "${benches[@]/#/bench_}" sanitizer aot)
n_failed=0 n_cut=0 n_time=0 failed_names="" stage_pid="" current=""

say() { printf '%s\n' "$*" | tee -a "$summary"; }
in_list() {  # in_list NAME "a,b,c": NAME is listed, or a listed word + "_" prefixes it
  local word
  for word in ${2//,/ }; do [[ $1 == "$word" || $1 == "$word"_* ]] && return 0; done
  return 1
}
selected() { [ -z "${FINEVIT_GPU_CHECK_STAGES:-}" ] || in_list "$1" "$FINEVIT_GPU_CHECK_STAGES"; }
export -f in_list selected

declare -A recorded=()
record() {  # record NAME STATUS WALL_S KEY [DETAILS]: the stage's summary line, details indented below it
  local line="[$1] $2 | $3 s | $4"
  recorded[$1]=1
  say "$line"
  [ -n "${5:-}" ] && printf '%s\n' "$5" | sed 's/^/    /' | tee -a "$summary"
  return 0
}

finish() {  # EXIT trap: the result line, then everything but summary.txt into one tarball
  local code=0 wall
  trap - EXIT INT TERM
  if [ -n "$stage_pid" ]; then kill -KILL -- "-$stage_pid" 2> /dev/null; wait "$stage_pid" 2> /dev/null; fi
  wall=$((($(now_ms) - t_start) / 1000))
  if [ -n "$current" ]; then  # interrupted (SIGINT / SIGTERM) during a stage: that stage is cut, the rest skipped
    local text
    text=$("summarise_$current" 2>&1)
    record "$current" "cut at $((($(now_ms) - stage_t0) / 1000)) s" $((($(now_ms) - stage_t0) / 1000)) \
      "the check itself was interrupted during this stage · $(head -n 1 <<< "$text")" "$(tail -n +2 <<< "$text")"
    n_cut=$((n_cut + 1)) failed_names+=" $current"
  fi
  local name
  for name in "${all_stages[@]}"; do
    [ -n "${recorded[$name]:-}" ] || record "$name" "skipped: $(selected "$name" && echo "the check was interrupted" ||
      echo "not selected")" 0 "-"
  done
  if ((n_failed + n_cut)); then code=1; elif ((n_time)); then code=2; fi
  say "result: $([ $code = 0 ] && echo ok || echo "$([ $code = 1 ] && echo FAILED || echo INCOMPLETE)") ·" \
    "$n_failed failed, $n_cut cut, $n_time skipped for lack of time${failed_names:+ (${failed_names# })} ·" \
    "$wall s of the $budget s budget · exit $code"
  if tar -czf "$out/gpu_check.tar.gz" -C "$scratch" gpu_check 2> "$scratch/tar.err"; then
    say "files: summary.txt, gpu_check.tar.gz ($(tar -tzf "$out/gpu_check.tar.gz" | grep -vc '/$') files, of which" \
      "$(tar -tzf "$out/gpu_check.tar.gz" | grep -c '^gpu_check/results/.') bench results under gpu_check/results/)"
  else
    say "packing failed: $(head -c 300 "$scratch/tar.err")"
  fi
  rm -rf "$scratch"
  exit "$code"
}
trap finish EXIT
trap 'exit 130' INT TERM  # the EXIT trap stops the running stage and still reports

# stage NAME LIMIT [SKIP_REASON]: run stage_NAME (a function below) in `bash -c` under timeout, then summarise it
# with summarise_NAME. The limit is min(LIMIT or FINEVIT_GPU_CHECK_LIMIT_<NAME>, time left - grace).
stage() {
  local name=$1 own=$2 skip=${3:-} var left limit rc wall status text
  var="FINEVIT_GPU_CHECK_LIMIT_${name^^}"
  own=${!var:-$own}
  stage_t0=$(now_ms)
  if ! selected "$name"; then record "$name" "skipped: not selected" 0 "-"; return 0; fi
  if [ -n "$skip" ]; then record "$name" "skipped: $skip" 0 "-"; return 0; fi
  left=$(((deadline - stage_t0) / 1000 - grace))
  if ((left < min_stage)); then
    record "$name" "skipped: no time left" 0 "$((left > 0 ? left : 0)) s left before the deadline, under the" \
      "$min_stage s a stage needs"
    n_time=$((n_time + 1))
    return 0
  fi
  limit=$((own < left ? own : left))
  local hang=""
  in_list "$name" "${FINEVIT_GPU_CHECK_HANG:-}" && hang="echo 'FINEVIT_GPU_CHECK_HANG: sleeping'; sleep 100000; "
  current=$name
  STAGE_LIMIT=$limit timeout -s INT -k "$grace" "$limit" bash -c "${hang}stage_$name" \
    > "$work/$name.log" 2>&1 < /dev/null &
  stage_pid=$!
  wait "$stage_pid"
  rc=$?
  stage_pid="" current=""
  wall=$((($(now_ms) - stage_t0) / 1000))
  if ((rc == 124 || (rc == 137 && wall >= limit))); then
    status="cut at $limit s"
    n_cut=$((n_cut + 1)) failed_names+=" $name"
  elif ((rc == 0)); then
    status="ok"
  else
    status="failed (exit $rc)"
    n_failed=$((n_failed + 1)) failed_names+=" $name"
  fi
  text=$("summarise_$name" 2>&1 || true)
  [ -z "$text" ] && text="-"
  record "$name" "$status" "$wall" "$(head -n 1 <<< "$text")" "$(tail -n +2 <<< "$text")"
}
summarise() { timeout "$summary_limit" "$PYTHON" bench/_gpu_check.py "$@" 2>&1; }
export summary_limit=$((reserve / 2))
export -f summarise

# ---------------------------------------------------------------------------------------------------------------
# The stages (run in `bash -c`, so they see only exported functions and variables)
# ---------------------------------------------------------------------------------------------------------------
if [ "$cpu" = 1 ]; then
  bench_mode="--cpu-smoke"
  declare -A limits=([environment]=30 [warmup]=40 [pytest]=45 [repro]=45 [sanitizer]=10 [aot]=45
    [bench_attention]=60 [bench_loss]=60 [bench_patch_embed]=60 [bench_rope]=30 [bench_integrations]=60
    [bench_train_step]=60)
  warm_shards="patch_embed=2" warm_shard_list="patch_embed:0/2" kernel_shards=1
else
  bench_mode=$([ "$full" = 1 ] && echo "" || echo "--quick")
  declare -A limits=([environment]=60 [warmup]=75 [pytest]=150 [repro]=60 [sanitizer]=60 [aot]=90
    [bench_attention]=90 [bench_loss]=120 [bench_patch_embed]=60 [bench_rope]=45 [bench_integrations]=45
    [bench_train_step]=90)
  # warm-up shards per bench (loss has fixed configs; rope's kernel too, but its torch.compile baseline compiles per
  # case) and of warm_kernels.py: 23 processes for 16 cores (compiling is most of their work; the tests' kernels,
  # fp32 attention above all, are the largest share)
  warm_shards="attention=6 patch_embed=2 rope=2 integrations=3 train_step=2" warm_shard_list="" kernel_shards=8
fi
export bench_mode warm_shards warm_shard_list kernel_shards

stage_environment() {
  "$PYTHON" bench/_harness.py --environment "$work/environment.json" $([ "$cpu" = 1 ] && echo --cpu-smoke)
}
summarise_environment() { summarise environment "$work/environment.json"; }

stage_warmup() {
  local box=$((STAGE_LIMIT - 8)) entry bench n k
  ((box < 1)) && box=1
  mkdir -p "$work/warmup"
  echo "$box" > "$work/warmup/box.txt"
  echo "time box ${box} s"
  launch() {  # launch NAME COMMAND...: one warm-up process under the box, its status appended when it ends
    local name=$1
    shift
    echo "$name" >> "$work/warmup/started.txt"
    (
      # --foreground: the process stays in the stage's process group, so a cut stage stops it too
      timeout --foreground -k 3 "$box" "$@" > "$work/warmup/$name.log" 2>&1 < /dev/null
      echo "$name $?" >> "$work/warmup/status.txt"
    ) &
  }
  if selected pytest || selected repro || selected sanitizer; then
    for ((k = 0; k < kernel_shards; k++)); do
      launch "kernels-$k" env -u FINEVIT_ATTENTION_TUNING FINEVIT_BENCH_WARMUP="$k/$kernel_shards" \
        "$PYTHON" bench/warm_kernels.py $([ "$cpu" = 1 ] && echo "--device cpu")
    done
  fi
  for entry in $warm_shards; do
    bench=${entry%=*} n=${entry#*=}
    selected "bench_$bench" || continue
    for ((k = 0; k < n; k++)); do
      [ -n "$warm_shard_list" ] && ! in_list "$bench:$k/$n" "$warm_shard_list" && continue
      launch "$bench-$k" env FINEVIT_BENCH_WARMUP="$k/$n" "$PYTHON" "bench/$bench.py" $bench_mode \
        --out "$work/warmup/files"
    done
  done
  wait
  rm -rf "$work/warmup/files"
  echo "done"
  # a process that failed (not one stopped at the box: 124 / 137) fails the stage
  ! grep -qvE ' (0|124|137)$' "$work/warmup/status.txt" 2> /dev/null
}
summarise_warmup() { summarise warmup "$work/warmup"; }

stage_pytest() {
  local args=(-v -rfE -p no:cacheprovider --junitxml="$work/pytest.xml") selection
  if [ "${FINEVIT_GPU_CHECK_XDIST:-12}" != 0 ] && "$PYTHON" -c "import xdist" 2> /dev/null; then
    args+=(-n "${FINEVIT_GPU_CHECK_XDIST:-12}")
  fi
  if "$PYTHON" -c "import pytest_timeout" 2> /dev/null; then
    args+=(--timeout "${FINEVIT_GPU_CHECK_TEST_TIMEOUT:-90}")
  fi
  if [ -n "${FINEVIT_GPU_CHECK_PYTEST:-}" ]; then
    read -r -a selection <<< "$FINEVIT_GPU_CHECK_PYTEST"
  elif [ "$cpu" = 1 ]; then
    selection=(tests/kernels/test_dispatch.py)
  else
    # the compile check's triton matrix is CPU work that CI does (and needs the network to install tritons):
    # of that file only the GPU test, which compares its cubin readings with the driver's, runs here
    selection=(tests/kernels tests/integrations tests/model/test_triton_path.py
      -k "not test_compile_check or test_registers_and_local_memory_read_from_the_cubin_match_the_driver")
  fi
  echo "pytest ${args[*]} ${selection[*]}"
  env -u FINEVIT_ATTENTION_TUNING "$PYTHON" -m pytest "${args[@]}" "${selection[@]}"
}
summarise_pytest() { summarise pytest "$work/pytest.log"; }

repro_args() {
  if [ "$cpu" = 1 ]; then
    echo "--device cpu --dtypes fp16 --head-dims 72 --tokens 33,17,64 --heads 2"
  else
    echo "--device cuda --dtypes bf16 --head-dims 64,72,80,88,128"
  fi
}
stage_repro() {
  env -u FINEVIT_ATTENTION_TUNING TRITON_CACHE_AUTOTUNING=1 \
    "$PYTHON" bench/attention_repro.py $(repro_args) --json "$work/attention_repro.json"
}
summarise_repro() { summarise repro "$work/attention_repro.json"; }

sanitizer_bin=$(command -v compute-sanitizer || { [ -x /usr/local/cuda/bin/compute-sanitizer ] && echo /usr/local/cuda/bin/compute-sanitizer; })
export sanitizer_bin
stage_sanitizer() {
  env -u FINEVIT_ATTENTION_TUNING TRITON_CACHE_AUTOTUNING=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$sanitizer_bin" --tool memcheck --error-exitcode 3 --print-limit 10 \
    "$PYTHON" bench/attention_repro.py $(repro_args) --json "$work/sanitizer_repro.json"
}
summarise_sanitizer() { summarise sanitizer "$work/sanitizer.log" "$work/sanitizer_repro.json"; }

stage_aot() {
  if [ "$cpu" = 1 ]; then
    "$PYTHON" -m pytest -v -rfE -p no:cacheprovider tests/aot/test_cmake_build.py -k exporter_rejects
  else
    env -u FINEVIT_ATTENTION_TUNING "$PYTHON" -m pytest -v -rfE -p no:cacheprovider tests/aot
  fi
}
summarise_aot() { summarise pytest "$work/aot.log"; }

run_bench() { "$PYTHON" "bench/$1.py" $bench_mode --out "$work/results"; }
export -f run_bench repro_args stage_environment stage_warmup stage_pytest stage_repro stage_sanitizer stage_aot
for bench in "${benches[@]}"; do
  eval "stage_bench_$bench() { run_bench $bench; }; summarise_bench_$bench() { summarise bench $bench \"\$work/results\" \"\$work/bench_$bench.log\"; }"
  export -f "stage_bench_$bench"
done

# ---------------------------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------------------------
"$PYTHON" bench/_gpu_check.py header --mode "$([ "$cpu" = 1 ] && echo cpu || echo gpu)" > "$scratch/header.txt" 2>&1
tee -a "$summary" < "$scratch/header.txt"
say "gpu_check: $([ "$cpu" = 1 ] && echo "CPU mode" || echo "GPU") · budget $budget s · benches ${bench_mode:-full}" \
  "· stages ${FINEVIT_GPU_CHECK_STAGES:-all}${FINEVIT_GPU_CHECK_HANG:+ · HANG injected into $FINEVIT_GPU_CHECK_HANG}"

have_c_tools=$(command -v cmake > /dev/null && { command -v cc > /dev/null || command -v gcc > /dev/null; } && echo 1)
stage environment "${limits[environment]}"
stage warmup "${limits[warmup]}"
stage pytest "${limits[pytest]}"
stage repro "${limits[repro]}"
for bench in "${benches[@]}"; do
  stage "bench_$bench" "${limits[bench_$bench]}"
done
if [ "$cpu" = 1 ]; then
  stage sanitizer 0 "CPU mode (compute-sanitizer needs a GPU)"
elif [ -z "$sanitizer_bin" ]; then
  stage sanitizer 0 "compute-sanitizer not found"
else
  stage sanitizer "${limits[sanitizer]}"
fi
stage aot "${limits[aot]}" "$([ -z "$have_c_tools" ] && echo "no cmake or C compiler on this machine")"
exit 0  # the EXIT trap reports and sets the status
