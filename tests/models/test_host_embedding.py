"""Input embeddings in host memory (models/host_embedding.py): the same hidden states, losses,
LoRA gradients, state_dict, exports and generated ids as the table on the device; refusals that
say why; `.to()` keeps the table on the host. On the CPU host and device are one, so the device
side is faked with the meta device where the path matters (ids that cannot be read)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from velotune.export.weights import plan_tensors
from velotune.infer.engine import GenerationRun, generate_tensor
from velotune.infer.sampling import SamplingParams
from velotune.lora import LoraConfig, apply_lora
from velotune.models.config import ModelConfig
from velotune.models.host_embedding import EMBEDDING_NAME, EmbeddingOffloadError, HostEmbedding, stage_host_ids
from velotune.models.transformer import Transformer

VOCAB = 67
CONFIG = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, eos_token_id=0)


def lora_model(seed: int = 0, tied: bool = False, **lora) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**CONFIG, tie_word_embeddings=tied)).train()
    with torch.no_grad():  # well-separated logits, so greedy ids do not hinge on rounding
        for p in model.parameters():
            p.normal_(0, 0.5)
    # init=False: B starts non-zero, so every adapter changes its projection from the start
    return apply_lora(model, LoraConfig(r=4, alpha=8, init=False, **lora))


def batch(b: int = 3, t: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def run_step(model: Transformer, ids: torch.Tensor, labels: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, return_logits=False)
    (out.loss_sum / out.num_targets).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.hidden_states.detach(), out.loss_sum.detach(), grads


def test_hidden_states_loss_and_lora_grads_equal_with_the_table_on_the_host():
    ids, labels = batch()
    model = lora_model()
    on_device = run_step(model, ids, labels)
    assert model.put_embeddings_on_host() is True
    assert isinstance(model.model.embed_tokens, HostEmbedding)
    on_host = run_step(model, ids, labels)
    assert torch.equal(on_host[0], on_device[0])
    assert torch.equal(on_host[1], on_device[1])
    assert on_host[2].keys() == on_device[2].keys() and len(on_device[2]) == 2 * 7 * 2  # A, B x 7 x 2 layers
    for name, grad in on_device[2].items():
        assert torch.equal(on_host[2][name], grad), name
    assert model.model.embed_tokens.weight.grad is None


def test_state_dict_names_values_and_loading_unchanged():
    model = lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.put_embeddings_on_host()
    after = model.state_dict()
    assert set(after) == set(before)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert model.get_parameter(EMBEDDING_NAME) is model.model.embed_tokens.weight
    # loading writes into the host table, strictly (no missing or unexpected names)
    other = lora_model(seed=1).state_dict()
    model.load_state_dict(other, strict=True)
    assert torch.equal(model.model.embed_tokens.weight, other[EMBEDDING_NAME])
    # and coming back restores the original order of names, values included
    model.put_embeddings_on_device()
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert list(model.state_dict()) == list(before)
    assert torch.equal(model.state_dict()[EMBEDDING_NAME], other[EMBEDDING_NAME])


def test_first_parameter_is_a_device_weight_and_ddp_ignores_the_table():
    model = lora_model()
    assert next(model.parameters()) is model.model.embed_tokens.weight
    model.put_embeddings_on_host()
    first = next(model.named_parameters())[0]
    assert first.startswith("model.layers.0."), first
    assert list(model.named_parameters())[-2][0] == EMBEDDING_NAME   # after the final norm, before lm_head
    assert model._ddp_params_and_buffers_to_ignore == [EMBEDDING_NAME]
    model.put_embeddings_on_device()
    assert model._ddp_params_and_buffers_to_ignore == []


def test_exported_tensors_are_the_same():
    model = lora_model()
    before = {t.name: t.read() for t in plan_tensors(model)}
    model.put_embeddings_on_host()
    after = {t.name: t.read() for t in plan_tensors(model)}
    assert after.keys() == before.keys() and EMBEDDING_NAME in after
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def test_tied_embeddings_are_refused_with_the_reason_and_auto_leaves_them():
    model = lora_model(tied=True)
    with pytest.raises(EmbeddingOffloadError, match=r"model.put_embeddings_on_host: .*tie_word_embeddings"):
        model.put_embeddings_on_host(True)
    assert model.put_embeddings_on_host("auto") is False
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_trainable_embeddings_are_refused():
    torch.manual_seed(0)
    full = Transformer(ModelConfig(**CONFIG))          # full fine-tuning: every weight trains
    with pytest.raises(EmbeddingOffloadError, match=r"model.embed_tokens.weight is trainable"):
        full.put_embeddings_on_host(True)
    assert full.put_embeddings_on_host("auto") is False
    adapted = lora_model(target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(EmbeddingOffloadError, match=r"carries a LoRA adapter"):
        adapted.put_embeddings_on_host(True)
    with pytest.raises(ValueError, match=r"model.put_embeddings_on_host must be true, false or auto, got 'yes'"):
        adapted.put_embeddings_on_host("yes")


def test_auto_stays_off_on_the_cpu():
    model = lora_model()
    assert model.put_embeddings_on_host("auto") is False
    assert isinstance(model.model.embed_tokens, nn.Embedding)


def test_training_the_host_table_fails_clearly():
    model = lora_model()
    model.put_embeddings_on_host()
    model.model.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(EmbeddingOffloadError, match=r"model.embed_tokens.weight: requires grad"):
        model(batch()[0])


def test_to_moves_where_rows_go_not_the_table():
    model = lora_model()
    model.put_embeddings_on_host()
    embed = model.model.embed_tokens
    table = embed.weight.detach().clone()
    model.to("meta")                                    # stands in for a GPU: params move, the table not
    assert embed.device == torch.device("meta") and embed.weight.device.type == "cpu"
    assert model.model.norm.weight.device.type == "meta"
    assert torch.equal(embed.weight, table)
    assert embed(torch.tensor([[1, 2, 3]])).device.type == "meta"   # rows are delivered there
    model.to_empty(device="cpu")                        # back on the CPU; the table kept its values
    assert embed.device == torch.device("cpu") and torch.equal(embed.weight, table)
    model.to(torch.float64)                             # dtype conversions convert the host table
    assert embed.weight.dtype == torch.float64 and embed.weight.device.type == "cpu"
    assert not embed.weight.requires_grad
    assert embed(torch.tensor([[2, 5]])).dtype == torch.float64


def test_staged_host_ids_replace_reading_device_ids():
    weight = torch.randn(VOCAB, 6)
    embed = HostEmbedding(weight, "cpu")
    host = torch.tensor([[4, 1, 60], [7, 7, 0]])
    device_ids = torch.empty(2, 3, dtype=torch.long, device="meta")   # values unreadable: must not be read
    stage_host_ids(nn.ModuleDict({"model": nn.ModuleDict({"embed_tokens": embed})}), device_ids, host)
    assert torch.equal(embed(device_ids), weight[host])
    other = torch.empty(2, 3, dtype=torch.long, device="meta")        # same shape, another tensor
    with pytest.raises(NotImplementedError):
        embed(other)
    with pytest.raises(ValueError, match=r"stage_host_ids: host_ids must be a CPU tensor shaped like"):
        embed.stage_host_ids(device_ids, host[:1])
    with pytest.raises(IndexError):
        embed(torch.tensor([[VOCAB]]))


@pytest.mark.parametrize("decode", ["static", "dynamic"])
def test_generation_is_unchanged(decode):
    model = lora_model().eval()
    prompts = torch.tensor([[5, 9, 13, 2], [7, 2, 11, 4]])
    params = SamplingParams(max_new_tokens=10, temperature=0.0, decode=decode)
    expected = generate_tensor(model, prompts, params, stop_token_ids=[])
    model.put_embeddings_on_host()
    assert torch.equal(generate_tensor(model, prompts, params, stop_token_ids=[]), expected)
    run = GenerationRun(model, prompts, None, params, [])
    assert (run.decoder is not None and run.decoder.rows is not None) == (decode == "static")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


@pytest.mark.gpu
def test_gpu_8b_shaped_table_leaves_the_gpu_and_a_lora_step_is_unchanged():
    """Llama-3's vocabulary at a small width: the table's bytes leave the GPU, one bf16 LoRA step
    (staged host ids, and plain CUDA ids) gives the on-GPU loss and adapter gradients, and greedy
    generation (CUDA-graph and dynamic decode) the same ids."""
    cfg = ModelConfig(model_type="llama", vocab_size=128_256, hidden_size=512, intermediate_size=1024,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=64, eos_token_id=0)
    torch.manual_seed(0)
    model = Transformer(cfg).to("cuda", torch.bfloat16)
    apply_lora(model, LoraConfig(r=8, alpha=16, init=False), dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    host_ids = torch.randint(0, cfg.vocab_size, (2, 256), generator=g)
    ids, labels = host_ids.cuda(), host_ids.cuda()
    prompts = torch.randint(0, cfg.vocab_size, (2, 7), generator=g).cuda()

    def lora_step(stage: bool):
        model.train().zero_grad(set_to_none=True)
        given = ids if stage else ids.clone()            # a tensor never staged: its ids are copied over
        if stage:
            stage_host_ids(model, given, host_ids)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(given, labels=labels, return_logits=False)
        (out.loss_sum / out.num_targets).backward()
        return out.hidden_states.detach(), out.loss_sum.detach(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def greedy(decode: str) -> torch.Tensor:
        params = SamplingParams(max_new_tokens=16, temperature=0.0, decode=decode)
        return generate_tensor(model, prompts, params, stop_token_ids=[])

    reference = lora_step(stage=False)
    generated = {mode: greedy(mode) for mode in ("graph", "dynamic")}
    table_bytes = cfg.vocab_size * cfg.hidden_size * 2
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    assert model.put_embeddings_on_host("auto") is True
    torch.cuda.synchronize()
    freed = before - torch.cuda.memory_allocated()
    print(f"memory_allocated dropped by {freed:,} bytes; the table holds {table_bytes:,}")
    assert table_bytes <= freed < table_bytes + 2**21   # the allocator rounds blocks to 2 MiB segments
    assert model.model.embed_tokens.weight.device.type == "cpu"
    assert next(model.parameters()).is_cuda
    for stage in (True, False):
        hidden, loss, grads = lora_step(stage)
        assert torch.equal(hidden, reference[0]) and torch.equal(loss, reference[1])
        assert grads.keys() == reference[2].keys() and len(grads) == 2 * 7 * 2
        for name, grad in reference[2].items():
            assert rel_err(grads[name], grad) <= 1e-3, name
    for mode, expected in generated.items():
        assert torch.equal(greedy(mode), expected), mode
    model.cuda()                                       # moving the model again leaves the table on the host
    assert model.model.embed_tokens.weight.device.type == "cpu"


@pytest.mark.gpu
def test_gpu_ddp_accepts_a_model_whose_table_is_on_the_host(tmp_path):
    """DDP refuses parameters on two kinds of device unless told to ignore some: one NCCL rank
    wraps the offloaded model and trains the adapters."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = lora_model().cuda()
        model.put_embeddings_on_host("auto")
        wrapped = DistributedDataParallel(model, device_ids=[0])
        ids, labels = batch()
        out = wrapped(ids.cuda(), labels=labels.cuda(), return_logits=False)
        (out.loss_sum / out.num_targets).backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
        assert model.model.embed_tokens.weight.device.type == "cpu"
    finally:
        dist.destroy_process_group()
