"""The model families edgespec verifies: greedy output token-identical to the target's own `generate`
past the sliding window (at least 3x the window), with 0, some and all target layers resident,
budgets 1, 8 and 64, overlap on and off; sampling checked by chi-square for one family per attention
implementation; each family's mask handling guarded against transformers' own masks; families a
tree mask cannot express are refused.

Every family gets a tiny random model (3 layers, hidden 32, vocab 64). Families whose layers can
slide get a window of W = 8 in their real pattern (Gemma 2 / gpt-oss alternate sliding and full
layers, Gemma 3 runs sliding layers before a full one, Qwen2/3 slide above `max_window_layers`,
Mistral, Phi-3, Mixtral and Qwen3-MoE slide on every layer).
"""
from __future__ import annotations

import copy
import functools
import io
import warnings

import pytest
import torch

from edgespec import Engine, attention, lean
from edgespec.cache import new_cache
from edgespec.errors import UnsupportedModelError
from edgespec.forward import hidden_states
from edgespec.offload import offload_layers
from edgespec.stats import Plan
from tests.conftest import greedy_reference, noisy_copy, tiny_model
from tests.test_greedy import Fixed
from tests.test_sampling import chi2, chi2_critical

W = 8  # sliding window of the tiny sliding families
LAYERS = 3
NEW = 3 * W + 6  # generated tokens: a 5-token prompt + NEW reaches past 3x the window
SLIDE = {"sliding_window": W}
MIXED = {"sliding_window": W, "use_sliding_window": True, "max_window_layers": 1}
FAMILIES = {
    "llama": {}, "mistral": SLIDE, "qwen2": MIXED, "qwen3": MIXED, "gemma": {}, "gemma2": SLIDE,
    "gemma3": {**SLIDE, "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]},
    "phi3": SLIDE, "mixtral": SLIDE, "qwen3_moe": {**SLIDE, "use_sliding_window": True}, "gpt_oss": SLIDE,
    "glm4": {}, "olmo2": {}, "granite": {},
}
SLIDING = ["mistral", "gemma2", "gemma3", "gpt_oss"]  # the families people run with sliding windows: full product
RESIDENT = (0, 1, LAYERS)
BUDGETS = (1, 8, 64)
PROMPTS = [[3, 14, 15, 9, 26], [53, 58, 9, 7, 9]]


def target_model(family: str, **kw):
    return tiny_model(family, layers=LAYERS, init=0.1, **{**FAMILIES[family], **kw})


def matrix() -> list:
    """Every family x budget; resident layers and overlap rotate so each family meets every value of
    each axis; the sliding families take the full product."""
    cases = []
    for i, family in enumerate(FAMILIES):
        for j, budget in enumerate(BUDGETS):
            if family in SLIDING:
                cases += [(family, budget, r, o) for r in RESIDENT for o in (False, True)]
            else:
                cases.append((family, budget, RESIDENT[(i + j) % 3], (i + j) % 2 == 1))
    return cases


@functools.cache
def reference(family: str) -> tuple[tuple[int, ...], ...]:
    plain = target_model(family)
    return tuple(tuple(greedy_reference(plain, ids, NEW)) for ids in PROMPTS)


@pytest.mark.parametrize("family,budget,resident,overlap", matrix())
def test_greedy_matches_generate_past_the_window(family, budget, resident, overlap):
    target = target_model(family)
    drafter = noisy_copy(target, scale=0.005)
    offload_layers(target, "cpu", resident_layers=resident, progress=False)
    engine = Engine(target, drafter, scheduler=Fixed(Plan(budget, 12, 4, 16)), overlap=overlap)
    assert engine.max_context == target.config.max_position_embeddings  # not the sliding window
    steps = []
    for ids, want in zip(PROMPTS, reference(family)):
        out = engine.generate(ids, max_new_tokens=NEW)
        assert out.ids == list(want)
        assert out.stats.stop_reason == "length"
        steps += out.stats.steps
    if budget > 1:
        assert max(s.accepted for s in steps) > 2, "no tree path was ever accepted: the trees went unused"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tree_hidden_states_match_transformers_own_masks(family):
    """A chain deeper than the window plus a side branch, verified in one forward over a cached
    prefix, equals transformers' forward (its own causal/sliding masks) over each node's path."""
    model = target_model(family)
    prefix = torch.tensor([5, 9, 2, 33, 7, 1, 60, 12, 4, 8, 19, 23, 40, 2, 6])  # longer than the window
    chain = torch.tensor([11, 3, 27, 50, 8, 14, 2, 31, 45, 6, 17, 22])  # depths 1..12 > W
    side = torch.tensor([9, 10])  # children of chain[1] and of that child: depths 3, 4
    tokens = torch.cat([chain, side])
    parents = list(range(-1, len(chain) - 1)) + [1, len(chain)]  # tree node i's parent (-1: the root)
    depths = [d + 1 for d in range(len(chain))] + [3, 4]
    past = prefix.numel()
    n = tokens.numel()
    allowed = torch.zeros(n, past + n, dtype=torch.bool)
    allowed[:, :past] = True
    paths = []
    for i in range(n):
        path, j = [], i
        while j >= 0:
            path.append(j)
            j = parents[j]
        paths.append(path[::-1])
        allowed[i, past + torch.tensor(path)] = True
    with torch.no_grad():
        cache = new_cache(model)
        hidden_states(model, cache, prefix[:-1], torch.arange(past - 1), None)
        root = hidden_states(model, cache, prefix[-1:], torch.tensor([past - 1]), None)
        got = hidden_states(model, cache, tokens, past - 1 + torch.tensor(depths), allowed)
        for i, path in enumerate(paths):
            seq = torch.cat([prefix, tokens[path]])
            want = model.get_decoder()(input_ids=seq[None]).last_hidden_state[0, -1]
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-5, msg=f"node {i} (depth {depths[i]})")
        want_root = model.get_decoder()(input_ids=prefix[None]).last_hidden_state[0, -1]
        torch.testing.assert_close(root[0], want_root, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,lean_mode", [("mistral", "dynamic"), ("mistral", "static"), ("qwen2", "auto"),
                                              ("gemma2", "auto"), ("gpt_oss", "auto")])
