"""pad_to_shape: a small Llama zero-padded into a bigger shape computes the same function."""
import copy

import pytest
import torch

from edgespec import Engine
from edgespec.base.errors import UnsupportedModelError
from edgespec.offload import offload_layers
from edgespec.offload.padded import PaddedLayers, head_slots, pad_to_shape, padded_config, padded_skeleton
from edgespec.base.stats import Plan
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


class Watched(PaddedLayers):
    """PaddedLayers that records, each time a layer is built, which other layers hold real tensors."""

    def __init__(self, *args):
        super().__init__(*args)
        self.seen = []

    def fill(self, i, layer, streamed):
        layers = self.big_layers
        self.seen.append([j for j, other in enumerate(layers) if any(not p.is_meta for p in other.parameters())])
        return super().fill(i, layer, streamed)


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("resident", [0, 1])
def test_padded_layers_one_at_a_time_straight_into_the_streamer(quantize, resident):
    """Offloaded through PaddedLayers, the padded model is built one layer at a time (every other
    streamed layer is packed, i.e. meta, while one is built), computes exactly what the whole padded
    model offloaded the same way computes, and (unquantized) decodes the small model's greedy tokens."""
    target = small()
    plain = copy.deepcopy(target)
    shape = dict(GROUPED, num_hidden_layers=5)
    whole = pad_to_shape(target, shape)
    offload_layers(whole, "cpu", resident_layers=resident, quantize=quantize, progress=False)
    big = padded_skeleton(target, shape)
    assert all(p.is_meta for layer in big.model.layers for p in layer.parameters())
    source = Watched(target, big.config)
    source.big_layers = big.model.layers
    offload_layers(big, "cpu", resident_layers=resident, quantize=quantize, progress=False, source=source)
    assert source.seen == [list(range(min(i, resident))) for i in range(5)], "more than one padded layer at once"
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(big(ids).logits, whole(ids).logits)
    if quantize is None:
        engine = Engine(big, noisy_copy(plain), scheduler=Fixed(Plan(32, 8, 4, 16)))
        for p in prompts(2):
            assert engine.generate(p, max_new_tokens=16).ids == greedy_reference(plain, p, 16)


def test_padded_skeleton_holds_no_layer_weights():
    target = small(tied=True)
    big = padded_skeleton(target, GROUPED)
    layer_bytes = sum(p.numel() * p.element_size() for p in big.model.layers.parameters())
    host = sum(p.numel() * p.element_size() for p in big.parameters() if not p.is_meta)
    assert host < layer_bytes / 4, (host, layer_bytes)  # embeddings and norm only
    assert big.lm_head.weight is big.model.embed_tokens.weight and not big.model.embed_tokens.weight.is_meta


@pytest.mark.slow
def test_load_pair_pads_the_embedded_target_layer_by_layer(real_pair, mt_bench_prompts):
    """`target_shape` through the loader: SmolLM2 padded into a shape of more layers and a wider MLP,
    built one layer at a time into the streamer, decodes SmolLM2's own greedy tokens."""
    from edgespec.base.config import LoadConfig
    from edgespec.loading.loader import load_pair

    target, _, tok = real_pair
    loaded = load_pair(LoadConfig(device="cpu", target_shape="llama-70b-tiny", resident_layers=1, progress=False))
    big = loaded.target
    assert loaded.offload.streamed_layers == 33 and big.config.intermediate_size == 1664
    engine = Engine(big, loaded.drafter, tok, offload=loaded.offload, budget=16)
    for question in mt_bench_prompts[:2]:
        ids = engine.encode([{"role": "user", "content": question}])
        assert engine.generate(ids, max_new_tokens=16, temperature=0).ids == greedy_reference(target, ids, 16)
