"""What a target and its drafter must share, and what the pair gives a generation: one vocabulary, a
context window, the end-of-sequence tokens."""
from __future__ import annotations

from edgespec.base.config import text_config
from edgespec.core import attention
from edgespec.base.errors import TokenizerMismatchError


def check_tokenizers(target_tok, draft_tok, target_name: str = "target", draft_name: str = "drafter") -> None:
    """Refuse a pair whose vocabularies differ: draft token ids would mean other words to the target."""
    tv, dv = target_tok.get_vocab(), draft_tok.get_vocab()
    if tv == dv:
        return
    diff = sorted(set(tv.items()) ^ set(dv.items()), key=lambda kv: kv[1])[:3]
    raise TokenizerMismatchError(
        f"The {draft_name} and {target_name} tokenizers differ ({len(dv)} vs {len(tv)} tokens; "
        f"e.g. {diff}). Speculative decoding needs a drafter from the same model family with the same "
        "tokenizer: choose a drafter that shares the target's vocabulary."
    )


def proposal_vocab(target, drafter, tokenizer, draft_tokenizer) -> int | None:
    """The ids the drafter may propose: all of its own (None) when both models have as many, else
    the smaller count, when one tokenizer that fits both shows they are one vocabulary padded
    differently (Qwen2.5-0.5B: 151,936 rows, 7B: 152,064, tokenizer: 151,665 ids). Refuses a pair
    whose tokenizers differ, or whose sizes differ with nothing to show they share a tokenizer."""
    if tokenizer is not None and draft_tokenizer is not None and draft_tokenizer is not tokenizer:
        check_tokenizers(tokenizer, draft_tokenizer, "target", "drafter")
    tv, dv = (m.get_input_embeddings().num_embeddings for m in (target, drafter))
    if tv == dv:
        return None
    if tokenizer is None or len(tokenizer) > min(tv, dv):
        held = "no tokenizer was given" if tokenizer is None else f"the tokenizer has {len(tokenizer)} ids"
        raise TokenizerMismatchError(
            f"The drafter's vocabulary has {dv} tokens and the target's {tv} ({held}): their token ids would "
            "not mean the same words. Use a drafter from the target's family with the same tokenizer, and pass "
            "that tokenizer to Engine(target, drafter, tokenizer).")
    return min(tv, dv)


def context_window(*models) -> int:
    """The models' smallest max_position_embeddings (sliding windows are masked, edgespec/core/attention.py;
    only a family not verified past its window is held to it)."""
    sizes = [getattr(text_config(m.config), "max_position_embeddings", None) for m in models]
    sizes += [attention.context_cap(m.config) for m in models]
    sizes = [s for s in sizes if s]
    return min(sizes) if sizes else 2048


def eos_ids(model, tokenizer) -> set[int]:
    """The target's end-of-sequence ids (its generation_config's and the tokenizer's)."""
    ids = set()
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(s) for s in src)
    return ids
