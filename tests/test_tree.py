"""The drafter's best-first tree: budget, depth, connectivity, best-first order, cache bookkeeping."""
import pytest
import torch

from edgespec.core.search import build_tree
from edgespec.core.draft_runner import DraftRunner
from edgespec.core.forward import stem_and_tree_mask
from edgespec.core.sampling import Sampler
from edgespec.base.stats import Plan
from edgespec.core.tree import ancestor_chains
from tests.conftest import tiny_model


def draft(budget, depth=8, branch=4, batch=16, seed=0):
    model = tiny_model("llama", seed=seed, init=0.2)
    drafter = DraftRunner(model)
    cache = drafter.new_cache()
    stem = torch.tensor([3, 1, 4, 1, 5])
    tree = build_tree(drafter, cache, stem, Plan(budget, depth, branch, batch), Sampler())
    return model, cache, stem, tree


@pytest.mark.parametrize("budget,depth,branch", [(1, 8, 4), (8, 3, 4), (64, 8, 4), (300, 6, 8)])
def test_budget_depth_and_shape(budget, depth, branch):
    _, _, stem, tree = draft(budget, depth, branch)
    assert tree.size == budget
    assert tree.depth <= depth
    assert int(tree.tokens[0]) == int(stem[-1])
    p = tree.parents
    assert (p[1:] < torch.arange(1, tree.size + 1)).all(), "parents precede children"
    assert (tree.depths[1:] == tree.depths[p[1:]] + 1).all()
    # children of one node carry distinct tokens
    pairs = set(zip(p[1:].tolist(), tree.tokens[1:].tolist()))
    assert len(pairs) == tree.size


def test_best_first_is_the_top_k_of_all_paths():
    """Every kept node scores at least as high as any child the search proposed but dropped:
    checked by re-scoring: a node's score = parent score + drafter log-prob of its token."""
    model, cache, stem, tree = draft(40, depth=6, branch=6)
    scores = tree.scores
    assert (scores[1:] <= scores[tree.parents[1:]] + 1e-6).all(), "a child never beats its parent"
    # nesting: the top-K set for K < budget is itself connected (parents rank ahead of children)
    order = torch.argsort(scores[1:], descending=True, stable=True) + 1
    rank = torch.empty_like(order)
    rank[order - 1] = torch.arange(order.numel())
    for i in range(1, tree.size + 1):
        par = int(tree.parents[i])
        if par > 0:
            assert rank[par - 1] < rank[i - 1]


def test_scores_are_drafter_logprobs_along_the_path():
    model, _, stem, tree = draft(24, depth=5, branch=4)
    with torch.no_grad():
        for i in range(1, tree.size + 1):
            chain = ancestor_chains(tree.parents, torch.tensor([i]), 8)[0]
            path = [int(tree.tokens[j]) for j in reversed(chain.tolist()) if j > 0]
            ids = torch.tensor([stem.tolist() + path])
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)
            start = stem.numel() - 1
            expect = sum(float(lp[start + k, t]) for k, t in enumerate(path))
            assert abs(expect - float(tree.scores[i])) < 1e-4


def test_draft_cache_positions():
    _, cache, stem, tree = draft(64, depth=8)
    fed = tree.draft_pos
    assert int(fed[0]) == stem.numel() - 1
    assert cache.get_seq_length() >= stem.numel() + int((fed[1:] >= 0).sum())
    # a fed node's parent was fed before it
    for i in range(1, tree.size + 1):
        if fed[i] >= 0:
            assert 0 <= fed[int(tree.parents[i])] < fed[i]


def test_stem_and_tree_mask():
    _, _, _, tree = draft(10, depth=4)
    allowed = stem_and_tree_mask(past=7, stem=3, tree_anc=tree.ancestor_mask())
    assert allowed.shape == (3 + 10, 7 + 3 + 10)
    assert allowed[:, :7].all()
    assert not allowed[0, 8] and allowed[2, 9]
    for i in range(1, 11):
        row = allowed[2 + i, 10:]
        anc = {j - 1 for j in ancestor_chains(tree.parents, torch.tensor([i]), 8)[0].tolist() if j > 0}
        assert set(row.nonzero().flatten().tolist()) == anc


def test_budget_zero_drafts_nothing():
    _, cache, _, tree = draft(0)
    assert tree.size == 0 and cache.get_seq_length() == 0


@pytest.mark.parametrize("pruned", [False, True])
def test_a_rerooted_search_always_grows_a_tree(pruned):
    """The target's token is often a node the search expanded once and then pushed past the budget
    (kept as slack), whose children were all pruned since. Re-rooted there, the search held a root it
    had expanded and nothing under it, which grow() never expands again: an empty tree, a whole target
    pass for one token. reroot hands back no search then (the next step drafts from the new root); with
    children alive it still hands back the subtree."""
    from edgespec.core.search import TreeSearch

    drafter = DraftRunner(tiny_model("llama", init=0.2))
    search = TreeSearch.start(drafter, drafter.new_cache(), torch.tensor([3, 1, 4, 1, 5]), Sampler(), 4)
    plan = Plan(12, 6, 4, 16)
    search.grow(plan)
    tree = search.tree(plan.budget)
    a = next(iter(tree.children()[0].values()))  # the path: one accepted node
    end = int(search.snapshot[a])
    hit = ((search.parents == end) & search.expanded & search.alive).nonzero()[0, 0]
    if pruned:
        search.alive[search.parents == hit] = False
    nxt, keep = search.reroot([a], int(search.tokens[hit]))
    if pruned:
        assert nxt is None, "a search re-rooted at an expanded node with no child alive drafts nothing"
        return
    assert nxt is not None
    nxt.cache.keep(torch.tensor(keep))
    nxt.grow(plan)
    assert nxt.tree(plan.budget).size == plan.budget
