"""A device out-of-memory in the middle of a step is recovered: smaller tree, same output."""
import pytest
import torch

import edgespec.core.verify as verify
from edgespec import Engine
from edgespec.core.draft_runner import DraftRunner
from edgespec.base.errors import OutOfMemoryError
from edgespec.base.stats import Plan
from tests.conftest import Fixed, greedy_reference, prompts, tiny_pair


def failing(real, fail_on: set[int], after_forward: bool):
    """Wrap a forward: on the listed calls raise CUDA OOM (after running it, if `after_forward`,
    so the KV cache already holds the step's partial entries that the rollback must remove)."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] in fail_on:
            if after_forward:
                real(*args, **kwargs)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("module", [verify, DraftRunner])  # the target's pass, the drafter's forward
@pytest.mark.parametrize("after_forward", [False, True])
def test_injected_oom_is_recovered(monkeypatch, module, after_forward):
    target, drafter = tiny_pair("llama", init=0.1)
    ids = prompts(1)[0]
    ref = greedy_reference(target, ids, 30)
    scheduler = Fixed(Plan(64, 8, 4, 16))
    engine = Engine(target, drafter, scheduler=scheduler, overlap=False)
    monkeypatch.setattr(module, "hidden_states", failing(module.hidden_states, {3}, after_forward))
    out = engine.generate(ids, max_new_tokens=30)
    assert out.ids == ref
    assert sum(s.retries for s in out.stats.steps) == 1
    assert scheduler.p.budget == 32, "the scheduler's budget must be lowered after the back-off"
    tlen, dlen = engine.state.lengths()
    assert tlen <= len(ids) + 30 - 1 and dlen <= len(ids) + 30 - 1


def test_oom_streams_resident_layers_and_says_so(monkeypatch):
    """With an offloaded target, the back-off also moves resident layers to streaming; same output."""
    from edgespec.base.errors import BackoffWarning
    from edgespec.offload import offload_layers

    target, drafter = tiny_pair("qwen2", init=0.1, layers=4)
    ids = prompts(1)[0]
    ref = greedy_reference(target, ids, 30)
    handle = offload_layers(target, "cpu", resident_layers=4, progress=False)
    engine = Engine(target, drafter, scheduler=Fixed(Plan(64, 8, 4, 16)), overlap=False)
    monkeypatch.setattr(verify, "hidden_states", failing(verify.hidden_states, {2, 5}, True))
    with pytest.warns(BackoffWarning, match="retrying the step with a tree of 32, 1 fewer resident"):
        out = engine.generate(ids, max_new_tokens=30)
    assert out.ids == ref
    assert sum(s.retries for s in out.stats.steps) == 2 and handle.resident_layers == 2


def test_oom_at_budget_zero_raises_clearly(monkeypatch):
    target, drafter = tiny_pair("llama")
    engine = Engine(target, drafter, scheduler=Fixed(Plan(0, 8, 4, 16)))
    monkeypatch.setattr(verify, "hidden_states", failing(verify.hidden_states, set(range(1, 100)), False))
    with pytest.raises(OutOfMemoryError, match="Out of device memory.*free GPU memory"):
        engine.generate([1, 2, 3], max_new_tokens=5)


def test_conversation_survives_a_failed_turn(monkeypatch):
    """A turn that dies keeps the committed conversation; the next turn gives the target's answer."""
    target, drafter = tiny_pair("qwen2", init=0.1)
    engine = Engine(target, drafter, scheduler=Fixed(Plan(16, 8, 4, 16)))
    first = [1, 2, 3]
    answer = engine.generate(first, max_new_tokens=10).ids
    monkeypatch.setattr(verify, "hidden_states", failing(verify.hidden_states, set(range(1, 100)), True))
    with pytest.raises(OutOfMemoryError):
        engine.scheduler = Fixed(Plan(0, 8, 4, 16))
        engine.generate(first + answer + [7, 8], max_new_tokens=10)
    monkeypatch.undo()
    second = first + answer + [7, 8]
    assert engine.generate(second, max_new_tokens=12).ids == greedy_reference(target, second, 12)
