"""The KV caches: one protocol for what the engine does to a cache, and its two adapters.

A tree's entries are appended to a cache by the forward, then the cache is compacted to the accepted
path (`keep`), so accepted tokens are never recomputed; a failed or abandoned step is undone by
`crop_to`. `KVCache` is that protocol; `TreeCache` adapts transformers' DynamicCache to it (and is one,
so it goes straight into a transformers forward as `past_key_values`), and `static_kv.StaticKV` is the
drafter's preallocated buffers on the lean static path.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from transformers import DynamicCache


@runtime_checkable
class KVCache(Protocol):
    def get_seq_length(self) -> int:
        """Entries held (the longest layer's)."""

    def layer_lengths(self) -> list[int]:
        """Entries held by each layer (they differ only after a forward that failed half-way)."""

    def crop_to(self, length: int) -> None:
        """Drop every entry from position `length` on, in every layer."""

    def keep(self, positions: torch.Tensor) -> None:
        """Keep only the entries at `positions` (ascending), moved to the front in that order."""


class TreeCache(DynamicCache):
    """transformers' DynamicCache with full-length layers, sliding-window layers included: tree entries
    must stay addressable until the accepted path is known, and transformers' rolling layer
    (DynamicSlidingWindowLayer) drops the oldest entries on every update, ones a node's prefix may
    still need. The window is applied by the mask instead (edgespec/core/attention.py).

    Cost: a sliding layer holds the whole context instead of its last `window - 1` entries. For
    Gemma 3 27B (62 layers, 52 sliding with window 1024; 16 KV heads x 128 dims, bf16: 8 KiB per
    token per layer, K and V) at a 32k context that is 15.5 GiB instead of 2.9 GiB; for gpt-oss-120b
    (36 layers, 18 sliding with window 128; 8 x 64 dims: 2 KiB) 2.25 GiB instead of 1.13 GiB.
    It can be trimmed later: after each step, a sliding layer only needs the entries at positions
    >= (committed length - window), so `keep` could drop older ones per layer and keep a per-layer
    position offset for the masks (`forward.hidden_states`' kv_positions)."""

    n_layers = 0  # the decoder layers it serves (0: unknown), so a layer never reached counts as empty

    def _filled(self):
        return [layer for layer in self.layers if getattr(layer, "keys", None) is not None and layer.keys.numel()]

    def layer_lengths(self) -> list[int]:
        """Entries per layer: a layer's keys and values may differ (and a layer may be missing) after
        a forward or a `keep` cut short, so each counts what both hold."""
        held = [min(_rows(getattr(layer, "keys", None)), _rows(getattr(layer, "values", None)))
                for layer in self.layers]
        return held + [0] * (self.n_layers - len(held))

    def crop_to(self, length: int) -> None:
        for layer in self._filled():
            if layer.keys.shape[-2] > length:
                layer.keys = layer.keys[..., :length, :].contiguous()
            if layer.values is not None and layer.values.shape[-2] > length:
                layer.values = layer.values[..., :length, :].contiguous()

    def keep(self, positions: torch.Tensor) -> None:
        moved: dict = {}  # one copy of the positions per device, not one per layer (each a host-device copy)
        for layer in self._filled():
            idx = moved.get(layer.keys.device)
            if idx is None:
                idx = moved[layer.keys.device] = positions.to(layer.keys.device)
            layer.keys = layer.keys.index_select(-2, idx)
            layer.values = layer.values.index_select(-2, idx)


def _rows(t: torch.Tensor | None) -> int:
    return t.shape[-2] if t is not None and t.dim() >= 2 else 0


def new_cache(model) -> TreeCache:
    """The target's cache (and a drafter's, off the lean static path: `DraftRunner.new_cache`)."""
    cache = TreeCache()
    if model is not None:
        cache.n_layers = int(getattr(model.config.get_text_config(decoder=True), "num_hidden_layers", 0) or 0)
    return cache


def cache_len(cache: KVCache | None) -> int:
    return cache.get_seq_length() if cache is not None else 0


def prune_to_path(cache: KVCache, prefix: int, path_pos: list[int]) -> None:
    """Keep positions [0, prefix) plus the accepted tree entries at `path_pos` (absolute positions)."""
    keep = torch.cat([torch.arange(prefix), torch.tensor(path_pos, dtype=torch.long)])
    if keep.numel() == cache_len(cache) and torch.equal(keep, torch.arange(keep.numel())):
        return  # the accepted path is already contiguous after the prefix
    cache.keep(keep)
