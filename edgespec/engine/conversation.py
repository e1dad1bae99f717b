"""One conversation's state: the committed tokens, both models' KV caches, and the drafted subtree.

The target's cache never holds more than len(ids) - 1 entries (nor the drafter's, but for the entries
of a kept drafted subtree): the last committed token is always pending (the
next tree's root), and a step feeds the pending tokens ("stem") and the tree in one forward per model,
so a prompt's prefill rides along with the first verification pass and a new prompt that extends the
conversation (a chat turn) only pays for its new tokens. `search` is the subtree drafted under the
last token, which the next step may grow instead of starting afresh.

The conversation owns every change to that state: `commit` takes a step's outcome (both caches pruned
to the accepted path, the ids extended, the re-rooted search kept) all at once; `sync`, `keep`, `trim`
and `rollback` move it back to a prefix of itself. A step cut short at any instant (an exception, or
Ctrl-C inside a forward, a pruning or a trim) may leave the caches' layers at different lengths or
past the committed tokens; `check` (run before every step and by every trim) crops them back to a
consistent prefix, which the next step's pending tokens complete: the state is then the one before
the step, or after it, never between.
"""
from __future__ import annotations

import torch

from edgespec.base.device import on_stream
from edgespec.core.kv import KVCache, prune_to_path


class Conversation:
    def __init__(self, tcache: KVCache, dcache: KVCache):
        self.ids: list[int] = []
        self.tcache, self.dcache = tcache, dcache
        self.search = None  # core.search.TreeSearch under the last token, reusable next step

    def commit(self, tokens: list[int], path: list[int], search=None, draft_keep: list[int] | None = None,
               draft_stream=None) -> None:
        """A verified step: the target's cache keeps the pending tokens it just saw plus the entries of the
        accepted tree nodes `path` (indices into the tree, root excluded), the drafter's cache keeps `draft_keep` (its
        entries the committed tokens and `search` need, from `TreeSearch.reroot`; None: as it is), `search`
        (the re-rooted search, or None) is kept for the next step, and the committed `tokens` (accepted,
        then the target's own) extend the ids. The drafter's cache is compacted on `draft_stream`, where
        it was written."""
        root = len(self.ids)  # entries up to and including the root; tree node j sits at root - 1 + j
        prune_to_path(self.tcache, root, [root - 1 + j for j in path])
        if draft_keep is not None and draft_keep != list(range(self.dcache.get_seq_length())):
            with on_stream(draft_stream):
                self.dcache.keep(torch.tensor(draft_keep, dtype=torch.long))
        self.search = search
        self.ids.extend(tokens)

    def take_search(self):
        """The drafted subtree under the last token, handed to the step that grows it (None: none)."""
        search, self.search = self.search, None
        return search

    def sync(self, ids: list[int]) -> None:
        """Make `ids` the committed sequence, keeping the cached common prefix."""
        common = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            common += 1
        self.trim(min(common, len(ids) - 1))  # first: cut short, the caches still hold a prefix of self.ids
        self.ids = list(ids)

    def keep(self, n: int) -> None:
        """Keep the first `n` committed tokens (and what the caches hold of them)."""
        self.ids = self.ids[:n]
        self.trim(max(n - 1, 0))

    def trim(self, length: int) -> None:
        """Drop cache entries from `length` on (every layer of both caches ends at the same length, at
        most `length`: layers a cut-short forward left shorter pull the others down to them), and the
        drafted subtree."""
        self.search = None
        for cache in (self.tcache, self.dcache):
            _even_out(cache, length)

    def rollback(self, before: tuple[int, int]) -> None:
        """Back to the cache lengths `before` a step that failed half-way (nothing was committed)."""
        self.search = None
        _even_out(self.tcache, before[0])
        _even_out(self.dcache, min(before[1], len(self.ids) - 1))

    def check(self) -> bool:
        """Make the invariant hold again if a step, a pruning or a trim was cut short (an exception or
        Ctrl-C at any instant): every layer of both caches the same length, the target's at most
        len(ids) - 1, the drafter's too unless a kept search holds its entries past that (its root at
        len(ids) - 1, the cache ending at its last fed node). Entries before len(ids) - 1 are never
        rewritten in place, so cropping every layer to the shortest (at most len(ids) - 1) leaves a
        prefix the next step's pending tokens complete. True when it had to repair anything."""
        limit = max(len(self.ids) - 1, 0)
        repaired = _even_out(self.tcache, limit)
        if self.search is not None and not self._search_fits(limit):
            self.search = None
        if self.search is None:
            repaired = _even_out(self.dcache, limit) or repaired
        return repaired

    def _search_fits(self, limit: int) -> bool:
        lengths = self.dcache.layer_lengths()
        fed = int(self.search.fed.max()) + 1
        return self.search.root_pos == limit and all(n == fed for n in lengths)

    def lengths(self) -> tuple[int, int]:
        return self.tcache.get_seq_length(), self.dcache.get_seq_length()

    @property
    def pending(self) -> int:
        """Committed tokens the target has not seen yet (the next pass's stem)."""
        return len(self.ids) - self.tcache.get_seq_length()


def _even_out(cache: KVCache, length: int) -> bool:
    """Crop every layer of `cache` to the shortest layer's length, or `length` if less; True when
    anything was cropped."""
    lengths = cache.layer_lengths()
    end = min([max(length, 0), *lengths])
    cache.crop_to(end)  # (also a layer whose keys outran its values: it counts the shorter)
    return bool(lengths) and max(lengths) > end
