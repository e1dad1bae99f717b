"""Pairs whose vocabularies differ: refused unless one tokenizer shows they are one vocabulary padded
differently; then the drafter never proposes an id the target lacks, and the output is exact."""
import pytest
import torch

from edgespec import Engine
from edgespec.base.errors import TokenizerMismatchError
from edgespec.base.stats import Plan
from tests.conftest import Fixed, greedy_reference, noisy_copy, prompts, tiny_model, tiny_tokenizer


def test_different_vocab_sizes_are_refused_naming_both():
    target, drafter = tiny_model("llama", vocab=300), tiny_model("llama", seed=1, vocab=517)
    with pytest.raises(TokenizerMismatchError, match=r"517.*300"):
        Engine(target, drafter, budget=4)
    with pytest.raises(TokenizerMismatchError, match=r"517.*300"):  # a tokenizer too big for one of them
        Engine(target, drafter, tiny_tokenizer(400), budget=4)


def test_different_tokenizers_are_refused():
    target = tiny_model("llama")
    with pytest.raises(TokenizerMismatchError, match="tokenizers differ"):
        Engine(target, noisy_copy(target), tiny_tokenizer(60), draft_tokenizer=tiny_tokenizer(50), budget=4)


def pad_rows(model, rows: int, logit_boost: float):
    """Grow the embedding and LM head to `rows` (as checkpoints pad them); the new head rows get
    `logit_boost` times a real row, so a boost > 1 makes the padded ids win the argmax."""
    old = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[old:] = logit_boost * head[:1]
    return model


@pytest.mark.parametrize("padded", ["drafter", "target"])
def test_padded_vocab_with_one_tokenizer_is_exact(padded):
    target = tiny_model("llama", init=0.1, vocab=64)
    drafter = noisy_copy(target)
    if padded == "drafter":
        pad_rows(drafter, 80, logit_boost=50.0)  # would propose ids 64..79 if allowed
    else:
        pad_rows(target, 80, logit_boost=0.0)  # the target's padded rows: never its choice
    engine = Engine(target, drafter, tiny_tokenizer(60), scheduler=Fixed(Plan(16, 6, 4, 16)))
    assert engine.vocab == 64
    accepted = []
    for ids in prompts(3):
        out = engine.generate(ids, max_new_tokens=30, temperature=0)
        assert out.ids == greedy_reference(target, ids, 30)
        accepted.append(out.stats.accepted_per_pass)
    if padded == "target":
        assert max(accepted) > 1.0, "the drafter's proposals must still be accepted"
