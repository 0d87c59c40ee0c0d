#!/usr/bin/env bash
# GPU evidence in one run: environment, the kernel tests compiled on the GPU (bf16 included), and the
# attention and loss benchmarks. Usage: bash bench/gpu_check.sh [OUT_DIR] [--full]   (OUT_DIR defaults to $OUT or
# bench/results/gpu_check). Writes env.txt, pytest.log / pytest.xml, and the bench JSON/markdown/PNG.
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

# Kernel tests on the GPU: compiled Triton, fp16 / bf16 / fp32, gpu-marked tests included.
python -m pytest -q tests/kernels -p no:cacheprovider --junitxml="$out/pytest.xml" 2>&1 | tee "$out/pytest.log" | tail -n 15
tests_rc=${PIPESTATUS[0]}

python bench/attention.py $mode --out "$out" 2>&1 | tee "$out/attention.log"
attention_rc=${PIPESTATUS[0]}
python bench/loss.py $mode --out "$out" 2>&1 | tee "$out/loss.log"
loss_rc=${PIPESTATUS[0]}

echo "tests exit $tests_rc, attention bench exit $attention_rc, loss bench exit $loss_rc" | tee -a "$out/env.txt"
[ "$tests_rc" -eq 0 ] && [ "$attention_rc" -eq 0 ] && [ "$loss_rc" -eq 0 ]
