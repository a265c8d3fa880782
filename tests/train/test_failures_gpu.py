"""On the GPU: a real allocator failure becomes the out-of-memory advice, the loop guard stops a
poisoned row under CUDA graphs, and the guard adds no device synchronisation to a step
(torch's sync debug mode counts them)."""
from __future__ import annotations

import warnings

import pytest
import torch
from tests.train.test_guard import config, finite, poisoned_data, poisoned_model
from tests.train.train_helpers import load_tiny, make_examples

from velotune.train.guard import NonFiniteStep
from velotune.train.oom import TrainingOutOfMemory
from velotune.train.trainer import Trainer

pytestmark = pytest.mark.gpu


def test_a_real_out_of_memory_is_explained(tiny_model_dir, tmp_path):
    cap = 0.5 * 2**30                                  # the allocator may hand out 0.5 GiB
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    try:
        settings = config(tmp_path, micro_batch_size=8192, max_seq_length=128, cuda_graphs=False, save_steps=0)
        trainer = Trainer(load_tiny(tiny_model_dir("qwen2")).cuda(), settings,
                          make_examples(8192, min_len=120, max_len=127), show_progress=False)
        # set after the checks, which refuse a budget without gradient_checkpointing: auto: the
        # advice then sizes its suggestions to it, as the CPU tests of tests/train/test_oom.py do
        trainer.config.memory_budget_gib = 2.0
        with pytest.raises(TrainingOutOfMemory) as info:
            trainer.train()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    lines = str(info.value).splitlines()
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert lines[0].startswith(f"out of memory at step 1 ({torch.cuda.get_device_name(0)}, ")
    assert "allocated at the failure, memory_budget_gib 2): micro_batch_size 8192 x max_seq_length 128" in lines[0]
    assert "(velotune estimate)" in lines[1] and "--micro_batch_size=" in str(info.value)


def test_a_poisoned_row_stops_a_graphed_run(tiny_model_dir, tmp_path):
    model = poisoned_model(tiny_model_dir("qwen2")).cuda()
    trainer = Trainer(model, config(tmp_path, packing=True, cuda_graphs=True, max_seq_length=64), poisoned_data(),
                      show_progress=False)
    assert trainer.graphed is not None
    with pytest.raises(NonFiniteStep) as info:
        trainer.train()
    culprits = str(info.value).split("rows whose own loss is not finite: ")[1]
    assert "train.jsonl line 6" in culprits.split(". The last good state")[0]
    assert finite(model)


@pytest.mark.parametrize("graphs", [False, True])
def test_the_guard_adds_no_synchronisation(tiny_model_dir, tmp_path, graphs):
    counts = []
    for blind in (False, True):
        trainer = Trainer(load_tiny(tiny_model_dir("qwen2")).cuda(),
                          config(tmp_path / f"{graphs}{blind}", packing=graphs, cuda_graphs=graphs, max_seq_length=64,
                                 gradient_accumulation_steps=3),
                          make_examples(24), show_progress=False)
        if blind:
            trainer.guard.admit = lambda *args: True
        stream = trainer.batches.iterate()
        micro = [next(stream)[2] for _ in range(3)]
        trainer.optimizer_step(micro)                  # the first step captures the graphs
        micro = [next(stream)[2] for _ in range(3)]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer.optimizer_step(micro)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[0] == counts[1] > 0                  # the loop's own reads are seen, the guard adds none
