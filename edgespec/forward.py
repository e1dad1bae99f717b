"""One model forward over a pending stem plus tree nodes, with a tree attention mask."""
from __future__ import annotations

import functools
import inspect

import torch

from edgespec import lean
from edgespec.cache import cache_len


def model_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def compute_dtype(model) -> torch.dtype:
    """The dtype the model computes in (its first floating-point parameter's)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def to_model_mask(allowed: torch.Tensor, model) -> torch.Tensor:
    """Boolean (q, kv) visibility → the 4D mask the model's attention expects."""
    dtype = compute_dtype(model)
    mask = allowed[None, None].to(model_device(model))
    if model.config._attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def hidden_states(model, cache, tokens: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor | None):
    """Run the decoder on `tokens` (1-D) appended to `cache`; returns last hidden states (q, H).

    `allowed` is a (q, cache_len + q) bool visibility matrix, or None for plain causal attention.
    A model opted into the lean forward (the drafter, edgespec/lean.py) runs that instead.
    """
    lean_forward = lean.lookup(model)
    if lean_forward is not None:
        return lean_forward(cache, tokens, positions, allowed)
    dev = model_device(model)
    mask = to_model_mask(allowed, model) if allowed is not None else None
    decoder = model.get_decoder()
    out = decoder(
        input_ids=tokens[None].to(dev),
        position_ids=positions[None].to(dev),
        attention_mask=mask,
        use_cache=True,
        **{cache_kwarg(type(decoder)): cache},
    )
    return out.last_hidden_state[0]


@functools.cache
def cache_kwarg(decoder_cls) -> str:
    """The decoder's name for the KV cache argument: `cache` (transformers >= 5.2x) or `past_key_values`."""
    params = inspect.signature(decoder_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def logits_from_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head (and Gemma-style final soft-capping) to hidden states; float32 logits."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def stem_and_tree_mask(past: int, stem: int, tree_anc: torch.Tensor) -> torch.Tensor:
    """Visibility for `stem` causal tokens followed by tree nodes 1..N hanging off the last stem token.

    tree_anc is the tree's (N+1, N+1) ancestor mask (node 0 = root = last stem token).
    """
    n = tree_anc.shape[0] - 1
    q = stem + n
    allowed = torch.zeros(q, past + q, dtype=torch.bool)
    allowed[:, :past] = True
    allowed[:stem, past : past + stem] = torch.ones(stem, stem, dtype=torch.bool).tril()
    allowed[stem:, past : past + stem] = True  # stem (root included) is every node's ancestor
    allowed[stem:, past + stem :] = tree_anc[1:, 1:]
    return allowed


def check_cache(cache, expected: int) -> None:
    assert cache_len(cache) == expected, f"cache holds {cache_len(cache)} entries, expected {expected}"
