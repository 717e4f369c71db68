#!/usr/bin/env bash
# The one prepared GPU run of docs/performance.md, in a fixed time: the CUDA tests of the GPU data
# path and the trainer, tools/benchmark.py, then a learning run (MoCo v2 and SANE, ResNet-18, on the
# objects corpus generated here, kNN and linear probe against the same network at random init).
# Everything lands in $OUT (default gpu_out/): env.txt (card, driver, Python, torch), gpu_tests.txt,
# table.md, bench.json, bench.log, learn/ (runs, probes) and learn.md (the learning table).
# Runs on the GPU machine's own stack (no Detectron2, no pycocotools needed); pytest is optional.
#   OUT=/tmp/x bash tools/device_run.sh          # about 8 min at most: give the command 540 s
# CPU mode (checks the script end to end, minutes on 2 cores):
#   OUT=/tmp/x TESTS_TIMEOUT_S=1 BENCH_TIMEOUT_S=1 LEARN_IMAGES=64 LEARN_EPOCHS=1 LEARN_DEVICE=cpu \
#       PROBE_OPTS="--epochs 1 --num-workers 0" bash tools/device_run.sh
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
    timeout "${TESTS_TIMEOUT_S:-90}" $PY -m pytest -q -m gpu -p no:cacheprovider \
        tests/test_gpu_augment.py tests/test_pretrain.py > "$OUT/gpu_tests.txt" 2>&1
    stamp "gpu tests exit code $? (124 = timed out)"
else
    stamp "no pytest on this machine: gpu tests skipped"
fi

stamp "benchmark"
# --budget-s: compiled rows start only within it, other rows within 1.5x (tools/benchmark.py)
# (-m from the repository root: the GPU machine's stack need not have the suite installed)
timeout "${BENCH_TIMEOUT_S:-240}" $PY -m pretrain.benchmark --json "$OUT/bench.json" \
    --budget-s "${BENCH_BUDGET_S:-150}" 2> "$OUT/bench.log" | tee "$OUT/table.md"
stamp "benchmark exit code ${PIPESTATUS[0]} (124 = timed out; bench.json keeps the rows done)"

stamp "learning run"
# the bench recipe (configs/pretrain/bench_objects_r18.yaml, docs/bench.md) for more epochs than the
# CPUs allow; a run cut by its timeout keeps its last epoch's checkpoint, which the probe reads
LEARN=$OUT/learn
N=${LEARN_IMAGES:-2000}
$PY -m suite.corpus --out "$LEARN/objects" --preset objects --size 64 --num-train "$N" \
    --num-test $((N / 5)) --layouts imagefolder >> "$OUT/env.txt" 2>&1
DATA=$LEARN/objects/imagefolder
for m in mocov2 sane; do
    timeout "${LEARN_TIMEOUT_S:-120}" $PY -m pretrain --config configs/pretrain/bench_objects_r18.yaml \
        output_dir="$LEARN/$m" data.root="$DATA" method=$m epochs="${LEARN_EPOCHS:-60}" \
        device="${LEARN_DEVICE:-cuda}" cpu_threads=0 data.num_workers="${LEARN_WORKERS:-8}" \
        knn.every_epochs=10 checkpoint.save_every_epochs=0 > "$LEARN/$m.log" 2>&1
    stamp "pretrain $m exit code $? (124 = cut by its timeout: the probe reads its last checkpoint)"
done
probe() {  # name, source flags...
    local name=$1; shift
    timeout "${PROBE_TIMEOUT_S:-45}" $PY -m pretrain.linear "$@" --data "$DATA" --preset cifar \
        --image-size 32 ${PROBE_OPTS:---num-workers 8} --output-dir "$LEARN/probe_$name" \
        > "$LEARN/probe_$name.log" 2>&1
    stamp "probe $name exit code $?"
}
probe random_init --random-init --arch resnet18 --stem imagenet --seed 0
for m in mocov2 sane; do probe $m --checkpoint "$LEARN/$m/checkpoint.pth"; done
$PY -m suite.learning_table "$LEARN" | tee "$OUT/learn.md"
stamp "done"