def test_twin_drafter_is_always_right_past_the_window(family, lean_mode, monkeypatch):
    """A drafter identical to the target proposes the target's own tokens only if its sliding
    windows go by position inside the tree: chains of 12 (> W) are then accepted whole, lean forward
    (Mistral, dynamic and static cache) or transformers' (mixed layers)."""
    monkeypatch.setenv("EDGESPEC_LEAN", lean_mode)
    target = target_model(family)
    engine = Engine(target, copy.deepcopy(target), scheduler=Fixed(Plan(12, 12, 1, 4)), overlap=False)
    assert attention.slides(target.config)
    assert (lean.lookup(engine.drafter) is not None) == (family == "mistral")
    ids = PROMPTS[0]
    out = engine.generate(ids, max_new_tokens=4 * 13)
    assert out.ids == greedy_reference(target, ids, 4 * 13)
    assert [s.accepted for s in out.stats.steps] == [13] * 4


# ---- sampling: one family per attention implementation -------------------------------------------
@pytest.mark.parametrize("family", ["gemma3", "gpt_oss"])  # sdpa (mixed sliding), eager (sinks, mixed sliding)
def test_sampling_matches_target_law_past_the_window(family):
    """Joint law of the first two tokens after a prompt 3x the window, against the target's exact law
    from transformers' own forward; the drafter's law is rejected by the same draws."""
    from tests.test_sampling import two_token_law
    from edgespec.sampling import Sampler

    vocab = 8
    target = target_model(family, vocab=vocab, init=0.3)
    assert target.config._attn_implementation == ("sdpa" if family == "gemma3" else "eager")
    drafter = noisy_copy(target, scale=0.2)
    engine = Engine(target, drafter, scheduler=Fixed(Plan(12, 4, 4, 16)), overlap=False)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (3 * W,), generator=gen).tolist()
    truth = two_token_law(target, prompt, Sampler(1.0), vocab)
    n, counts = 2000, {}
    for i in range(n):
        ids = tuple(engine.generate(prompt, max_new_tokens=2, temperature=1.0, seed=i).ids)
        counts[ids] = counts.get(ids, 0) + 1
    stat, df = chi2(counts, truth, n)
    assert stat < chi2_critical(df), (stat, df)
    draft_law = two_token_law(drafter, prompt, Sampler(1.0), vocab)
    assert sum(abs(draft_law[k] - truth[k]) for k in truth) > 0.2, "drafter too close to the target for a power check"
    assert chi2(counts, draft_law, n)[0] > chi2_critical(df)


