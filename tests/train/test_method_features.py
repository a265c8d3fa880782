"""The README's method x feature table, one cell per assertion: every method through
`velotune train`'s own function with the 8-bit optimizer, checkpoints, eval, the report and exports
to a merged HF folder and GGUF; and gradient checkpointing on and auto in the trainer (same
gradients as without, layers really checkpointed). Resume after a kill, two ranks, CUDA graphs and
accumulation have their own files (test_kill_resume.py, tests/distributed/test_methods_gloo.py,
test_graphed_step.py, test_method_accumulation.py)."""
from __future__ import annotations

import json

import pytest
import torch
from gguf import GGUFReader

import velotune
from tests.cli.cli_helpers import make_chat_model
from tests.distributed.gloo_helpers import quiet, write_chat_data
from tests.train.test_method_accumulation import grpo_objective, kto_examples, pairs, tiny_model
from tests.train.train_helpers import make_examples
from velotune.train import trainer as trainer_module
from velotune.train.config import METHODS, TrainConfig
from velotune.train.metrics import read_metrics
from velotune.train.run import train_from_config
from velotune.train.trainer import Trainer

torchao_optim = pytest.importorskip("torchao.optim")
PAIRS = [{"prompt": f"Question {i}: say {w}", "chosen": w, "rejected": f"not {w}, no"}
         for i, w in enumerate("yes hello green four blue seven ok fine".split())]
EVAL_KEY = {"grpo": "eval_reward"}


def first_word_reward(prompts, completions, **_):
    return [float(c.split()[0] in p) if c.split() else 0.0 for p, c in zip(prompts, completions)]


def chat_model(tmp_path):
    """The tiny chat model of the CLI tests, its byte-level pre-tokenizer on GPT-2's split so that
    llama.cpp has a name for it (the GGUF export)."""
    folder = make_chat_model(tmp_path / "model")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["use_regex"] = True
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder


def dataset(tmp_path, method: str):
    if method in ("lora", "qlora", "full"):
        return write_chat_data(tmp_path / "chat.jsonl", 16), {"dataset_format": "messages"}
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": r["prompt"]} for r in PAIRS] if method == "grpo" else PAIRS
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if method == "grpo":
        return path, {"rewards": ["tests.train.test_method_features:first_word_reward"], "num_generations": 2,
                      "max_completion_length": 4}
    return path, {}


@pytest.mark.parametrize("method", METHODS)
def test_every_feature_of_a_run(tmp_path, method, monkeypatch):
    built = []
    real_build = trainer_module.build_optimizer
    monkeypatch.setattr(trainer_module, "build_optimizer", lambda *a: built.append(real_build(*a)) or built[-1])
    data, extra = dataset(tmp_path, method)
    config = TrainConfig(model=str(chat_model(tmp_path)), dataset=str(data), method=method,
                         output_dir=str(tmp_path / "run"), max_steps=2, save_steps=2, micro_batch_size=2,
                         learning_rate=1e-2, max_seq_length=64, eval_split=0.25, optimizer="adamw8bit",
                         gradient_checkpointing=True, export=["hf", "gguf"], device="cpu", **extra,
                         **({} if method == "full" else {"lora_r": 4, "lora_alpha": 8}))
    result = train_from_config(config, console=quiet(), show_progress=False)
    out = tmp_path / "run"
    # 8-bit optimizer (torchao's; test_optim_8bit.py checks its states and numerics)
    assert type(built[0]) is torchao_optim.AdamW8bit
    assert all(isinstance(r["lr"], float) for r in read_metrics(out) if "lr" in r)
    # checkpoint of the last step, resumable
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-2"
    # eval before and after, in metrics and the report
    key = EVAL_KEY.get(method, "eval_loss")
    evals = {r["step"]: r for r in read_metrics(out) if key in r}
    assert sorted(evals) == [0, 2]
    report = (out / "report.md").read_text()
    assert f"# velotune run: {method}" in report and ("eval reward" if method == "grpo" else "eval loss") in report
    assert (out / "training.png").is_file()
    # exports: a merged HF folder with the trained model's logits, and a GGUF file
    hf, gguf = result.exports
    assert (hf / "config.json").is_file() and gguf.suffix == ".gguf"
    # (a qlora adapter was trained, and merged, on the dequantized 4-bit base)
    trained, _ = velotune.load_model(result.output, dtype=torch.float32, device="cpu", load_in_4bit=config.four_bit)
    merged, _ = velotune.load_model(hf, dtype=torch.float32, device="cpu")
    ids = torch.tensor([[5, 70, 71, 80, 90]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, trained.eval()(ids).logits, atol=1e-4)
    # the GGUF holds the merged weights (v_proj: trained and not permuted by llama.cpp's layout)
    tensors = {t.name: t for t in GGUFReader(gguf).tensors}
    v = torch.from_numpy(tensors["blk.0.attn_v.weight"].data.astype("float32"))
    assert torch.allclose(v, merged.model.layers[0].self_attn.v_proj.weight, atol=1e-3)


def method_trainer(method: str, tmp_path, checkpointing):
    model = tiny_model() if method != "full" else tiny_model().requires_grad_(True)
    units = {"dpo": pairs(4), "orpo": pairs(4), "simpo": pairs(4), "kto": kto_examples(4),
             "grpo": None}.get(method, make_examples(4))
    objective = None
    if method == "grpo":
        from velotune.rl.grpo import PromptExample

        units, objective = [PromptExample([5, 9, 13], {"prompt": "a"}, 0)], grpo_objective(4, "grpo", "token")
    config = TrainConfig(method=method if method != "qlora" else "lora", output_dir=str(tmp_path / str(checkpointing)),
                         micro_batch_size=4, gradient_checkpointing=checkpointing, device="cpu",
                         **({"rewards": ["m:f"], "num_generations": 4, "max_completion_length": 6,
                             "max_seq_length": 64} if method == "grpo" else {}))
    return Trainer(model, config, units, objective=objective, show_progress=False)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "qlora"])   # qlora: test_checkpointing.py
@pytest.mark.parametrize("mode", [True, "auto"])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, method, mode):
    grads = []
    for checkpointing in (False, mode):
        trainer = method_trainer(method, tmp_path, checkpointing)
        stream = trainer.batches.iterate()
        micro = trainer.objective.micro_batches(trainer, [next(stream)[2] for _ in range(trainer.draws_per_step)], 1)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.accumulate(micro)
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        model = trainer.model
    assert model.gradient_checkpointing == mode
    layers = model.checkpointed_layers(4, 16) if mode is True else model.checkpoint_choice.layers
    assert (layers == 2) if mode is True else model.checkpoint_choice is not None   # auto: chosen per forward
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, rtol=1e-5, atol=1e-7), name
