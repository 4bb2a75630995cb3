#!/usr/bin/env bash
# `make gpu-check`: the GPU acceptance run on one CUDA GPU (estimated 6-8 minutes on one H100).
#   1. the CUDA tests (pytest -m cuda: no host sync in the step, GPU == CPU in float64, bf16 training);
#   2. a bf16-mixed `trainer=gpu` run of every optimizer (the refresh forms the defaults use under
#      bf16), and Sophia-H / FlatSophia in 32-true (the finite-difference refresh);
#   3. the benchmark's CUDA section (docs/performance.md, "GPU").
# Everything it prints is also kept under logs/gpu_check/<time>/, with the device's name; copy the
# figures into the docs with the device they came from.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}

"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu-check needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
PYEOF
out="logs/gpu_check/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); \
print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, torch {torch.__version__}')" \
    | tee "$out/device.txt"
SECONDS=0

echo "== 1. CUDA tests"
"$PY" -m pytest -q -m cuda tests 2>&1 | tee "$out/tests.txt"

echo "== 2. trainer=gpu runs (MNIST-1D, 3 epochs each)"
run() {  # name, overrides...
    local name=$1; shift
    "$PY" src/train.py trainer=gpu trainer.max_epochs=3 logger=csv "paths.output_dir=$out/train/$name" "$@" \
        2>&1 | tee "$out/train_$name.txt" | grep -E "^Final metrics|Error" || true
}
for opt in adamw sophia_g sophia_h flat_sophia soap; do
    echo "-- $opt, bf16-mixed"; run "${opt}_bf16" "optimizer=$opt"
done
for opt in sophia_h flat_sophia; do
    echo "-- $opt, 32-true"; run "${opt}_fp32" "optimizer=$opt" trainer.precision=32-true
done

echo "== 3. benchmark, CUDA"
"$PY" -m flatsophia.bench --device cuda --compile --rounds 6 --min-run-time 0.2 --json "$out/bench_cuda.json" \
    2>&1 | tee "$out/bench.txt"
echo "gpu-check: done in ${SECONDS} s; logs in $out"
