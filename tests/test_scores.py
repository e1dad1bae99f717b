"""Calibrated tree scores (edgespec/core/scores.py): hit rates learnt from verified trees reshape the tree,
never the output."""
import math

import pytest
import torch

from edgespec import Engine
from edgespec.core.search import TreeSearch
from edgespec.core.sampling import Sampler
from edgespec.core.scores import FORCED, MAX_HIT, ScoreCalibration
from edgespec.base.stats import Plan
from edgespec.core.tree import Tree
from tests.conftest import Fixed, greedy_reference, prompts, tiny_pair


def test_uncalibrated_scores_are_the_drafters_own():
    calib = ScoreCalibration()
    logp = torch.log(torch.tensor([[0.7, 0.2, 0.05], [0.999, 1e-4, 1e-6]]))
    out = calib.edge_scores(logp, torch.arange(3).expand(2, 3))
    assert torch.allclose(out, logp.clamp(max=math.log(MAX_HIT)))


def test_forced_proposals_are_certain_and_not_learnt():
    """A proposal the grammar forces scores log 1 = 0 before and after learning, and its (certain) hits
    do not reach the table: they say nothing of how often the drafter's confident guesses hit."""
    calib = ScoreCalibration(decay=1.0)
    logp = torch.log(torch.tensor([1.0, 0.9, 0.4]))
    rank = torch.tensor([FORCED, 0, 1])
    assert calib.edge_scores(logp, rank).tolist()[0] == 0.0
    calib.observe(logp, rank, torch.tensor([True, False, False]))
    assert calib.tests.sum() == 2 and calib.hits.sum() == 0  # the forced hit left out
    out = calib.edge_scores(logp, rank)
    assert out[0] == 0.0 and out[1] < math.log(0.9)  # the top guess missed: it scores below its p now


def test_learns_hit_rates_by_rank():
    """Top proposals at p=0.5 that the target takes 90 % of the time, and runners-up at p=0.3 it takes
    5 % of the time: the map moves to those rates, and keeps the drafter's ordering within a bin."""
    calib = ScoreCalibration()
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        logp = torch.log(torch.tensor([0.5] * 10 + [0.3] * 10))
        rank = torch.tensor([0] * 10 + [1] * 10)
        hit = torch.cat([torch.rand(10, generator=gen) < 0.9, torch.rand(10, generator=gen) < 0.05])
        calib.observe(logp, rank, hit)
    out = calib.edge_scores(torch.log(torch.tensor([0.5, 0.3])), torch.tensor([0, 1])).exp()
    assert out[0] == pytest.approx(0.9, abs=0.05)
    assert out[1] == pytest.approx(0.05, abs=0.03)
    near = calib.edge_scores(torch.log(torch.tensor([0.45, 0.55])), torch.tensor([0, 0]))
    assert near[0] < near[1]
    assert calib.state()["top"], "the stats list the calibrated bins"


def test_forgets_old_trees():
    """After the drafter's top tokens stop being taken, the calibrated rate follows within ~100 trees."""
    calib = ScoreCalibration()
    logp, rank = torch.log(torch.full((10,), 0.6)), torch.zeros(10, dtype=torch.long)
    for hit in (True, False):
        for _ in range(150):
            calib.observe(logp, rank, torch.full((10,), hit))
        rate = float(calib.edge_scores(logp[:1], rank[:1]).exp())
        assert (rate > 0.9) if hit else (rate < 0.15)


def test_observe_tree_counts_tested_nodes_only():
    """root -> a(1), b(2); a -> c(3), d(4); c -> e(5). Path [a, c]: tested are a, b (children of the
    root), c, d (children of a), e (child of c); hits a, c; e tested and missed."""
    parents = torch.tensor([-1, 0, 0, 1, 1, 3])
    tree = Tree(torch.arange(6), parents, torch.tensor([0, 1, 1, 2, 2, 3]), torch.zeros(6), torch.full((6,), -1),
                torch.log(torch.tensor([1.0, 0.6, 0.3, 0.7, 0.1, 0.8])), torch.tensor([0, 0, 1, 0, 1, 0]))
    calib = ScoreCalibration(decay=1.0)
    calib.observe_tree(tree, [1, 3])
    assert calib.tests.sum() == 5 and calib.hits.sum() == 2
    tree2 = Tree(tree.tokens, parents, tree.depths, tree.scores, tree.draft_pos, tree.logp, tree.rank)
    calib.observe_tree(tree2, [])  # nothing accepted: only the root's children were tested
    assert calib.tests.sum() == 7 and calib.hits.sum() == 2


def test_rescore_matches_incremental_scores():
    target, drafter = tiny_pair("llama", init=0.1)
    from edgespec.core.draft_runner import DraftRunner

    calib = ScoreCalibration()
    calib.observe(torch.log(torch.tensor([0.5, 0.2, 0.9])), torch.tensor([0, 1, 0]), torch.tensor([1, 0, 1]))
    draft = DraftRunner(drafter)
    with torch.no_grad():
        search = TreeSearch.start(draft, draft.new_cache(), torch.tensor([1, 2, 3]), Sampler(), 4, calibration=calib)
        search.grow(Plan(48, 8, 4, 16))
    before = search.scores.clone()
    search.rescore()
    assert torch.allclose(search.scores, before, atol=1e-5)
    tree = search.tree(48)
    assert (tree.scores[1:] <= tree.scores[tree.parents[1:]] + 1e-6).all(), "a child never outscores its parent"


def test_self_drafting_grows_chains():
    """A drafter identical to the target is always right about its top token and never about the others,
    whatever its probabilities say: calibrated, the tree becomes a deep chain and accepts far more per pass
    than the same budget scored by raw probabilities. Output: the target's greedy tokens either way."""
    target, _ = tiny_pair("llama", init=0.1)
    per_pass, depth = {}, {}
    for scores in ("draft", "calibrated"):
        engine = Engine(target, target, scheduler=Fixed(Plan(24, 24, 4, 16)), overlap=False, tree_scores=scores)
        steps = []
        for ids in prompts(3):
            out = engine.generate(ids, max_new_tokens=60)
            assert out.ids == greedy_reference(target, ids, 60)
            steps += out.stats.steps[2:]  # after the first trees calibrated it
        per_pass[scores] = sum(s.accepted for s in steps) / len(steps)
        depth[scores] = sum(s.tree_depth for s in steps) / len(steps)
    assert depth["calibrated"] > 1.5 * depth["draft"]
    assert per_pass["calibrated"] > 1.3 * per_pass["draft"]


def test_sampling_and_greedy_calibrate_apart():
    target, drafter = tiny_pair("llama", init=0.1)
    engine = Engine(target, drafter, scheduler=Fixed(Plan(16, 8, 4, 16)), overlap=False)
    engine.generate([1, 2, 3], max_new_tokens=10)
    engine.generate([1, 2, 3], max_new_tokens=10, temperature=0.8, seed=1)
    greedy, sampled = engine.score_calibration(Sampler()), engine.score_calibration(Sampler(0.8))
    assert greedy is not sampled and greedy.trees > 0 and sampled.trees > 0
    assert Engine(target, drafter, budget=4, tree_scores="draft").score_calibration(Sampler()) is None


def test_bad_tree_scores_option():
    from edgespec.base.errors import InvalidArgumentError

    target, drafter = tiny_pair("llama")
    with pytest.raises(InvalidArgumentError, match="tree_scores must be"):
        Engine(target, drafter, budget=4, tree_scores="best")
