"""The engine over an offloaded target: greedy output equals the plain target's generate, exactly."""
import copy

import pytest

from edgespec import Engine
from edgespec.offload import offload_layers
from edgespec.base.stats import Plan
from tests.conftest import Fixed, greedy_reference, prompts, tiny_pair


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("resident", [0, 2, 4])
@pytest.mark.parametrize("overlap", [False, True])
def test_offloaded_target_greedy_exact(arch, resident, overlap):
    target, drafter = tiny_pair(arch, init=0.1, layers=4)
    plain = copy.deepcopy(target)
    handle = offload_layers(target, "cpu", resident_layers=resident, progress=False,
                            link_delay=0.001 if overlap else 0.0)
    engine = Engine(target, drafter, scheduler=Fixed(Plan(32, 8, 4, 16)), overlap=overlap)
    assert engine.offload is handle
    for ids in prompts(3):
        out = engine.generate(ids, max_new_tokens=30)
        assert out.ids == greedy_reference(plain, ids, 30)
    streamed = 4 - resident
    if streamed:
        assert handle.stats.total.bytes == handle.stats.total.passes * handle.pinned_bytes > 0


def test_overlap_auto_follows_the_link():
    target, drafter = tiny_pair("llama", init=0.1, layers=4)
    assert Engine(target, drafter, budget=8).overlap is False
    offload_layers(target, "cpu", resident_layers=0, progress=False, link_delay=0.002)
    assert Engine(target, drafter, budget=8).overlap is True


def test_auto_budget_calibrates_once_and_stays_exact(tmp_path, monkeypatch):
    """budget="auto" with calibration: the pass-time and draft-time curves are measured at start-up,
    cached per machine/models/link, reused by the next engine; output still exact."""
    import edgespec.scheduler.timing as timing

    monkeypatch.setenv("EDGESPEC_CACHE", str(tmp_path))
    calls = []
    real = timing.time_passes
    monkeypatch.setattr(timing, "time_passes", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    target, drafter = tiny_pair("llama", init=0.1, layers=4)
    plain = copy.deepcopy(target)
    offload_layers(target, "cpu", resident_layers=1, progress=False)
    engine = Engine(target, drafter, budget="auto", calibrate=True)
    assert calls, "calibration must measure the pass"
    assert engine.scheduler.cost.pass_curve.known and engine.scheduler.cost.pass_time(64) > 0
    assert engine.scheduler.cost.ready, "drafting must be calibrated too: the first step is then planned"
    assert 0 < engine.scheduler.cost.draft_time(4) <= engine.scheduler.cost.draft_time(256)
    measured = len(calls)
    Engine(target, drafter, budget="auto", calibrate=True)
    assert len(calls) == measured, "the second engine must reuse the cached calibration"
    ids = prompts(1)[0]
    assert engine.generate(ids, max_new_tokens=30).ids == greedy_reference(plain, ids, 30)


def test_memory_cap_bounds_the_tree(monkeypatch):
    import edgespec.base.memory as memory

    target, drafter = tiny_pair("llama", init=0.1)
    engine = Engine(target, drafter, scheduler=Fixed(Plan(512, 8, 8, 32)))
    monkeypatch.setattr(memory, "max_tree_tokens", lambda config, past, free: 20)
    ids = prompts(1)[0]
    out = engine.generate(ids, max_new_tokens=20)
    assert out.ids == greedy_reference(target, ids, 20)
    assert max(s.tree_size for s in out.stats.steps) <= 20


def test_max_tree_tokens_moves_the_right_way():
    from edgespec.base.memory import max_tree_tokens, pass_bytes

    target, _ = tiny_pair("llama")
    cfg = target.config
    budget = pass_bytes(cfg, 300, 100) * 2
    n = max_tree_tokens(cfg, past=100, free=budget)
    assert 295 <= n <= 300
    assert max_tree_tokens(cfg, past=100, free=budget * 4) > n
    assert max_tree_tokens(cfg, past=2000, free=budget) < n


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_streaming_is_exact_for_the_quantized_target(quant):
    """Streamed layers kept int8/nf4-encoded: the engine's greedy output is exactly the greedy output
    of the model that runs (the offloaded, quantized target's own generate)."""
    target, drafter = tiny_pair("llama", init=0.1, layers=4)
    plain = copy.deepcopy(target)
    offload_layers(target, "cpu", resident_layers=1, quantize=quant, progress=False)
    engine = Engine(target, drafter, scheduler=Fixed(Plan(32, 8, 4, 16)))
    differs = False
    for ids in prompts(3):
        out = engine.generate(ids, max_new_tokens=24)
        assert out.ids == greedy_reference(target, ids, 24)
        differs |= out.ids != greedy_reference(plain, ids, 24)
    assert differs or quant == "int8"  # nf4's ~10 % weight error shows in the tokens; int8's may not
