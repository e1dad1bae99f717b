"""One model forward over a pending stem plus tree nodes, with a tree attention mask."""
from __future__ import annotations

import functools
import inspect

import torch

from edgespec.base import reach
from edgespec.core import attention
from edgespec.core.kv import cache_len
from edgespec.base.device import compute_dtype, model_device


def to_model_mask(allowed: torch.Tensor, model, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (q, kv) visibility → the 4D mask the model's attention expects (on `device`, default the
    model's)."""
    dtype = compute_dtype(model)
    mask = allowed[None, None].to(device or model_device(model))
    if reach.attn_implementation(model.config) == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def hidden_states(model, cache, tokens: torch.Tensor | None, positions: torch.Tensor, allowed: torch.Tensor | None,
                  kv_positions: torch.Tensor | None = None, embeds: torch.Tensor | None = None):
    """Run the decoder on `tokens` (1-D) appended to `cache`; returns last hidden states (q, H). A
    pipeline stage passes `embeds` (q, H), the hidden states coming into its layers, instead of tokens.

    `allowed` is a (q, cache_len + q) bool visibility matrix by cache slot, or None for plain causal
    attention. `kv_positions` gives each of those slots' sequence position (default: the cached
    slots are positions 0.. in order, the new ones `positions`); sliding-window layers see only keys
    within their window of each query's position (edgespec/core/attention.py). This is transformers'
    forward; a drafter may run its own (edgespec/core/draft_runner.py).
    """
    visible = visibility(model.config, cache, positions, allowed, kv_positions)
    dev = embeds.device if embeds is not None else model_device(model)
    if isinstance(visible, dict):
        mask = {kind: to_model_mask(v, model, dev) for kind, v in visible.items()}
    else:
        mask = to_model_mask(visible, model, dev) if visible is not None else None
    decoder = model.get_decoder()
    inputs = {"input_ids": tokens[None].to(dev)} if embeds is None else {"inputs_embeds": embeds[None]}
    out = decoder(
        **inputs,
        position_ids=positions[None].to(dev),
        attention_mask=mask,
        use_cache=True,
        **{cache_kwarg(type(decoder)): cache},
    )
    return out.last_hidden_state[0]


def visibility(config, cache, positions, allowed, kv_positions):
    """`allowed` as each layer sees it; unchanged (None included) for a model without sliding layers."""
    if not attention.slides(config):
        return allowed
    past, q = cache_len(cache), positions.numel()
    if allowed is None:
        allowed = torch.ones(q, past + q, dtype=torch.bool).tril(past)
    if kv_positions is None:
        kv_positions = torch.cat([torch.arange(past), positions.cpu()])
    return attention.layer_visibility(config, allowed, positions.cpu(), kv_positions)


@functools.cache
def cache_kwarg(decoder_cls) -> str:
    """The decoder's name for the KV cache argument: `cache` (transformers >= 5.2x) or `past_key_values`."""
    params = inspect.signature(decoder_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def logits_from_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head (and Gemma-style final soft-capping, Granite's logits scaling) to hidden
    states, in the model's dtype as its own forward does; float32 logits."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(model.config, "logits_scaling", None)  # Granite divides its logits
    if scale and scale != 1:
        logits = logits / scale
    return logits.float()


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
