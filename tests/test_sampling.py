"""Sampling through the tree keeps the target's distribution exactly (chi-square tests that can fail)."""
import pytest
import torch

from edgespec import Engine
from edgespec.base.errors import InvalidArgumentError
from edgespec.core.sampling import Sampler
from edgespec.base.stats import Plan
from edgespec.core.tree import Tree
from edgespec.core.verify import walk
from tests.conftest import Fixed, chi2, chi2_critical, noisy_copy, tiny_pair


def test_walk_preserves_distribution_on_a_bushy_tree():
    """A 3-level tree with several children per node; target logits fixed per node."""
    vocab = 6
    gen = torch.Generator().manual_seed(0)
    # root → children tokens 0,1,2 ; node1(tok 0) → 0,3 ; node2(tok 1) → 4 ; node4(0→0) → 5
    parents = torch.tensor([-1, 0, 0, 0, 1, 1, 2, 4])
    tokens = torch.tensor([9, 0, 1, 2, 0, 3, 4, 5])
    depths = torch.tensor([0, 1, 1, 1, 2, 2, 2, 3])
    tree = Tree(tokens, parents, depths, torch.zeros(8), torch.full((8,), -1))
    logits = torch.randn(8, vocab, generator=gen) * 1.5
    sampler = Sampler(temperature=0.8, top_p=0.9, seed=123)
    probs = [sampler.probs(logits[i]) for i in range(8)]
    n = 20000
    counts: dict = {}
    for seed in range(n):
        toks = tuple(walk(tree, lambda i: logits[i], Sampler(temperature=0.8, top_p=0.9, seed=seed), 7).tokens[:2])
        counts[toks] = counts.get(toks, 0) + 1
    # exact law of the first two committed tokens under ancestral sampling from the target
    kids = tree.children()
    truth = {}
    for a in range(vocab):
        child = kids[0].get(a)
        for b in range(vocab):
            pb = float(probs[child][b]) if child is not None else None
            if pb is None:
                truth[(a,)] = float(probs[0][a])  # walk stops: bonus token is `a`
                break
            truth[(a, b)] = float(probs[0][a]) * pb
    counts = {(k[:1] if k[:1] in truth else k): v for k, v in counts.items()}
    stat, df = chi2(counts, truth, n)
    assert stat < chi2_critical(df), (stat, df)
    # power: the same draws are far from the drafter-free uniform law
    uniform = {k: 1 / len(truth) for k in truth}
    assert chi2(counts, uniform, n)[0] > 10 * chi2_critical(df)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_engine_sampling_matches_target(temperature, top_p):
    """Joint law of the first two generated tokens vs the target's exact law, vocab 8."""
    vocab = 8
    target, drafter = tiny_pair("llama", vocab=vocab, init=0.3)
    drafter = noisy_copy(target, scale=0.2)
    engine = Engine(target, drafter, scheduler=Fixed(Plan(12, 4, 4, 16)))
    prompt = [1, 2, 3]
    sampler = Sampler(temperature, top_p)
    truth = two_token_law(target, prompt, sampler, vocab)
    n, counts, branchy = 2000, {}, 0
    for i in range(n):
        out = engine.generate(prompt, max_new_tokens=2, temperature=temperature, top_p=top_p, seed=i)
        counts[tuple(out.ids)] = counts.get(tuple(out.ids), 0) + 1
        branchy += out.stats.steps[0].tree_size > out.stats.steps[0].tree_depth
    assert branchy == n, "trees must have several branches for this test to mean anything"
    stat, df = chi2(counts, truth, n)
    assert stat < chi2_critical(df), (stat, df)
    # power: the drafter's own law is rejected by the same draws
    draft_law = two_token_law(drafter, prompt, sampler, vocab)
    assert sum(abs(draft_law[k] - truth[k]) for k in truth) > 0.2, "drafter too close to the target for a power check"
    assert chi2(counts, draft_law, n)[0] > chi2_critical(df)


def two_token_law(model, prompt, sampler, vocab):
    with torch.no_grad():
        p1 = sampler.probs(model(torch.tensor([prompt])).logits[0, -1])
        seconds = model(torch.tensor([[*prompt, a] for a in range(vocab)])).logits[:, -1]
    return {(a, b): float(p1[a] * sampler.probs(seconds[a])[b]) for a in range(vocab) for b in range(vocab)}


def test_seed_reproducible():
    target, drafter = tiny_pair("qwen2", init=0.3)
    engine = Engine(target, drafter, scheduler=Fixed(Plan(16, 6, 4, 16)))
    a = engine.generate([1, 2, 3], max_new_tokens=20, temperature=1.0, seed=5).ids
    b = engine.generate([1, 2, 3], max_new_tokens=20, temperature=1.0, seed=5).ids
    assert a == b


@pytest.mark.parametrize("kw", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"temperature": float("nan")}])
def test_invalid_sampling_args(kw):
    with pytest.raises(InvalidArgumentError):
        Sampler(**kw)


def test_sampled_output_depends_only_on_target_and_seed():
    """The target's draws come from noise keyed by (seed, position): different drafters and budgets, and
    plain decoding, give the same tokens for the same seed."""
    target, drafter = tiny_pair("llama", init=0.3)
    other = noisy_copy(target, scale=0.3, seed=7)
    outs = [Engine(target, d, scheduler=Fixed(Plan(k, 6, 4, 16))).generate([1, 2, 3], max_new_tokens=24,
                                                                          temperature=0.9, seed=11).ids
            for d, k in [(drafter, 16), (other, 4), (drafter, 0)]]
    assert outs[0] == outs[1] == outs[2]
    assert outs[0] != Engine(target, drafter, budget=0).generate([1, 2, 3], max_new_tokens=24, temperature=0.9,
                                                                 seed=12).ids


def test_drafter_sees_the_targets_noise(monkeypatch):
    """With a drafter equal to the target, sampling accepts (almost) as much as greedy decoding: the
    drafter proposes the target's own perturbed argmax. Drafting under other noise loses most of it."""
    import copy

    target, _ = tiny_pair("llama", init=0.3, vocab=64)
    twin = copy.deepcopy(target)

    def accepted(temperature, seed=0):
        engine = Engine(target, twin, scheduler=Fixed(Plan(16, 8, 4, 16)))
        out = engine.generate([1, 2, 3], max_new_tokens=40, temperature=temperature, seed=seed)
        return len(out.ids) / len(out.stats.steps)

    greedy, coupled = accepted(0.0), accepted(1.0)
    assert coupled >= 0.8 * greedy, (coupled, greedy)
    real_noise = Sampler.noise
    monkeypatch.setattr(Sampler, "draft_children", _draft_under_other_noise(real_noise))
    assert accepted(1.0) < 0.7 * coupled


def _draft_under_other_noise(real_noise):
    def draft_children(self, logits, positions, k, seen=None, allowed=None):
        logprobs = self.draft_logprobs(logits, seen, allowed)
        noise = torch.stack([real_noise(self, int(p) + 10_000, logprobs.shape[-1], logprobs.device) for p in positions])
        return torch.log_softmax(logprobs + noise, dim=-1).topk(k, dim=-1)
    return draft_children
