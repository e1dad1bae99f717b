"""KV-cache surgery on transformers' DynamicCache: new tree entries are appended by the forward,
then the cache is compacted to the accepted path, so accepted tokens are never recomputed."""
from __future__ import annotations

import torch
from transformers import DynamicCache

from edgespec import lean
from edgespec.static_cache import StaticCache


def new_cache(model) -> DynamicCache | StaticCache:
    """A full-attention cache: tree entries must stay addressable, so no sliding-window layers
    (the engine caps the context at the model's sliding window instead). A drafter on the lean
    static path (edgespec/lean.py) gets preallocated buffers its forwards can replay graphs over."""
    lean_forward = lean.lookup(model)
    if lean_forward is not None and lean_forward.static:
        return lean_forward.new_cache()
    return DynamicCache()


def cache_len(cache: DynamicCache) -> int:
    return cache.get_seq_length() if cache is not None else 0


def keep_positions(cache: DynamicCache, keep: torch.Tensor) -> None:
    """Keep only the cache entries at positions `keep` (ascending), in that order."""
    if isinstance(cache, StaticCache):
        return cache.keep(keep)
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        idx = keep.to(layer.keys.device)
        layer.keys = layer.keys.index_select(-2, idx)
        layer.values = layer.values.index_select(-2, idx)


def crop(cache: DynamicCache, length: int) -> None:
    """Drop every entry from position `length` on, layer by layer (layers may differ in length after
    a forward that failed half-way)."""
    if isinstance(cache, StaticCache):
        return cache.crop(length)
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.numel() and keys.shape[-2] > length:
            layer.keys = keys[..., :length, :].contiguous()
            layer.values = layer.values[..., :length, :].contiguous()


def prune_to_path(cache: DynamicCache, prefix: int, path_pos: list[int]) -> None:
    """Keep positions [0, prefix) plus the accepted tree entries at `path_pos` (absolute positions)."""
    keep = torch.cat([torch.arange(prefix), torch.tensor(path_pos, dtype=torch.long)])
    if keep.numel() == cache_len(cache) and torch.equal(keep, torch.arange(keep.numel())):
        return  # the accepted path is already contiguous after the prefix
    keep_positions(cache, keep)
