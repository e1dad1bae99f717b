"""KV-cache surgery on transformers' DynamicCache: new tree entries are appended by the forward,
then the cache is compacted to the accepted path, so accepted tokens are never recomputed."""
from __future__ import annotations

import torch
from transformers import DynamicCache

from edgespec.core.static_kv import StaticCache


class KVSurgery:
    """A cache that does its own surgery (`keep`, `crop`, `get_seq_length`): a pipeline's staged cache,
    whose entries live on several machines (edgespec/distributed/target.py)."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise NotImplementedError

    def keep(self, keep: torch.Tensor) -> None:
        raise NotImplementedError

    def crop(self, length: int) -> None:
        raise NotImplementedError


def new_cache(model) -> DynamicCache | StaticCache:
    """A cache of full-length layers, sliding-window layers included: tree entries must stay
    addressable until the accepted path is known, and transformers' rolling layer
    (DynamicSlidingWindowLayer) drops the oldest entries on every update, ones a node's prefix may
    still need. The window is applied by the mask instead (edgespec/core/attention.py).

    Cost: a sliding layer holds the whole context instead of its last `window - 1` entries. For
    Gemma 3 27B (62 layers, 52 sliding with window 1024; 16 KV heads x 128 dims, bf16: 8 KiB per
    token per layer, K and V) at a 32k context that is 15.5 GiB instead of 2.9 GiB; for gpt-oss-120b
    (36 layers, 18 sliding with window 128; 8 x 64 dims: 2 KiB) 2.25 GiB instead of 1.13 GiB.
    It can be trimmed later: after each step, a sliding layer only needs the entries at positions
    >= (committed length - window), so `prune_to_path` could drop older ones per layer and keep a
    per-layer position offset for the masks (`forward.hidden_states`' kv_positions).
    A drafter on the lean static path has preallocated buffers instead (Drafter.new_cache)."""
    return DynamicCache()


def cache_len(cache: DynamicCache) -> int:
    return cache.get_seq_length() if cache is not None else 0


def keep_positions(cache: DynamicCache, keep: torch.Tensor) -> None:
    """Keep only the cache entries at positions `keep` (ascending), in that order."""
    if isinstance(cache, (StaticCache, KVSurgery)):
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
    if isinstance(cache, (StaticCache, KVSurgery)):
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
