#!/usr/bin/env bash
# The one prepared GPU run of docs/performance.md, in a fixed time: the CUDA tests of the GPU data
# path and the trainer, then tools/benchmark.py. Everything lands in $OUT (default gpu_out/):
#   env.txt (card, driver, Python, torch), gpu_tests.txt, table.md, bench.json, bench.log.
# Runs on the GPU machine's own stack (no Detectron2 needed); pytest is optional.
#   OUT=/tmp/x bash tools/device_run.sh          # about 7 min at most: give the command 480 s
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
PY=${PYTHON:-python}
mkdir -p "$OUT"
stamp() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/env.txt"; }

stamp "device run"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/env.txt" 2>&1
nproc >> "$OUT/env.txt"
$PY -c "import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torchvision.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" >> "$OUT/env.txt" 2>&1

if $PY -c "import pytest" 2>/dev/null; then
    stamp "gpu tests"
    timeout "${TESTS_TIMEOUT_S:-120}" $PY -m pytest -q -m gpu -p no:cacheprovider \
        tests/test_gpu_augment.py tests/test_pretrain.py > "$OUT/gpu_tests.txt" 2>&1
    stamp "gpu tests exit code $? (124 = timed out)"
else
    stamp "no pytest on this machine: gpu tests skipped"
fi

stamp "benchmark"
# --budget-s: compiled rows start only within it, other rows within 1.5x (tools/benchmark.py)
# (-m from the repository root: the GPU machine's stack need not have the suite installed)
timeout "${BENCH_TIMEOUT_S:-330}" $PY -m pretrain.benchmark --json "$OUT/bench.json" \
    --budget-s "${BENCH_BUDGET_S:-200}" 2> "$OUT/bench.log" | tee "$OUT/table.md"
stamp "benchmark exit code ${PIPESTATUS[0]} (124 = timed out; bench.json keeps the rows done)"
