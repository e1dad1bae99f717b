"""Greedy decoding through the tree engine equals the target's own greedy generate, token for token."""
import pytest

from edgespec import Engine
from edgespec.base.stats import Plan
from tests.conftest import Fixed, greedy_reference, prompts, tiny_model, tiny_pair


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("budget,depth,branch", [(0, 8, 4), (1, 8, 4), (8, 2, 4), (64, 8, 4), (64, 32, 16), (512, 16, 8)])
@pytest.mark.parametrize("overlap", [False, True])
def test_greedy_equals_generate(arch, budget, depth, branch, overlap):
    target, drafter = tiny_pair(arch, init=0.1)
    engine = Engine(target, drafter, scheduler=Fixed(Plan(budget, depth, branch, 32)), overlap=overlap)
    accepted = []
    for ids in prompts(4):
        out = engine.generate(ids, max_new_tokens=40)
        assert out.ids == greedy_reference(target, ids, 40)
        accepted.append(out.stats.accepted_per_pass)
    if budget >= 8:
        assert max(accepted) > 1.0, "the drafter never got a token accepted: the tree is not being used"


@pytest.mark.parametrize("arch", ["mistral", "gemma"])
def test_other_families(arch):
    target, drafter = tiny_pair(arch, init=0.1)
    engine = Engine(target, drafter, scheduler=Fixed(Plan(32, 8, 4, 16)))
    for ids in prompts(2):
        assert engine.generate(ids, max_new_tokens=24).ids == greedy_reference(target, ids, 24)


def test_eager_attention_additive_mask():
    target, drafter = tiny_pair("llama", init=0.1, attn="eager")
    engine = Engine(target, drafter, scheduler=Fixed(Plan(32, 8, 4, 16)))
    ids = prompts(1)[0]
    assert engine.generate(ids, max_new_tokens=30).ids == greedy_reference(target, ids, 30)


def test_unrelated_drafter_still_exact():
    target = tiny_model("llama", seed=0, init=0.1)
    drafter = tiny_model("llama", seed=7, layers=1)
    engine = Engine(target, drafter, scheduler=Fixed(Plan(64, 8, 8, 32)))
    ids = prompts(1)[0]
    assert engine.generate(ids, max_new_tokens=30).ids == greedy_reference(target, ids, 30)


def test_multi_turn_prefix_reuse_and_continuation():
    """Later calls reuse the cached prefix; generating in two halves equals one call."""
    target, drafter = tiny_pair("qwen2", init=0.1)
    engine = Engine(target, drafter, scheduler=Fixed(Plan(16, 8, 4, 16)))
    ids = prompts(1)[0]
    ref = greedy_reference(target, ids, 40)
    first = engine.generate(ids, max_new_tokens=17).ids
    second = engine.generate(ids + first, max_new_tokens=23).ids
    assert first + second == ref
    # an edited history (shared prefix only) still gives the target's own answer
    edited = ids[:2] + [5, 6, 7]
    assert engine.generate(edited, max_new_tokens=20).ids == greedy_reference(target, edited, 20)


def test_caches_hold_only_committed_tokens():
    target, drafter = tiny_pair("llama", init=0.1)
    engine = Engine(target, drafter, scheduler=Fixed(Plan(128, 16, 8, 32)))
    ids = prompts(1)[0]
    out = engine.generate(ids, max_new_tokens=33)
    committed = len(ids) + len(out.ids)
    tlen, dlen = engine.state.lengths()
    assert tlen <= committed - 1 and dlen <= committed - 1
    assert tlen >= committed - 2, "accepted tokens must stay cached (no recompute)"


def test_eos_stops_like_generate():
    target, drafter = tiny_pair("llama", init=0.1)
    ids = prompts(1)[0]
    free = greedy_reference(target, ids, 30)
    eos = free[10]
    target.generation_config.eos_token_id = eos
    engine = Engine(target, drafter, scheduler=Fixed(Plan(32, 8, 4, 16)))
    out = engine.generate(ids, max_new_tokens=30)
    assert out.ids == greedy_reference(target, ids, 30)
    assert out.ids[-1] == eos and out.stats.stop_reason == "eos"


def test_overlap_reuses_drafted_subtrees():
    """With overlap on, the next tree often starts from nodes drafted during the previous pass;
    output stays the target's own. The target streams over an emulated link (10 ms per layer) so
    each pass lasts long enough for drafting rounds, as on a real offloaded target."""
    import copy

    from edgespec.offload import offload_layers
    from tests.conftest import noisy_copy

    target = tiny_model("llama", init=0.1)
    drafter = noisy_copy(target, scale=0.003)
    plain = copy.deepcopy(target)
    offload_layers(target, "cpu", resident_layers=0, link_delay=0.01, progress=False)
    engine = Engine(target, drafter, scheduler=Fixed(Plan(32, 8, 4, 16)), overlap=True)
    reused = 0
    for ids in prompts(3):
        out = engine.generate(ids, max_new_tokens=60)
        assert out.ids == greedy_reference(plain, ids, 60)
        reused += sum(s.reused > 0 for s in out.stats.steps)
        assert all(s.overlap_time > 0 for s in out.stats.steps if s.tree_size)
    assert reused > 0, "no step ever reused a drafted subtree"


@pytest.mark.parametrize("draft_temperature", [0.5, 2.0])
def test_draft_temperature_reshapes_the_tree_not_the_output(draft_temperature):
    """Scoring tree nodes at another drafter temperature changes which nodes are drafted (below 1:
    deeper trees), never the tokens: they are still the target's greedy ones."""
    target, drafter = tiny_pair("llama", init=0.1)
    depths = {}
    for t in (1.0, draft_temperature):
        engine = Engine(target, drafter, scheduler=Fixed(Plan(32, 16, 8, 32)), overlap=False, draft_temperature=t,
                        tree_scores="draft")
        steps = []
        for ids in prompts(4):
            out = engine.generate(ids, max_new_tokens=30)
            assert out.ids == greedy_reference(target, ids, 30)
            steps += out.stats.steps
        depths[t] = sum(s.tree_depth for s in steps) / len(steps)
    assert (depths[draft_temperature] > depths[1.0]) == (draft_temperature < 1.0)
