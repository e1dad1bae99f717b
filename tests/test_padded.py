"""pad_to_shape: a small Llama zero-padded into a bigger shape computes the same function."""
import copy

import pytest
import torch

from edgespec import Engine
from edgespec.errors import UnsupportedModelError
from edgespec.offload import offload_layers
from edgespec.offload.padded import head_slots, pad_to_shape, padded_config
from edgespec.stats import Plan
from tests.conftest import Fixed, greedy_reference, noisy_copy, prompts, tiny_model

GROUPED = dict(vocab_size=1, hidden_size=96, intermediate_size=160, num_hidden_layers=4, num_attention_heads=6,
               num_key_value_heads=3, tie_word_embeddings=False)  # head dim 16, 2 queries per KV head
PER_HEAD = dict(GROUPED, num_attention_heads=6, num_key_value_heads=6, num_hidden_layers=3)  # MHA


def small(tied: bool = False):
    # head dim 8, 4 query / 2 KV heads, an unusual rope theta: padding must keep all of it
    return tiny_model("llama", init=0.5, layers=2, tie_word_embeddings=tied,
                      rope_parameters={"rope_type": "default", "rope_theta": 500.0})


@pytest.mark.parametrize("shape", [GROUPED, PER_HEAD], ids=["grouped", "per-head"])
@pytest.mark.parametrize("tied", [False, True])
def test_padded_logits_equal(shape, tied):
    model = small(tied)
    big = pad_to_shape(model, shape)
    assert big.config.hidden_size == 96 and big.config.num_hidden_layers == shape["num_hidden_layers"]
    assert sum(p.numel() for p in big.parameters()) > 4 * sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = model(ids).logits, big(ids).logits
    assert ref.abs().max() > 1.0  # not a degenerate model
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_head_slots_share_kv_groups_when_they_can():
    model = small()
    grouped = head_slots(model.config, padded_config(model.config, GROUPED))
    assert grouped == [(0, 0), (1, 0), (2, 1), (3, 1)]  # two small query heads per big KV group
    per_head = head_slots(model.config, padded_config(model.config, dict(GROUPED, num_key_value_heads=6)))
    assert per_head == [(0, 0), (1, 1), (2, 2), (3, 3)]  # one query per big group: each group copies its KV head


def test_padded_offloaded_target_greedy_exact():
    """The engine with the padded target streamed gives the small target's own greedy tokens."""
    target = small()
    drafter = noisy_copy(target)
    plain = copy.deepcopy(target)
    big = pad_to_shape(target, GROUPED)
    offload_layers(big, "cpu", resident_layers=1, progress=False)
    engine = Engine(big, drafter, scheduler=Fixed(Plan(32, 8, 4, 16)))
    for ids in prompts(2):
        assert engine.generate(ids, max_new_tokens=20).ids == greedy_reference(plain, ids, 20)


def test_padding_refuses_what_it_cannot_keep():
    with pytest.raises(UnsupportedModelError, match="hidden_size"):
        pad_to_shape(small(), dict(GROUPED, hidden_size=16, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(UnsupportedModelError, match="Qwen2ForCausalLM"):
        pad_to_shape(tiny_model("qwen2"), GROUPED)
    with pytest.raises(UnsupportedModelError, match="Unknown shape"):
        pad_to_shape(small(), "llama-700b")
    with pytest.raises(UnsupportedModelError, match="map"):
        pad_to_shape(small(), dict(GROUPED, num_attention_heads=6, num_key_value_heads=1))
