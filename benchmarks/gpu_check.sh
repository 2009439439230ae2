#!/usr/bin/env bash
# The GPU check of the performance work, as one prepared script (about 6 minutes on one H100/H200):
#   1. the GPU tests (`pytest -m gpu`): the fused path on CUDA against the CPU solver, the modules
#      of bistochastic.nn on CUDA against the CPU;
#   2. bench_sinkhorn.py on CUDA, float32: dense n = 4096, 8192 (time to tolerance, per iteration
#      against the HBM floor), batched tiny n = 2, 4, 8, 16 (against both floors, torch.compile),
#      forward+backward;
#   3. bench_peers.py on CUDA, float32: ours, the fused path, torch.compile, POT, GeomLoss, OTT-JAX.
# Every step has its own time limit and writes into $OUT (default benchmarks/results/gpu), so a
# step that fails or runs out of time leaves the others' results. Optional peers that the machine
# lacks can be given as wheels in .whl/ (installed with --no-deps into a private folder).
# Usage:  OUT=benchmarks/results/gpu bash benchmarks/gpu_check.sh
#         DEV=cpu SIZES=256 bash benchmarks/gpu_check.sh    # a dry run of the plumbing
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEV=${DEV:-cuda}
SIZES=${SIZES:-4096 8192}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/lib${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # jax must not take 75 % of the GPU from torch
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/bs-peers .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/bs-peers"
fi
LOG="$OUT/gpu_check.txt"
step() { local limit=$1; shift; echo "== $(date -u +%T) [limit ${limit}s] $*" | tee -a "$LOG"
         timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; echo "== exit ${PIPESTATUS[0]}" | tee -a "$LOG"; }
step 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
step 40 "$PY" -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton',
triton.__version__, 'numpy', numpy.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
step 140 "$PY" -m pytest -m gpu -p no:cacheprovider -q -rs tests/test_fused.py \
    tests/test_sinkhorn.py tests/test_nn.py tests/test_nn_hyper.py
step 160 "$PY" benchmarks/bench_sinkhorn.py --device "$DEV" --dtype float32 --sizes $SIZES \
    --eps 0.01 --reps 3 --tiny-sizes 2 4 8 16 --tiny-grad --tiny-compile \
    --json "$OUT/gpu_sinkhorn.json"
step 110 "$PY" benchmarks/bench_peers.py --device "$DEV" --dtype float32 --sizes $SIZES \
    --eps 0.01 --reps 3 --methods ours fused compile pot geomloss --json "$OUT/gpu_peers.json"
step 60 "$PY" benchmarks/bench_peers.py --device "$DEV" --dtype float32 --sizes $SIZES \
    --eps 0.01 --reps 3 --methods ours ott --json "$OUT/gpu_peers_ott.json"
