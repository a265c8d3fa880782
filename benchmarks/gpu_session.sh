#!/usr/bin/env bash
# One device call: the GPU tests, then the training benchmarks; prints a short table last.
# Run on the device machine from the repository root: bash benchmarks/gpu_session.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD" NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
python3 -m pytest -q -m gpu -o addopts="--import-mode=importlib" -p no:cacheprovider \
  tests/kernels tests/quant 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
python3 benchmarks/bench_train.py --model Llama-3.2-1B --batch 8 --seq 2048 --steps 4 2>&1 | tee "$OUT/bench_1b.log" | tail -4
python3 benchmarks/bench_train.py --model Llama-3.1-8B --batch 1 4 --seq 2048 --steps 3 2>&1 | tee "$OUT/bench_8b.log" | tail -6
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
