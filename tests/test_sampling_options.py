"""Repetition penalty, top-k and min-p at every tree node with the node's own context (its ancestors);
sampling defaults from the model's generation_config or chat defaults."""
import pytest
import torch
from transformers import GenerationConfig

from edgespec import Engine
from edgespec.base.errors import InvalidArgumentError
from edgespec.core.sampling import CHAT_DEFAULTS, Sampler, SamplingConfig, model_defaults, resolve
from edgespec.base.stats import Plan
from tests.conftest import Fixed, chi2, chi2_critical, noisy_copy, prompts, tiny_model, tiny_pair


def hf_greedy(model, ids, n, penalty):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, repetition_penalty=penalty)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_greedy_repetition_penalty_equals_generate(arch, penalty):
    """Small vocab and a strong penalty: the penalised tokens change the greedy path often."""
    target, drafter = tiny_pair(arch, init=0.3, vocab=32)
    engine = Engine(target, drafter, scheduler=Fixed(Plan(32, 8, 4, 16)))
    branchy, changed = 0, 0
    for ids in prompts(4, vocab=32):
        out = engine.generate(ids, max_new_tokens=40, temperature=0, repetition_penalty=penalty)
        assert out.ids == hf_greedy(target, ids, 40, penalty)
        changed += out.ids != hf_greedy(target, ids, 40, 1.0)
        branchy += any(s.tree_size > s.tree_depth for s in out.stats.steps)
        assert out.stats.accepted_per_pass > 1.0, "no draft token accepted: the tree was not used"
    assert changed >= 2, "the penalty must change the greedy output for this test to mean anything"
    assert branchy == 4, "trees must have several branches per node"


def next_two_law(model, prompt, sampler, vocab):
    """Exact law of the first two tokens under `sampler` (the second sees the first as context)."""
    with torch.no_grad():
        first = model(torch.tensor([prompt])).logits[0, -1]
        seconds = model(torch.tensor([[*prompt, a] for a in range(vocab)])).logits[:, -1]
    p1 = sampler.probs(first, sampler.seen(prompt, vocab))
    return {(a, b): float(p1[a] * sampler.probs(seconds[a], sampler.seen([*prompt, a], vocab))[b])
            for a in range(vocab) for b in range(vocab)}


@pytest.mark.parametrize("kw", [{"top_k": 3}, {"min_p": 0.2}, {"repetition_penalty": 2.0},
                                {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.5, "top_p": 0.9}])
def test_sampling_options_keep_the_targets_law(kw):
    """Chi-square on the joint law of the first two tokens: the second is picked at a tree node below
    the root, whose context holds the first (what the penalty looks at)."""
    vocab, temperature = 8, 1.0
    target, _ = tiny_pair("llama", vocab=vocab, init=0.3)
    drafter = noisy_copy(target, scale=0.2)
    engine = Engine(target, drafter, scheduler=Fixed(Plan(12, 4, 4, 16)))
    prompt = [1, 2, 3]
    truth = next_two_law(target, prompt, Sampler(temperature, **kw), vocab)
    n, counts, deep = 2000, {}, 0
    for i in range(n):
        out = engine.generate(prompt, max_new_tokens=2, temperature=temperature, seed=i, **kw)
        counts[tuple(out.ids)] = counts.get(tuple(out.ids), 0) + 1
        deep += out.stats.steps[0].accepted >= 2  # the second token came from a node below the root
    assert deep > n // 4, "the second token must often be picked at a deeper tree node"
    stat, df = chi2(counts, truth, n)
    assert stat < chi2_critical(df), (stat, df)
    plain = next_two_law(target, prompt, Sampler(temperature), vocab)  # power: the law without the options
    assert chi2(counts, plain, n)[0] > chi2_critical(df)


