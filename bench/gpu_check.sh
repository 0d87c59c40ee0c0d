#!/usr/bin/env bash
# GPU evidence in one run: environment, the kernel and integration tests compiled on the GPU (bf16
# included), then every benchmark. Usage: bash bench/gpu_check.sh [OUT_DIR] [--full]
# (OUT_DIR defaults to $OUT or bench/results/gpu_check). Writes env.txt, pytest.log / pytest.xml, and each
# bench's JSON / markdown / PNG and log. Exits non-zero when the tests or any bench failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/results/gpu_check}}"
mode="--quick"
[ "${2:-}" = "--full" ] && mode=""
mkdir -p "$out"

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  git rev-parse HEAD 2>/dev/null || echo "no git"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda)"
} | tee "$out/env.txt"

python -m pytest -q tests/kernels tests/integrations -p no:cacheprovider --junitxml="$out/pytest.xml" 2>&1 \
  | tee "$out/pytest.log" | tail -n 15
rc=${PIPESTATUS[0]}
status="tests exit $rc"
failed=$([ "$rc" -eq 0 ] && echo 0 || echo 1)

for bench in attention loss patch_embed integrations train_step; do
  python "bench/$bench.py" $mode --out "$out" 2>&1 | tee "$out/$bench.log"
  rc=${PIPESTATUS[0]}
  status="$status, $bench exit $rc"
  [ "$rc" -eq 0 ] || failed=1
done

echo "$status" | tee -a "$out/env.txt"
exit "$failed"
