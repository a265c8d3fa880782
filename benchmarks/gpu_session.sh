#!/usr/bin/env bash
# Device calls, one part per call (each fits the 600 s limit of one call):
#   bash benchmarks/gpu_session.sh tests   # every gpu-marked test (GPU_TESTS="paths": those only; all of them
#                                          # take more than one call), then the LoRA block micro-benchmark
#   bash benchmarks/gpu_session.sh train   # LoRA training throughput 1B mb8, 8B mb1/mb4; decode throughput
#   bash benchmarks/gpu_session.sh rl      # GRPO memory (8B QLoRA); checkpointing auto (8B LoRA mb4)
#   bash benchmarks/gpu_session.sh qlora   # QLoRA vs transformers+PEFT+bitsandbytes (8B, mb1 and mb4)
#   bash benchmarks/gpu_session.sh memory  # what is allocated at the peak of an eager step (8B mb4, 8B mb1
#                                          # offload, 1B mb8 offload), then an offloaded e2e run profiled
#   bash benchmarks/gpu_session.sh sites   # the e2e 8B LoRA padded run (with and without offloaded
#                                          # checkpoints) recorded: its peak's allocation sites, step times
#   bash benchmarks/gpu_session.sh sites-more  # the default padded run's peak allocation sites: 8B QLoRA, 1B LoRA
#   bash benchmarks/gpu_session.sh long    # longest trainable context (8B QLoRA, batch 1), one call
#   LONG_ARGS="--seq 500000" bash benchmarks/gpu_session.sh long-start   # a run longer than one call:
#   bash benchmarks/gpu_session.sh long-wait                             # the next call, at once after
#     long-start runs bench_long_context.py LONG_ARGS in its own process session (it outlives the
#     call) and returns after ~9.5 minutes; long-wait waits up to ~9.5 minutes more for it and
#     returns its log and RESULTS.md (rows appended to a copy in /tmp/long: the working tree is
#     copied afresh at each call). The machine stays warm 30 s after a call: call again at once.
#   bash benchmarks/gpu_session.sh vision  # Qwen2.5-VL-7B LoRA mb1/mb4 x 2048: Unsloth, velotune, transformers+PEFT
#                                          # in their own processes (carry .whl); then, while the call has time,
#                                          # velotune vs transformers+PEFT in one process: Gemma-3-4B, LLaVA-1.5-7B, Qwen2.5-VL-7B
#   bash benchmarks/gpu_session.sh vision-gemma  # the same three-process comparison on Gemma-3-4B (carry .whl)
#   bash benchmarks/gpu_session.sh e2e     # velotune train vs Unsloth+TRL (and transformers+PEFT+TRL) on
#                                          # variable-length rows: E2E_ARGS are bench_e2e.py run's options
#   bash benchmarks/gpu_session.sh moe     # MoE, about 8-9 min (bounded at 575 s): the expert kernels (velotune's
#                                          # Triton, torch._grouped_mm, Unsloth's and transformers' experts), then
#                                          # Qwen3-30B-A3B and gpt-oss-20b cut to 8 layers, QLoRA r16 mb1 x 2048:
#                                          # Unsloth, velotune, transformers+PEFT in their own processes (carry .whl
#                                          # from fetch_peers.sh and .bench); MOE_ARGS: bench_moe_peers.py run's options
#   bash benchmarks/gpu_session.sh loop    # the plain loop against Unsloth (issue 18), bounded at 585 s: velotune
#                                          # as a user's loop calls it (its own cuda_graphs default) and Unsloth,
#                                          # each in its own process on one random folder, 8B LoRA
#                                          # mb1 and mb4, 8B QLoRA mb4, 1B LoRA mb8 (carry .whl from fetch_peers.sh and .bench)
#   bash benchmarks/gpu_session.sh grpo-long  # longest GRPO completion, Qwen3-8B arch QLoRA r16, 8 completions: Unsloth
#                                          # then velotune, one process per trial, bounded at 570 s (carry .whl and .bench);
#                                          # GRPO_ARGS: bench_grpo_longest.py's options (--systems, --start N: where a
#                                          # later call resumes the doubling)
#   bash benchmarks/gpu_session.sh moe-full  # velotune alone at full depth, built on the GPU (Qwen3-30B-A3B, gpt-oss-20b)
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
  tests)   # GPU_TESTS: the paths to run (default all; the whole set takes over one call: run it in halves)
    timeout $((585 - SECONDS)) python3 -m pytest -v -m gpu -o addopts="--import-mode=importlib" -p no:cacheprovider \
      -rfEx ${GPU_TESTS:-tests} > "$OUT/gpu_tests.log" 2>&1
    grep -E "FAILED|ERROR|XFAIL| passed| failed" "$OUT/gpu_tests.log" | tail -30
    echo "$(grep -c PASSED "$OUT/gpu_tests.log") passed so far (t=${SECONDS}s)"
    if [ $SECONDS -lt 480 ]; then python3 benchmarks/bench_lora_blocks.py --tokens 2048 8192 2>&1 | tail -8; fi ;;
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
  moe)
    python3 benchmarks/bench_moe.py --parts kernel 2>&1 | grep -v -i warn | tail -3
    python3 benchmarks/bench_moe_peers.py run --kernels --budget-s $((575 - SECONDS)) ${MOE_ARGS:-} 2>&1 \
      | tee "$OUT/moe.log" | grep -E "^  |GB\)|skipped|Error|error|printed no result" | tail -40 ;;
  loop)   # LOOP_ARGS: more bench_train.py options (--no-graphs: velotune eager, cuda_graphs off);
          # LOOP_ROWS: the rows, ";"-separated (default: 8B mb1 and mb4, 8B QLoRA mb4, 1B mb8)
    IFS=';' read -ra LOOP_SPECS <<< "${LOOP_ROWS:---model Llama-3.1-8B --batch 1 4;--model Llama-3.1-8B --batch 4 --qlora;--model Llama-3.2-1B --batch 8}"
    for rows in "${LOOP_SPECS[@]}"; do
      python3 benchmarks/bench_train.py --vs-unsloth $rows ${LOOP_ARGS:-} --seq 2048 --steps 3 --budget-s $((585 - SECONDS)) 2>&1 \
        | tee -a "$OUT/loop.log" | grep -E "r16 seq|^folder|printed no result|^(unsloth|velotune): " | tail -8
    done ;;
  grpo-long)
    python3 benchmarks/bench_grpo_longest.py --budget-s $((570 - SECONDS)) ${GRPO_ARGS:-} 2>&1 \
      | tee "$OUT/grpo-long.log" | grep -E "N=|longest|\| |printed no result|Error|error" | tail -40 ;;
  moe-full)
    python3 benchmarks/bench_moe.py --parts qwen gptoss 2>&1 | grep -v -i warn | tail -4 ;;
  vision)
    python3 benchmarks/bench_vision.py --model qwen2.5-vl-7b --batch 1 4 --seq 2048 --vs-unsloth \
      --budget-s $((560 - SECONDS)) 2>&1 | tee "$OUT/vision.log" | grep -v -i warn \
      | grep -E "^  |folder|no result|Error|error" | tail -30
    for model in gemma-3-4b llava-1.5-7b qwen2.5-vl-7b; do
      if [ $SECONDS -gt 420 ]; then echo "$model vs transformers: skipped, the call's time ran out"; continue; fi
      timeout $((585 - SECONDS)) python3 benchmarks/bench_vision.py --model $model --batch 1 4 --seq 2048 2>&1 \
        | grep -v -i warn | tail -3
    done ;;
  vision-gemma)
    python3 benchmarks/bench_vision.py --model gemma-3-4b --batch 1 4 --seq 2048 --vs-unsloth \
      --budget-s $((560 - SECONDS)) 2>&1 | tee "$OUT/vision-gemma.log" | grep -v -i warn \
      | grep -E "^  |folder|no result|Error|error" | tail -30 ;;
  memory)
    for a in "--model Llama-3.1-8B --batch 4" "--model Llama-3.1-8B --batch 1 --offload" \
             "--model Llama-3.2-1B --batch 8 --offload"; do
      python3 benchmarks/profile_step.py $a --seq 2048 --eager --memory --sites --rows 22 2>&1 \
        | grep -E "^(sites|memory|step|Llama)" | tee -a "$OUT/memory.log"
    done
    python3 benchmarks/bench_e2e.py run --rows 300 --layouts padded --systems velotune-offload 2>&1 \
      | grep -E "tok/s|vs Unsloth|Error|error" | tail -4
    python3 -m velotune train --no-progress --model=/tmp/velotune-e2e/Llama-3.1-8B \
      --dataset=/tmp/velotune-e2e/rows-300/train.jsonl --dataset_format=text --micro_batch_size=4 \
      --max_seq_length=2048 --gradient_checkpointing=true --offload_checkpoints=true --num_epochs=1 \
      --output_dir=/tmp/velotune-prof --profile_steps=[40,42] 2>&1 | tee "$OUT/profiled.log" | tail -25 ;;
  sites)
    python3 benchmarks/bench_e2e.py run --rows 300 --layouts padded --systems velotune 2>&1 \
      | grep -E "tok/s|vs Unsloth|Error|error" | tail -3
    for extra in "--offload_checkpoints=false" "--offload_checkpoints=true"; do
      echo "== velotune train $extra"
      python3 benchmarks/memory_sites.py --rows 14 -- train --no-progress --model=/tmp/velotune-e2e/Llama-3.1-8B \
        --dataset=/tmp/velotune-e2e/rows-300/train.jsonl --eval_dataset=/tmp/velotune-e2e/rows-300/eval.jsonl \
        --dataset_format=text --micro_batch_size=4 --max_seq_length=2048 --gradient_checkpointing=true \
        --num_epochs=1 --logging_steps=1 --output_dir=/tmp/velotune-sites $extra 2>&1 \
        | grep -E "^sites|rror|CUDA graphs|replay" | tee -a "$OUT/sites.log"
      python3 -c "import json; r=[json.loads(l) for l in open('/tmp/velotune-sites/metrics.jsonl') if 'train_seconds' in l]
