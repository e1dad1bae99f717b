"""The drafter's lean forward (edgespec/core/lean.py) and its static, graph-replayable cache
(edgespec/core/static_kv.py) against transformers' own forward."""
from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from edgespec import Engine
from edgespec.core import static_kv as static_cache
from edgespec.base.config import forward_from_env
from edgespec.core.draft_runner import DraftRunner
from edgespec.core.static_kv import GraphFallbackWarning, StaticKV

from tests.conftest import greedy_reference, tiny_model, tiny_pair


def qwen3(seed: int = 0):
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).eval()


def small_static(draft: DraftRunner, capacity: int = 8, graphs: bool = False) -> StaticKV:
    big = draft.new_cache()
    return StaticKV(big.n_layers, big.shape[1], big.shape[3], big.dtype, big.device, capacity, graphs)


def feeds(draft: DraftRunner, cache) -> list[torch.Tensor]:
    """A stem, a tree (two branches) over it, a pruning to one branch, then a longer stem."""
    out, hidden_states = [], draft.hidden_states
    with torch.no_grad():
        out.append(hidden_states(cache, torch.arange(10), torch.arange(10), None))
        allowed = torch.ones(5, 15, dtype=torch.bool)
        allowed[:, 10:] = torch.eye(5, dtype=torch.bool)
        allowed[2, 10] = allowed[3, 10] = allowed[4, 11] = True  # 10 -> {12, 13}, 11 -> {14}
        out.append(hidden_states(cache, torch.tensor([5, 6, 7, 8, 9]), torch.tensor([10, 10, 11, 11, 11]),
                                 allowed))
        cache.keep(torch.tensor([*range(10), 10, 13]))
        out.append(hidden_states(cache, torch.arange(20, 40), torch.arange(12, 32), None))
        cache.crop_to(25)
        out.append(hidden_states(cache, torch.tensor([3]), torch.tensor([25]), None))
    return out


def assert_same(reference: list[torch.Tensor], got: list[torch.Tensor], tol: float = 1e-5) -> None:
    for want, have in zip(reference, got, strict=True):
        torch.testing.assert_close(have, want, rtol=tol, atol=tol)


def graphed(monkeypatch, captured):
    """A tiny Llama on the lean static path whose "graphs" are `captured` (a CPU stand-in), its
    transformers-forward reference outputs, and an empty graph-replaying cache."""
    model = tiny_model("llama")
    reference = feeds(plain(model), plain(model).new_cache())
    monkeypatch.setattr(static_cache, "_Captured", captured)
    draft = DraftRunner(model, "static")
    return draft, reference, small_static(draft, capacity=64, graphs=True)


def plain(model) -> DraftRunner:
    """The model on transformers' own forward: the reference."""
    return DraftRunner(model, "transformers")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3"])
def test_lean_forwards_match_transformers(arch):
    model = qwen3() if arch == "qwen3" else tiny_model(arch)
    reference = feeds(plain(model), plain(model).new_cache())
    dynamic = DraftRunner(model, "lean")
    assert dynamic.describe() == "lean"
    for want, got in zip(reference, feeds(dynamic, dynamic.new_cache())):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    static = DraftRunner(model, "static")
    assert static.describe() == "lean+static"
    cache = small_static(static, capacity=8)  # grows twice on the way
    assert_same(reference, feeds(static, cache))
    assert cache.capacity >= 32 and cache.get_seq_length() == 26


def test_unsupported_models_keep_transformers_forward(monkeypatch):
    gemma = tiny_model("gemma")
    assert DraftRunner(gemma).lean is None and DraftRunner(gemma, "static").describe() == "transformers"
    llama = tiny_model("llama")
    monkeypatch.setenv("EDGESPEC_LEAN", "0")
    assert DraftRunner(llama, forward_from_env()).lean is None
    monkeypatch.setenv("EDGESPEC_LEAN", "static")
    draft = DraftRunner(llama, forward_from_env())
    assert draft.lean is not None and draft.describe() == "lean+static"
    assert isinstance(draft.new_cache(), StaticKV)


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
        assert isinstance(engine.conversation.dcache, StaticKV) == (mode == "static")
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
    draft, reference, cache = graphed(monkeypatch, ReplayByRerun)
    assert_same(reference, feeds(draft, cache))
    assert sorted(cache._graphs) == [1, 8, 16, 32]  # 10, 5, 20 and 1 tokens, bucketed
    cache.crop_to(0)
    assert_same(reference, feeds(draft, cache))  # the second round replays every bucket
    assert all(g.replays >= 2 for g in cache._graphs.values())
    fresh = small_static(draft, capacity=64, graphs=True)
    draft.prepare(fresh)  # what an engine does at start-up: every bucket captured, nothing kept
    assert sorted(fresh._graphs) == list(static_cache.BUCKETS) and fresh.get_seq_length() == 0
    assert_same(reference, feeds(draft, fresh))
    with torch.no_grad():  # a long feed grows the buffers, which drops the graphs ...
        draft.hidden_states(fresh, torch.arange(1100) % 64, torch.arange(26, 1126), None)
        draft.hidden_states(fresh, torch.tensor([1]), torch.tensor([1126]), None)
    assert fresh._graphs == {} and fresh.capacity >= 1127  # ... and only `prepare` captures again
    draft.prepare(fresh)
    assert sorted(fresh._graphs) == list(static_cache.BUCKETS) and fresh.get_seq_length() == 1127


def test_failed_capture_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    draft, reference, cache = graphed(monkeypatch, broken)
    with pytest.warns(GraphFallbackWarning, match="CUDA graphs turned off"):
        got = feeds(draft, cache)
    assert_same(reference, got)
    assert not cache.use_graphs


class ReplayWrong(ReplayByRerun):
    """A broken capture: its replays return something else than the forward."""

    def replay(self, inputs):
        return torch.zeros_like(super().replay(inputs))


def test_a_capture_that_replays_wrong_is_refused(monkeypatch):
    draft, reference, cache = graphed(monkeypatch, ReplayWrong)
    with pytest.warns(GraphFallbackWarning, match="differs from the eager forward"):
        got = feeds(draft, cache)
    assert_same(reference, got)  # the eager results were returned, never the replay's
    assert not cache.use_graphs and cache._graphs == {}
