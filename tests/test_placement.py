"""The checkpoint placement plan (`velotune.placement`): what goes to pinned host memory, what
stays on the GPU, in how many pieces, and the bytes of each, on the shapes it is used at."""
from __future__ import annotations

import pytest

from velotune.models.known_configs import load_config
from velotune.placement import (
    GPU,
    HOST,
    NONE,
    attention_outweighs_pieces,
    kept_attention_per_token,
    parked_count,
    parked_per_token,
    plan_placement,
)

GIB = 2**30


def llama8b():
    return load_config("Llama-3.1-8B")[0]


def test_500k_tokens_on_a_128_gib_host_split_whole_inputs_between_host_and_gpu():
    c = llama8b()
    tokens, room = 500_000, 116 * GIB                 # MemAvailable ~120 GiB less the 4 GiB reserve
    layer = tokens * 2 * c.hidden_size                # one bf16 input: 3.81 GiB
    p = plan_placement(c, tokens, 2, 32, offload=True, host_room=room)
    assert p.offloaded == room // layer == 30 and p.kept_on_gpu == 2
    assert p.where == (HOST,) * 30 + (GPU,) * 2       # the last layers stay on the GPU
    assert p.pieces == (1,) * 32                       # one checkpointed tensor per layer
    assert p.host_bytes == 30 * layer <= room and p.gpu_bytes == 2 * layer
    assert p.in_flight_bytes == 2 * layer and p.fits_host
    assert "30 layer inputs in host memory (30 in 1 piece" in p.describe() and "2 kept on the GPU" in p.describe()


def test_pieces_are_taken_for_every_layer_or_none():
    c = llama8b()
    tokens = 8192                                       # short: pieces spare more than a kept output
    three = tokens * 2 * parked_per_token(c, 3)
    assert parked_per_token(c, 3) == 2 * 4096 + (32 + 2 * 8) * 128
    roomy = plan_placement(c, tokens, 2, 32, offload=True, host_room=32 * three)
    assert roomy.pieces == (3,) * 32 and roomy.host_bytes == 32 * three and roomy.in_flight_bytes == 2 * three
    assert not any(roomy.kept)
    short = plan_placement(c, tokens, 2, 32, offload=True, host_room=32 * three - 1)
    assert short.pieces == (2,) * 32 and short.host_bytes == 32 * tokens * 2 * 2 * 4096
    assert plan_placement(c, tokens, 2, 32, offload=True).pieces == (3,) * 32   # no room given: no limit
    # the GPU's room for the finer pieces in flight decides too
    tight = plan_placement(c, tokens, 2, 32, offload=True, host_room=32 * three, gpu_room=2 * three // 2)
    assert tight.pieces == (2,) * 32
    assert [parked_count(p) for p in (1, 2, 3)] == [1, 2, 5]


def test_long_sequences_keep_attention_outputs_instead_of_pieces_as_far_as_room_goes():
    c = llama8b()
    assert not attention_outweighs_pieces(c, 10_240) and attention_outweighs_pieces(c, 10_241)
    tokens = 262_144
    whole, kept = tokens * 2 * 4096, tokens * kept_attention_per_token(c, 2)
    assert kept_attention_per_token(c, 2) == 2 * 4096 + 4 * 32
    p = plan_placement(c, tokens, 2, 32, offload=True, host_room=32 * whole + 25 * kept + 1)
    assert p.pieces == (1,) * 32 and p.kept == (True,) * 25 + (False,) * 7
    assert p.host_bytes == 32 * whole + 25 * kept and p.in_flight_bytes == 2 * whole + kept
    assert "25 with their attention output" in p.describe()
    assert not any(plan_placement(c, tokens, 2, 32, offload=True, host_room=10**15, keep_attention=False).kept)
    assert not any(plan_placement(c, tokens, 2, 32, offload=True, host_room=10**15, gpu_room=kept - 1).kept)
    # a batch of short rows is judged by its rows' length, not the batch's tokens
    assert plan_placement(c, 8 * 4096, 2, 32, offload=True, seq=4096).pieces == (3,) * 32


def test_a_layer_count_kept_on_gpu_is_obeyed_and_room_is_not_consulted():
    c = llama8b()
    p = plan_placement(c, 1000, 2, 32, offload=True, host_room=0, kept_on_gpu=5)
    assert p.where == (HOST,) * 27 + (GPU,) * 5 and not p.fits_host
    assert plan_placement(c, 1000, 2, 32, offload=True, kept_on_gpu=40).offloaded == 0


def test_without_offload_or_checkpoints_nothing_goes_to_the_host():
    c = llama8b()
    p = plan_placement(c, 4096, 2, 20, offload=False)
    assert p.where == (GPU,) * 20 + (NONE,) * 12 and p.host_bytes == 0
    assert p.gpu_bytes == 20 * 4096 * 2 * 4096 and p.in_flight_bytes == 0
    assert plan_placement(c, 4096, 2, 0, offload=True).where == (NONE,) * 32


def test_sandwich_norm_layers_stay_whole_and_bad_settings_are_refused():
    gemma = load_config("gemma-2-9b")[0]
    assert gemma.sandwich_norms
    p = plan_placement(gemma, 1024, 2, gemma.num_hidden_layers, offload=True)
    assert set(p.pieces) == {1} and p.offloaded == gemma.num_hidden_layers
    assert not any(p.kept)                    # soft-capped, sliding-window attention: recomputed
    c = llama8b()
    with pytest.raises(ValueError, match="checkpoints_kept_on_gpu must be 'auto' or a whole number"):
        plan_placement(c, 10, 2, 32, offload=True, kept_on_gpu=-1)
    with pytest.raises(ValueError, match=r"checkpointed layers must be in \[0, 32\]"):
        plan_placement(c, 10, 2, 33, offload=True)
    with pytest.raises(ValueError, match="1, 2 or 3 pieces"):
        parked_per_token(c, 4)