def test_penalty_context_is_the_nodes_own_path():
    """Two siblings: the penalty at each child's child counts that child's token, not its sibling's."""
    from edgespec.core.tree import Tree
    from edgespec.core.verify import walk

    logits = torch.tensor([[0.0, 2.0, 1.9, 0.0], [0.0, 3.0, 2.9, 0.0], [0.0, 3.0, 2.9, 0.0]])
    tree = Tree(torch.tensor([3, 1, 2]), torch.tensor([-1, 0, 0]), torch.tensor([0, 1, 1]), torch.zeros(3),
                torch.full((3,), -1))
    sampler = Sampler(0.0, repetition_penalty=1.5)
    verdict = walk(tree, lambda i: logits[i], sampler, 0, history=[3])
    # root picks 1 (2.0 vs 1.9); at node 1 token 1 is penalised (3.0 / 1.5 = 2.0 < 2.9): picks 2
    assert verdict.tokens == [1, 2]
    assert walk(tree, lambda i: logits[i], Sampler(0.0), 0, history=[3]).tokens == [1, 1]


def test_defaults_come_from_the_models_generation_config():
    model = tiny_model("llama")
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.8, top_k=20,
                                               repetition_penalty=1.05)
    cfg = model_defaults(model)
    assert (cfg.temperature, cfg.top_p, cfg.top_k, cfg.repetition_penalty) == (0.6, 0.8, 20, 1.05)
    assert cfg.source == "generation_config"
    model.generation_config = GenerationConfig(do_sample=False, repetition_penalty=1.2)
    assert (model_defaults(model).temperature, model_defaults(model).repetition_penalty) == (0.0, 1.2)
    model.generation_config = GenerationConfig.from_model_config(model.config)  # what a GGUF gives
    assert model_defaults(model) == CHAT_DEFAULTS
    assert (CHAT_DEFAULTS.temperature, CHAT_DEFAULTS.top_k, CHAT_DEFAULTS.top_p,
            CHAT_DEFAULTS.repetition_penalty) == (0.8, 40, 0.9, 1.1)


def test_none_means_the_engines_defaults_and_explicit_values_win():
    target, drafter = tiny_pair("llama", init=0.3)
    target.generation_config = GenerationConfig.from_model_config(target.config)
    engine = Engine(target, drafter, scheduler=Fixed(Plan(8, 4, 4, 16)))
    assert engine.sampling == CHAT_DEFAULTS
    outs = {tuple(engine.generate([1, 2, 3], max_new_tokens=12, seed=s).ids) for s in range(6)}
    assert len(outs) > 1, "chat defaults sample"
    default = engine.generate([1, 2, 3], max_new_tokens=12, seed=3)
    explicit = engine.generate([1, 2, 3], max_new_tokens=12, seed=3, temperature=0.8, top_k=40, top_p=0.9,
                               repetition_penalty=1.1)
    assert default.ids == explicit.ids
    assert "chat defaults" in default.stats.sampling
    greedy = engine.generate([1, 2, 3], max_new_tokens=12, temperature=0)
    assert greedy.ids == hf_greedy(target, [1, 2, 3], 12, 1.0), "temperature 0 is the target's plain greedy"
    assert resolve(CHAT_DEFAULTS, {"temperature": 0}).repetition_penalty == 1.0
    assert resolve(CHAT_DEFAULTS, {"temperature": 0, "repetition_penalty": 1.3}).repetition_penalty == 1.3


@pytest.mark.parametrize("kw", [{"top_k": -1}, {"top_k": 2.5}, {"min_p": 1.0}, {"min_p": -0.1},
                                {"repetition_penalty": 0.0}, {"repetition_penalty": float("nan")}])
def test_invalid_options(kw):
    with pytest.raises(InvalidArgumentError, match=next(iter(kw))):
        SamplingConfig(0.7, **kw)
    target, drafter = tiny_pair("llama")
    with pytest.raises(InvalidArgumentError, match=next(iter(kw))):
        Engine(target, drafter, budget=4).generate([1, 2], max_new_tokens=2, temperature=0.7, **kw)
