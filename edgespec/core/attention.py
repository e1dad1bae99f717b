"""How a model family's attention takes a token tree: which layers slide (and by how far), which
attention implementation runs (the mask's form follows it), and which families are refused.

Sliding-window layers (Mistral-style models, where every layer slides once `config.sliding_window`
is set, and mixed patterns named by `config.layer_types`: Gemma 2/3, gpt-oss, Qwen2/3 with
`use_sliding_window`) let a token at position p see keys at positions (p - window, p]. In a tree a
node's position is its root's position plus its depth, so on those layers a node sees its prefix
and its ancestors *within `window` positions*: the window is applied by position, never by cache
slot (the drafter's cache holds tree nodes whose slots are not their positions). Models with mixed
layers take `attention_mask` as a dict keyed by layer type and hand each layer its own mask;
models with one pattern take one mask.

The caches stay full-length on every layer (edgespec/core/kv.py) and the window lives in the mask:
transformers' rolling sliding-window cache layer evicts entries a tree's accepted path may still
need.
"""
from __future__ import annotations

import warnings

import torch

from edgespec.base import reach
from edgespec.base.config import text_config
from edgespec.base.errors import UnsupportedModelError

FULL, SLIDING = "full_attention", "sliding_attention"
MASKABLE = ("sdpa", "eager")  # implementations that take an explicit 4D mask (flash/flex do not)

# model types checked token-identical to `generate` past their window by tests/test_families.py
VERIFIED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral",
            "qwen3_moe", "gpt_oss", "glm4", "olmo2", "granite"}


class UnverifiedWindowWarning(UserWarning):
    """A family outside the verified ones has sliding-window layers: its context is capped at the window."""



def layer_windows(config) -> list[int | None]:
    """Each decoder layer's sliding window (None: full attention), as the family's forward applies it."""
    cfg = text_config(config)
    n = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None) or None
    types = getattr(cfg, "layer_types", None)
    if types:
        return [window if t == SLIDING else None for t in types[:n]]
    return [window] * n  # one mask for all layers: every layer slides once a window is set


def slides(config) -> bool:
    return any(layer_windows(config))


def family(config) -> str:
    return str(getattr(text_config(config), "model_type", None) or type(config).__name__)


# ---- masks ---------------------------------------------------------------------------------------
def slide(allowed: torch.Tensor, q_pos: torch.Tensor, kv_pos: torch.Tensor, window: int) -> torch.Tensor:
    """`allowed` (q, kv) restricted to keys less than `window` positions behind each query."""
    return allowed & (kv_pos[None, :] > q_pos[:, None] - window)


def layer_visibility(config, allowed: torch.Tensor, q_pos: torch.Tensor, kv_pos: torch.Tensor):
    """The (q, kv) bool visibility each layer gets: one tensor when every layer shares a pattern,
    else a dict keyed by layer type (the form mixed-layer families take as `attention_mask`)."""
    windows = layer_windows(config)
    slid = {w: slide(allowed, q_pos, kv_pos, w) for w in set(windows) if w}
    if len(set(windows)) == 1:
        return slid.get(windows[0], allowed)
    types = text_config(config).layer_types
    return {t: (slid[w] if w else allowed) for t, w in zip(types, windows)}


# ---- engine start-up -------------------------------------------------------------------------------
def prepare(model) -> None:
    """Refuse a family whose attention a tree cannot be masked into exactly, and make the model run
    an implementation that takes the tree mask: SDPA where the family supports it, else eager
    (Gemma 2 and gpt-oss refuse SDPA: softcapping, attention sinks)."""
    check_family(model.config)
    impl = reach.attn_implementation(model.config)
    if impl in MASKABLE and (impl != "sdpa" or reach.supports_sdpa(model)):
        return
    want = "sdpa" if reach.supports_sdpa(model) else "eager"
    try:
        model.set_attn_implementation(want)
    except Exception as err:  # noqa: BLE001 — transformers refused: say what and how to fix
        raise UnsupportedModelError(
            f"{family(model.config)} runs attention {impl!r}, which cannot take a token-tree mask, and "
            f"transformers would not switch it to {want!r} ({err}): load the model with "
            f"attn_implementation='{want}'.") from None
    if impl not in (None, want):
        warnings.warn(f"edgespec: {family(model.config)} ran attention {impl!r}, which cannot take a token-tree "
                      f"mask; switched it to {want!r}", stacklevel=3)


def check_family(config) -> None:
    """UnsupportedModelError for attention no tree mask can express exactly."""
    cfg, name = text_config(config), family(config)
    other = sorted(set(getattr(cfg, "layer_types", None) or []) - {FULL, SLIDING})
    if other:
        raise UnsupportedModelError(
            f"{name} has {', '.join(other)} layers: edgespec verifies token trees only over full and sliding-window "
            "attention (a tree cannot be masked into those layers exactly). Use a model of a family listed in "
            "the README's model table.")
    if getattr(cfg, "attention_chunk_size", None):
        raise UnsupportedModelError(
            f"{name} uses chunked attention (attention_chunk_size={cfg.attention_chunk_size}), which edgespec's "
            "tree masks do not express: use a model of a family listed in the README's model table.")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise UnsupportedModelError(
            f"{name} is configured with bidirectional attention (an embedding model): it cannot generate "
            "token by token. Load a causal (generative) checkpoint.")


def context_cap(config) -> int | None:
    """The context a family outside the verified ones is held to: its smallest sliding window (exact,
    as before sliding layers were verified), with a warning; None for the rest."""
    windows = [w for w in layer_windows(config) if w]
    if not windows or family(config) in VERIFIED:
        return None
    warnings.warn(f"edgespec: {family(config)} has sliding-window layers and is not among the families verified "
                  f"past the window; its context is capped at {min(windows)} tokens (stop reason 'context')",
                  UnverifiedWindowWarning, stacklevel=3)
    return min(windows)
