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
import warnings

import pytest
import torch

from edgespec import Engine
from edgespec.core import attention
from edgespec.base.config import forward_from_env
from edgespec.core.draft_runner import DraftRunner
from edgespec.core.kv import new_cache
from edgespec.base.errors import UnsupportedModelError
from edgespec.core.forward import hidden_states
from edgespec.offload import offload_layers
from edgespec.base.stats import Plan
from tests.conftest import Fixed, chi2, chi2_critical, greedy_reference, noisy_copy, tiny_model

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
    return tiny_model(family, layers=LAYERS, **{"init": 0.1, **FAMILIES[family], **kw})


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
def test_drafter_tree_search_windows_by_position(family, lean_mode, monkeypatch):
    """The drafter's best-first search (bushy, so cache slots are not positions) proposes at every
    expanded node the top tokens of transformers' own forward over the node's path, deeper than the
    window too, and still after re-rooting; lean forward (Mistral: dynamic and static cache) or
    transformers' (mixed layers)."""
    from edgespec.core.search import TreeSearch
    from edgespec.core.sampling import Sampler

    monkeypatch.setenv("EDGESPEC_LEAN", lean_mode)
    model = target_model(family, init=0.3)
    draft = DraftRunner(model, forward_from_env())
    assert (draft.lean is not None) == (family == "mistral")
    branch, plan = 3, Plan(32, 16, 3, 8)
    sampler = Sampler(draft_temperature=0.1)  # deep trees (depth scores above siblings)
    ctx = [5, 9, 2, 33, 7, 1, 60, 12, 4, 8, 19, 23, 40, 2, 6]
    with torch.no_grad():
        search = TreeSearch.start(draft, draft.new_cache(), torch.tensor(ctx), sampler, branch)
        search.grow(plan)
        assert check_children(model, search, ctx, branch) > W, "the search never went deeper than the window"
        tree = search.tree(plan.budget)
        kids = tree.children()
        a = next(iter(kids[0].values()))
        b = next(i for i in kids[a].values() if kids[i])
        bonus = next(int(tree.tokens[i]) for i in kids[b].values() if search.expanded[search.snapshot[i]])
        search, keep = search.reroot([a, b], bonus)
        assert search is not None, "the re-rooted search was expected (its root drafted and expanded)"
        search.cache.keep(torch.tensor(keep))  # as Conversation.commit compacts the drafter's cache
        ctx = ctx + [int(tree.tokens[a]), int(tree.tokens[b]), bonus]
        search.grow(Plan(48, 16, 3, 8))
        assert check_children(model, search, ctx, branch, pruned=True) > W


def check_children(model, search, ctx: list[int], branch: int, pruned: bool = False) -> int:
    """Assert each expanded node's children are the model's top `branch` tokens after the node's
    path (some of them, once re-rooting dropped `pruned` ones); returns the deepest checked depth.
    One batched forward: paths padded on the right (causal: padding never reaches a path's end)."""
    nodes = search.expanded.nonzero().squeeze(1).tolist()
    paths = []
    for node in nodes:
        path, j = [], node
        while j > 0:
            path.append(int(search.tokens[j]))
            j = int(search.parents[j])
        paths.append(ctx + path[::-1])
    width = max(map(len, paths))
    batch = torch.tensor([p + [0] * (width - len(p)) for p in paths])
    logits = model(batch).logits[torch.arange(len(paths)), torch.tensor([len(p) - 1 for p in paths])]
    for node, path, row in zip(nodes, paths, logits):
        want = set(row.topk(branch).indices.tolist())
        kids = set(search.tokens[search.parents == node].tolist())
        assert (kids <= want and kids) if pruned else kids == want, f"node {node} at depth {len(path) - len(ctx)}"
    return max(len(p) for p in paths) - len(ctx)


# ---- sampling: one family per attention implementation -------------------------------------------
@pytest.mark.parametrize("family", ["gemma3", "gpt_oss"])  # sdpa (mixed sliding), eager (sinks, mixed sliding)
def test_sampling_matches_target_law_past_the_window(family):
    """After a prompt 3x the window, a tree drafted under the engine's sampler and verified in one
    target pass: the first two tokens its walk commits, over 4,000 seeds, follow the target's exact
    law from transformers' own forward (cells: (a, b) where the tree holds a, else (a,)), and the
    drafter's law is rejected by the same draws."""
    from edgespec.core.search import TreeSearch
    from edgespec.core.forward import logits_from_hidden
    from edgespec.core.sampling import Sampler
    from edgespec.core.verify import walk

    vocab = 8
    target = target_model(family, vocab=vocab, init=0.3)
    assert target.config._attn_implementation == ("sdpa" if family == "gemma3" else "eager")
    drafter = noisy_copy(target, scale=0.2)
    prompt = torch.randint(0, vocab, (3 * W,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        draft = DraftRunner(drafter)
        search = TreeSearch.start(draft, draft.new_cache(), prompt, Sampler(1.0, seed=0), 4)
        search.grow(Plan(16, 3, 4, 16))
        tree = search.tree(16)
        cache = new_cache(target)
        hidden_states(target, cache, prompt[:-1], torch.arange(3 * W - 1), None)
        past = 3 * W - 1
        allowed = torch.ones(tree.size + 1, past + tree.size + 1, dtype=torch.bool)
        allowed[:, past:] = tree.ancestor_mask()
        hidden = hidden_states(target, cache, torch.cat([prompt[-1:], tree.tokens[1:]]), past + tree.depths, allowed)
        logits = logits_from_hidden(target, hidden)
    n, counts = 4000, {}
    for seed in range(n):
        ids = tuple(walk(tree, lambda i: logits[i], Sampler(1.0, seed=seed), past).tokens[:2])
        counts[ids] = counts.get(ids, 0) + 1
    truth, draft_law = tree_law(target, prompt, tree, vocab), tree_law(drafter, prompt, tree, vocab)
    stat, df = chi2(counts, truth, n)
    assert stat < chi2_critical(df), (stat, df)
    assert sum(abs(draft_law[k] - truth[k]) for k in truth) > 0.2, "drafter too close to the target for a power check"
    assert chi2(counts, draft_law, n)[0] > chi2_critical(df)


def tree_law(model, prompt: torch.Tensor, tree, vocab: int) -> dict:
    """The exact law of a walk's first two committed tokens, from `model`'s own forward (no cache):
    (a, b) for a first token the tree holds, (a,) for one it does not (the walk ends there)."""
    from edgespec.core.sampling import Sampler

    probs = Sampler(1.0).probs
    with torch.no_grad():
        p1 = probs(model(prompt[None]).logits[0, -1])
        seconds = probs(model(torch.stack([torch.cat([prompt, torch.tensor([a])]) for a in range(vocab)])).logits[:, -1])
    kids = tree.children()[0]
    law = {}
    for a in range(vocab):
        if a in kids:
            law.update({(a, b): float(p1[a] * seconds[a][b]) for b in range(vocab)})
        else:
            law[(a,)] = float(p1[a])
    return law


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
    from tests.conftest import chat_session, tiny_engine

    engine = tiny_engine(budget=4)
    engine.max_context = 24
    s, _, err = chat_session(engine, max_new_tokens=50)
    s.ask("hello world")
    assert s.last.stop_reason == "context"
    assert "stopped at the context window (24 tokens): /reset" in err.getvalue()
    s2, _, err2 = chat_session(tiny_engine(budget=4), max_new_tokens=3)
    s2.ask("hello world")
    assert s2.last.stop_reason == "length" and err2.getvalue() == ""