# ---- attention implementations and refusals -------------------------------------------------------
def test_sdpa_forced_on_gemma2_is_switched_to_eager():
    """Gemma 2 under SDPA would drop its attention softcapping: the engine runs it eager."""
    target = target_model("gemma2")
    plain = copy.deepcopy(target)
    target.config._attn_implementation = "sdpa"
    with pytest.warns(UserWarning, match="gemma2 ran attention 'sdpa'.*switched it to 'eager'"):
        engine = Engine(target, noisy_copy(target), scheduler=Fixed(Plan(8, 12, 4, 16)))
    assert target.config._attn_implementation == "eager"
    ids = PROMPTS[0]
    assert engine.generate(ids, max_new_tokens=NEW).ids == greedy_reference(plain, ids, NEW)


def test_attention_that_takes_no_tree_mask_is_switched_to_sdpa():
    target = target_model("llama")
    target.config._attn_implementation = "flex_attention"
    with pytest.warns(UserWarning, match="'flex_attention'.*switched it to 'sdpa'"):
        Engine(target, noisy_copy(target), budget=4)
    assert target.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("change,match", [
    ({"layer_types": ["linear_attention", "full_attention", "full_attention"]}, "llama has linear_attention layers"),
    ({"attention_chunk_size": 8}, "llama uses chunked attention"),
])
def test_attention_a_tree_mask_cannot_express_is_refused(change, match):
    target = target_model("llama")
    for key, value in change.items():
        setattr(target.config, key, value)
    with pytest.raises(UnsupportedModelError, match=match):
        Engine(target, noisy_copy(target), budget=4)


def test_bidirectional_gemma3_is_refused():
    target = target_model("gemma3", use_bidirectional_attention=True)
    with pytest.raises(UnsupportedModelError, match="gemma3_text .*bidirectional"):
        Engine(target, noisy_copy(target), budget=4)


def test_unverified_sliding_family_is_capped_at_its_window_and_says_so():
    from transformers import Starcoder2Config

    cfg = Starcoder2Config(num_hidden_layers=2, sliding_window=W, max_position_embeddings=256)
    with pytest.warns(attention.UnverifiedWindowWarning, match=f"starcoder2 .*capped at {W} tokens"):
        assert attention.context_cap(cfg) == W
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert attention.context_cap(target_model("gemma2").config) is None


def test_a_chat_answer_cut_by_the_context_says_why():
    from tests.test_cli import session, tiny_engine

    engine = tiny_engine(budget=4)
    engine.max_context = 24
    s, _, err = session(engine, max_new_tokens=50)
    s.ask("hello world")
    assert s.last.stop_reason == "context"
    assert "stopped at the context window (24 tokens): /reset" in err.getvalue()
    s2, _, err2 = session(tiny_engine(budget=4), max_new_tokens=3)
    s2.ask("hello world")
    assert s2.last.stop_reason == "length" and err2.getvalue() == ""
