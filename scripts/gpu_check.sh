#!/usr/bin/env bash
# The GPU check, one prepared script (about 4 minutes on one H100 / H200):
#   1. the CUDA tests against the CPU float64 reference (oracle incl. leave-one-out, guided and
#      the variance; nearest; the service on a GPU data set);
#   2. the engine benchmark at CIFAR size with float32 and with bfloat16 screening, each beside
#      the bf16, fp16, TF32 and float32 GEMM pairs of the same run (targets: refinement within 2x
#      the bf16 pair with bf16 screening, a uniform t mix within 2x the float32 pair);
#   3. ImageNet size with bfloat16 storage and screening.
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
timeout 150 python3 benchmarks/bench_engine.py --device cuda --case cifar 2>&1 | tee "$OUT/bench_cifar.txt"
timeout 150 python3 benchmarks/bench_engine.py --device cuda --case cifar --screen bfloat16 2>&1 \
    | tee "$OUT/bench_cifar_bf16_screen.txt"
timeout 180 python3 benchmarks/bench_engine.py --device cuda --case imagenet --dtype bfloat16 --screen bfloat16 \
    --repeat 2 2>&1 | tee "$OUT/bench_imagenet.txt"
