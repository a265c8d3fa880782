#!/usr/bin/env bash
# Device calls, one part per call (each fits the 600 s limit of one call):
#   bash benchmarks/gpu_session.sh tests   # every gpu-marked test, then the LoRA block micro-benchmark
#   bash benchmarks/gpu_session.sh train   # LoRA training throughput 1B mb8, 8B mb1/mb4; decode throughput
#   bash benchmarks/gpu_session.sh rl      # GRPO memory (8B QLoRA); checkpointing auto (8B LoRA mb4)
#   bash benchmarks/gpu_session.sh qlora   # QLoRA vs transformers+PEFT+bitsandbytes (8B, mb1 and mb4)
#   bash benchmarks/gpu_session.sh long    # longest trainable context (8B QLoRA, batch 1)
#   bash benchmarks/gpu_session.sh vision  # vision-language LoRA vs transformers+PEFT (Gemma-3-4B, LLaVA-1.5-7B)
#   bash benchmarks/gpu_session.sh e2e     # velotune train vs Unsloth+TRL (and transformers+PEFT+TRL) on
#                                          # variable-length rows: E2E_ARGS are bench_e2e.py run's options
# Run from the repository root on the device machine. Wheels carried in .whl/ (bitsandbytes,
# gguf) are installed into /tmp/site first. RESULTS.md is copied to $OUT at the end.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD/src:$PWD:$PWD/benchmarks"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ -n "${TESTS:-}" ]; then   # TESTS="a.py b.py": those gpu-marked tests first, whatever the part
  python3 -m pytest -q -m gpu -o addopts="--import-mode=importlib" -p no:cacheprovider -rfE $TESTS 2>&1 | tail -12
fi
case "${1:-tests}" in
  tests)
    python3 -m pytest -q -m gpu -o addopts="--import-mode=importlib" -p no:cacheprovider -rfEx tests 2>&1 \
      | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|FAILED|ERROR|XFAIL|xfail|Error" | tail -30
    python3 benchmarks/bench_lora_blocks.py --tokens 2048 8192 2>&1 | tail -8 ;;
  train)
    python3 benchmarks/bench_train.py --model Llama-3.2-1B --batch 8 --seq 2048 --steps 4 2>&1 | grep -v -i warn | tail -3
    python3 benchmarks/bench_train.py --model Llama-3.1-8B --batch 1 4 --seq 2048 --steps 3 2>&1 | grep -v -i warn | tail -5
    python3 benchmarks/bench_generate.py --model Llama-3.2-1B --batch 64 --prompt 128 --new 128 2>&1 | grep -v -i warn | tail -8 ;;
  rl)
    python3 benchmarks/bench_grpo_memory.py --model Llama-3.1-8B --group 8 --prompt 128 --new 512 2>&1 | grep -v -i warn | tail -4
    python3 benchmarks/bench_train.py --model Llama-3.1-8B --batch 4 --seq 2048 --steps 3 --checkpointing auto 2>&1 | grep -v -i warn | tail -4 ;;
  qlora)
    python3 benchmarks/bench_train.py --model Llama-3.1-8B --batch 1 4 --seq 2048 --steps 3 --qlora 2>&1 | grep -v -i warn | tail -6 ;;
  e2e)
    python3 benchmarks/bench_e2e.py run ${E2E_ARGS:-} 2>&1 | tee "$OUT/e2e.log" | grep -v -i warn | grep -E "tok/s|vs Unsloth|failed|Error|error|graph|data:" | tail -40 ;;
  vision)
    python3 benchmarks/bench_vision.py --model gemma-3-4b --batch 1 4 --seq 2048 2>&1 | grep -v -i warn | tail -3
    python3 benchmarks/bench_vision.py --model llava-1.5-7b --batch 1 4 --seq 2048 2>&1 | grep -v -i warn | tail -3 ;;
  long)
    python3 benchmarks/bench_long_context.py --seq ${SEQS:-350000} 2>&1 | tee "$OUT/long.log" | grep -v -i warn | tail -12 ;;
esac
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