t=[b['train_seconds']-a['train_seconds'] for a,b in zip(r,r[1:])]; print('step ms:', ' '.join(f'{1e3*x:.0f}' for x in t))
print('peak GiB by step:', ' '.join(f\"{x['peak_memory_gib']:.2f}\" for x in r[::4]))" | tee -a "$OUT/sites.log"
      rm -rf /tmp/velotune-sites
    done ;;
  sites-more)   # the default padded run's peak allocation sites, 8B QLoRA and 1B LoRA (issue 18's memory rows)
    for spec in "Llama-3.1-8B qlora" "Llama-3.2-1B lora"; do
      set -- $spec
      [ -d /tmp/velotune-e2e/$1 ] || python3 benchmarks/bench_e2e.py run --model $1 --methods $2 --rows 300 \
        --layouts padded --systems velotune 2>&1 | grep -E "tok/s|Error|error" | tail -2
      echo "== velotune train $1 $2 (defaults)" | tee -a "$OUT/sites-more.log"
      python3 benchmarks/memory_sites.py --rows 14 -- train --no-progress --model=/tmp/velotune-e2e/$1 \
        --dataset=/tmp/velotune-e2e/rows-300/train.jsonl --eval_dataset=/tmp/velotune-e2e/rows-300/eval.jsonl \
        --dataset_format=text --micro_batch_size=4 --max_seq_length=2048 --gradient_checkpointing=true \
        --num_epochs=1 --method=$2 --output_dir=/tmp/velotune-sites-$1 2>&1 \
        | grep -E "^sites|rror|offload|CUDA graphs" | tee -a "$OUT/sites-more.log"
      rm -rf /tmp/velotune-sites-$1
    done ;;
  long)
    python3 benchmarks/bench_long_context.py --seq ${SEQS:-350000} 2>&1 | tee "$OUT/long.log" | grep -v -i warn | tail -12 ;;
  long-start)
    mkdir -p /tmp/long && cp benchmarks/RESULTS.md /tmp/long/RESULTS.md
    setsid python3 benchmarks/bench_long_context.py ${LONG_ARGS:---seq 500000} --results /tmp/long/RESULTS.md \
      > /tmp/long/log 2>&1 < /dev/null &
    echo $! > /tmp/long/pid
    while kill -0 "$(cat /tmp/long/pid)" 2>/dev/null && [ $SECONDS -lt 560 ]; do sleep 5; done
    grep -v -i warn /tmp/long/log | tail -8
    kill -0 "$(cat /tmp/long/pid)" 2>/dev/null && echo "still running: call long-wait now"
    cp /tmp/long/RESULTS.md "$OUT/RESULTS.md"; cp /tmp/long/log "$OUT/long.log"; exit 0 ;;
  long-wait)
    [ -f /tmp/long/pid ] || { echo "no long-start run on this machine (it was given back?)"; exit 1; }
    while kill -0 "$(cat /tmp/long/pid)" 2>/dev/null && [ $SECONDS -lt 570 ]; do sleep 5; done
    grep -v -i warn /tmp/long/log | tail -12
    kill -0 "$(cat /tmp/long/pid)" 2>/dev/null && echo "still running: call long-wait again"
    cp /tmp/long/RESULTS.md "$OUT/RESULTS.md"; cp /tmp/long/log "$OUT/long.log"; exit 0 ;;
esac
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
