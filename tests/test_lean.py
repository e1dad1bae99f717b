"""The drafter's lean forward (edgespec/lean.py) and its static, graph-replayable cache
(edgespec/static_cache.py) against transformers' own forward."""
from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from edgespec import Engine, lean, static_cache
from edgespec.cache import crop, keep_positions, new_cache
from edgespec.forward import hidden_states
from edgespec.static_cache import GraphFallbackWarning, StaticCache

from tests.conftest import greedy_reference, tiny_model, tiny_pair


def qwen3(seed: int = 0):
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).eval()


def small_static(model, capacity: int = 8, graphs: bool = False) -> StaticCache:
    big = lean.lookup(model).new_cache()
    return StaticCache(big.n_layers, big.shape[1], big.shape[3], big.dtype, big.device, capacity, graphs)


def feeds(model, cache) -> list[torch.Tensor]:
    """A stem, a tree (two branches) over it, a pruning to one branch, then a longer stem."""
    out = []
    with torch.no_grad():
        out.append(hidden_states(model, cache, torch.arange(10), torch.arange(10), None))
        allowed = torch.ones(5, 15, dtype=torch.bool)
        allowed[:, 10:] = torch.eye(5, dtype=torch.bool)
        allowed[2, 10] = allowed[3, 10] = allowed[4, 11] = True  # 10 -> {12, 13}, 11 -> {14}
        out.append(hidden_states(model, cache, torch.tensor([5, 6, 7, 8, 9]), torch.tensor([10, 10, 11, 11, 11]),
                                 allowed))
        keep_positions(cache, torch.tensor([*range(10), 10, 13]))
        out.append(hidden_states(model, cache, torch.arange(20, 40), torch.arange(12, 32), None))
        crop(cache, 25)
        out.append(hidden_states(model, cache, torch.tensor([3]), torch.tensor([25]), None))
    return out


def assert_same(reference: list[torch.Tensor], got: list[torch.Tensor], tol: float = 1e-5) -> None:
    for want, have in zip(reference, got, strict=True):
        torch.testing.assert_close(have, want, rtol=tol, atol=tol)


def graphed(monkeypatch, captured):
    """A tiny Llama on the lean static path whose "graphs" are `captured` (a CPU stand-in), its
    transformers-forward reference outputs, and an empty graph-replaying cache."""
    model = tiny_model("llama")
    reference = feeds(model, new_cache(model))
    monkeypatch.setattr(static_cache, "_Captured", captured)
    lean.enable(model, static=True)
    return model, reference, small_static(model, capacity=64, graphs=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3"])
def test_lean_forwards_match_transformers(arch):
    model = qwen3() if arch == "qwen3" else tiny_model(arch)
    reference = feeds(model, new_cache(model))
    assert lean.enable(model, static=False)
    for want, got in zip(reference, feeds(model, new_cache(model))):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert lean.enable(model, static=True)
    cache = small_static(model, capacity=8)  # grows twice on the way
    assert_same(reference, feeds(model, cache))
    assert cache.capacity >= 32 and cache.get_seq_length() == 26
    lean.disable(model)


def test_unsupported_models_keep_transformers_forward(monkeypatch):
    gemma = tiny_model("gemma")
    assert not lean.enable(gemma) and lean.describe(gemma) == "transformers"
    llama = tiny_model("llama")
    monkeypatch.setenv("EDGESPEC_LEAN", "0")
    assert not lean.enable(llama)
    monkeypatch.setenv("EDGESPEC_LEAN", "static")
    assert lean.enable(llama) and lean.describe(llama) == "lean+static"
    assert isinstance(new_cache(llama), StaticCache)
    lean.disable(llama)


@pytest.mark.parametrize("overlap", [False, True])
def test_engine_with_static_drafter_matches_generate_and_drafts_the_same(monkeypatch, overlap):
    """Greedy output equals the target's generate, and every step accepts exactly as many tokens as with
    transformers' drafter forward: the lean static path proposes the same trees."""
    target, drafter = tiny_pair("llama", init=0.2)
    prompt = [1, 5, 9, 13]
    want = greedy_reference(target, prompt, 40)
    accepted = {}
    for mode in ("0", "static"):
        monkeypatch.setenv("EDGESPEC_LEAN", mode)
        engine = Engine(target, drafter, budget=24, overlap=overlap, progress=False)
        out = engine.generate(prompt, max_new_tokens=40)
        assert out.ids == want
        accepted[mode] = [s.accepted for s in out.stats.steps]
        assert isinstance(engine.state.dcache, StaticCache) == (mode == "static")
        lean.disable(drafter)
    assert accepted["static"] == accepted["0"]
    assert sum(accepted["static"]) > len(accepted["static"])  # the drafter was right sometimes


class ReplayByRerun:
    """Stands in for a CUDA graph on a CPU: records the forward over its own copies of the inputs and
    re-runs it on replay, so the bookkeeping around capture and replay is what gets tested."""

    def __init__(self, forward, cache, inputs, pool):
        self.inputs = {k: v.clone() for k, v in inputs.items()}
        self.run = lambda: forward(cache, self.inputs)
        self.pool = "pool"
        self.replays = 0

    def replay(self, inputs):
        for k, v in inputs.items():
            self.inputs[k].copy_(v)
        self.replays += 1
        return self.run().clone()


def test_static_cache_replays_captured_buckets(monkeypatch):
    model, reference, cache = graphed(monkeypatch, ReplayByRerun)
    assert_same(reference, feeds(model, cache))
    assert sorted(cache._graphs) == [1, 8, 16, 32]  # 10, 5, 20 and 1 tokens, bucketed
    crop(cache, 0)
    assert_same(reference, feeds(model, cache))  # the second round replays every bucket
    assert all(g.replays >= 2 for g in cache._graphs.values())
    fresh = small_static(model, capacity=64, graphs=True)
    lean.prepare(model, fresh)  # what an engine does at start-up: every bucket captured, nothing kept
    assert sorted(fresh._graphs) == list(static_cache.BUCKETS) and fresh.get_seq_length() == 0
    assert_same(reference, feeds(model, fresh))
    with torch.no_grad():  # a long feed grows the buffers, which drops the graphs ...
        hidden_states(model, fresh, torch.arange(1100) % 64, torch.arange(26, 1126), None)
        hidden_states(model, fresh, torch.tensor([1]), torch.tensor([1126]), None)
    assert fresh._graphs == {} and fresh.capacity >= 1127  # ... and only `prepare` captures again
    lean.prepare(model, fresh)
    assert sorted(fresh._graphs) == list(static_cache.BUCKETS) and fresh.get_seq_length() == 1127
    lean.disable(model)


def test_failed_capture_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    model, reference, cache = graphed(monkeypatch, broken)
    with pytest.warns(GraphFallbackWarning, match="CUDA graphs turned off"):
        got = feeds(model, cache)
    assert_same(reference, got)
    assert not cache.use_graphs
    lean.disable(model)


class ReplayWrong(ReplayByRerun):
    """A broken capture: its replays return something else than the forward."""

    def replay(self, inputs):
        return torch.zeros_like(super().replay(inputs))


def test_a_capture_that_replays_wrong_is_refused(monkeypatch):
    model, reference, cache = graphed(monkeypatch, ReplayWrong)
    with pytest.warns(GraphFallbackWarning, match="differs from the eager forward"):
        got = feeds(model, cache)
    assert_same(reference, got)  # the eager results were returned, never the replay's
    assert not cache.use_graphs and cache._graphs == {}
    lean.disable(model)
