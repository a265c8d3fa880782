"""One peer system's end-to-end run for bench_e2e.py, in its own process: Unsloth + TRL's
SFTTrainer (`--system unsloth`) or transformers + PEFT + TRL (`--system hf`), on the text rows
bench_e2e.py wrote (DATA/train.jsonl, DATA/eval.jsonl). Prints one line `E2E {json}`.

Each system runs with its own recommended settings:
- unsloth: `FastLanguageModel.from_pretrained(max_seq_length, dtype=bf16, load_in_4bit for qlora)`,
  `get_peft_model(r=16, alpha=16, dropout 0, the seven projections, use_gradient_checkpointing=
  "unsloth")`, SFTConfig with optim "adamw_8bit" (its notebooks' choice), bf16.
- hf: `AutoModelForCausalLM` in bf16 with sdpa attention (bitsandbytes NF4 with double
  quantization and bf16 compute for qlora, after `prepare_model_for_kbit_training`), PEFT LoRA on
  the same projections, gradient checkpointing (non-reentrant), optim "adamw_torch_fused".
Both: per-device batch and max_length as given, one epoch, the same learning rate, schedule and
warm-up as velotune, `packing` as given (TRL's best-fit packing, padding-free). Unsloth is imported
before transformers, as it requires.

On the CPU (`--device=cpu`, the accuracy runs) TRL 1.15's SFTTrainer still routes its loss
through a Triton kernel (trl/kernels/chunked_logprob.py, patched onto the model unconditionally),
which has no CPU driver and, under TRITON_INTERPRET, ran one 512-token step in over ten minutes;
there `cpu_log_probs` stands in for it: the same per-token outputs (log-probability, entropy, whether
the target is the arg-max) from the full logits in float32, differentiated by autograd.

Real tokens are the tokenized training rows' lengths (TRL's own tokenization); the train-loop time
is trainer.train()'s wall time; the eval loss is computed here, token-weighted over the eval rows one
by one, as velotune computes its own.
"""
from __future__ import annotations

import argparse
import json
import time

p = argparse.ArgumentParser()
p.add_argument("--system", choices=("unsloth", "hf"), required=True)
p.add_argument("--model", required=True)
p.add_argument("--data", required=True)
p.add_argument("--method", choices=("lora", "qlora"), default="lora")
p.add_argument("--batch", type=int, default=4)
p.add_argument("--seq", type=int, default=2048)
p.add_argument("--packing", action="store_true")
p.add_argument("--learning_rate", type=float, default=2e-4)
p.add_argument("--warmup_steps", type=int, default=5)
p.add_argument("--lr_scheduler", default="linear")
p.add_argument("--lora_r", type=int, default=16)
p.add_argument("--lora_alpha", type=int, default=16)
p.add_argument("--max_steps", type=int, default=-1)
p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
               help="cpu (hf only): float32 and, for qlora, bitsandbytes' CPU backend (the accuracy runs)")
args = p.parse_args()

if args.system == "unsloth":
    import unsloth  # noqa: F401  (before transformers)
    from unsloth import FastLanguageModel

import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402



def cpu_log_probs(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
                  outputs=("log_probs",)):
    """TRL's ChunkedLogProbFunction.apply, computed from whole logits (CPU only, see the docstring)."""
    z = (hidden.float() @ weight.float().t() + (0 if bias is None else bias.float())) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_p = torch.log_softmax(z / temperature, dim=-1)
    picked = log_p.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1) if "entropy" in outputs else None
    top1 = (log_p.argmax(-1) == targets) if "is_top1" in outputs else None
    return picked, entropy, None, None, top1


if args.device == "cpu":
    import trl.trainer.utils as trl_utils

    class _CpuLogProbs:
        apply = staticmethod(cpu_log_probs)

    trl_utils._ChunkedLogProbFunction = _CpuLogProbs

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
qlora = args.method == "qlora"

if args.system == "unsloth":
    model, tokenizer = FastLanguageModel.from_pretrained(args.model, max_seq_length=args.seq, dtype=torch.bfloat16,
                                                         load_in_4bit=qlora)
    model = FastLanguageModel.get_peft_model(model, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                             target_modules=TARGETS, bias="none",
                                             use_gradient_checkpointing="unsloth", random_state=0)
    optim = "adamw_8bit"
else:
    import peft
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    quant = None
    if qlora:
        quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, dtype=dtype, device_map={"": 0 if args.device == "cuda" else "cpu"},
        attn_implementation="sdpa", quantization_config=quant)
    if qlora:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                     gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                                       target_modules=TARGETS, task_type="CAUSAL_LM"))
    optim = "adamw_torch_fused" if args.device == "cuda" else "adamw_torch"
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token

files = {"train": f"{args.data}/train.jsonl", "eval": f"{args.data}/eval.jsonl"}
dataset = load_dataset("json", data_files=files)
config = SFTConfig(
    output_dir="/tmp/e2e-peer", per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
    num_train_epochs=1, learning_rate=args.learning_rate, lr_scheduler_type=args.lr_scheduler,
    warmup_steps=args.warmup_steps, optim=optim, bf16=args.device == "cuda", use_cpu=args.device == "cpu",
    max_steps=args.max_steps, logging_steps=10, max_length=args.seq,
    packing=args.packing, dataset_text_field="text", report_to="none", save_strategy="no", eval_strategy="no",
    seed=0, gradient_checkpointing=args.system == "hf",
    gradient_checkpointing_kwargs={"use_reentrant": False} if args.system == "hf" else None)
trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset["train"], args=config)
if args.packing:
    tokens = sum(sum(row["seq_lengths"]) if "seq_lengths" in row else len(row["input_ids"])
                 for row in trainer.train_dataset)
else:
    tokens = sum(len(row["input_ids"]) for row in trainer.train_dataset)
cuda = args.device == "cuda"
if cuda:
    torch.cuda.synchronize()
started = time.perf_counter()
trainer.train()
if cuda:
    torch.cuda.synchronize()
train_s = time.perf_counter() - started
steps = trainer.state.global_step

model.eval()
loss_sum, targets = 0.0, 0
with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
    for row in dataset["eval"]:
        ids = tokenizer(row["text"], return_tensors="pt", truncation=True, max_length=args.seq).input_ids
        if tokenizer.eos_token_id is not None and ids[0, -1] != tokenizer.eos_token_id and ids.shape[1] < args.seq:
            ids = torch.cat([ids, torch.tensor([[tokenizer.eos_token_id]])], dim=1)
        ids = ids.to(args.device)
        out = model(input_ids=ids, labels=ids)
        loss_sum += float(out.loss) * (ids.shape[1] - 1)
        targets += ids.shape[1] - 1
print("E2E " + json.dumps({"train_s": train_s, "tokens": tokens, "steps": steps,
                           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
                           "eval_loss": loss_sum / targets}), flush=True)
