#!/usr/bin/env bash
# Every GPU row of docs/performance.md, and the CUDA tests, on a CUDA machine in about 6 minutes.
#
#     bash benchmarks/gpu_check.sh              # on the GPU machine, from the repository's root
#     bash benchmarks/gpu_check.sh --dry-run    # the same steps on CPU, small (checks the script)
#
# Nothing is installed: it needs torch with CUDA, Triton (torch's CUDA wheels bring it), numpy,
# pytest; JSON results go to $OUT (or ./gpu-results) when set.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
if [ "${1:-}" = "--dry-run" ]; then
    export TREEOPT_TEST_DEVICE=cpu
    DEVICE="--device cpu --scale 16 --rounds 2 --steps 3"
    TRAIN=2
else
    DEVICE="--rounds 3 --steps 20"
    TRAIN=8
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1

echo "== 1. the CUDA tests (tests/test_cuda.py, tests/test_torch_runners.py)"
timeout 240 "$PYTHON" -m pytest tests/test_cuda.py tests/test_torch_runners.py -q -p no:cacheprovider -x 2>&1 | tail -25

echo "== 2. the first two steps of a new process, empty then filled kernel caches"
timeout 200 "$PYTHON" benchmarks/gpu.py $DEVICE --first-step --json "$OUT/first_steps.json" 2>&1 | tail -12

echo "== 3. steps (AdamW, Muon, muon_adamw) and training iterations against torch's optimizers"
timeout 300 "$PYTHON" benchmarks/gpu.py $DEVICE --train $TRAIN --json "$OUT/gpu.json" 2>&1 | tail -40
