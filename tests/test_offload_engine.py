"""The engine over an offloaded target: greedy output equals the plain target's generate, exactly."""
import copy

import pytest

from edgespec import Engine
from edgespec.offload import offload_layers
from edgespec.stats import Plan
from tests.conftest import greedy_reference, tiny_pair
from tests.test_greedy import Fixed, prompts


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
