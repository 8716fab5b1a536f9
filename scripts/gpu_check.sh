#!/usr/bin/env bash
# The GPU check, about 3 minutes on one H100: the CUDA tests against the CPU float64 reference, then
# the engine benchmark on the GPU with its ratios to the measured float32, TF32 and bf16 GEMM rates.
# Needs a CUDA build of torch and the project's dependencies importable; writes logs to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
export PYTHONPATH="server:client${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -o addopts="--import-mode=importlib" \
    tests/server/engine/test_cuda.py tests/server/engine/test_nearest.py tests/server/test_metrics.py \
    tests/server/service -k "cuda or CUDA or gpu" 2>&1 | tee "$OUT/tests.txt"
timeout 120 python3 benchmarks/bench_engine.py --device cuda --case cifar 2>&1 | tee "$OUT/bench_cifar.txt"
timeout 150 python3 benchmarks/bench_engine.py --device cuda --case imagenet --dtype bfloat16 --screen bfloat16 \
    --repeat 2 2>&1 | tee "$OUT/bench_imagenet.txt"
