"""One conversation's state: the committed tokens and both models' KV caches.

The caches never hold more than len(ids) - 1 entries: the last committed token is always pending (the
next tree's root), and a step feeds the pending tokens ("stem") and the tree in one forward per model,
so a prompt's prefill rides along with the first verification pass and a new prompt that extends the
conversation (a chat turn) only pays for its new tokens. `search` is the subtree drafted under the
last token, which the next step may grow instead of starting afresh.
"""
from __future__ import annotations

from edgespec.core.kv import crop


class Conversation:
    def __init__(self, tcache, dcache):
        self.ids: list[int] = []
        self.tcache, self.dcache = tcache, dcache
        self.search = None  # draft.TreeSearch under the last token, reusable next step

    def sync(self, ids: list[int]) -> None:
        """Make `ids` the committed sequence, keeping the cached common prefix."""
        common = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            common += 1
        self.ids = list(ids)
        self.trim(min(common, len(ids) - 1))

    def keep(self, n: int) -> None:
        """Keep the first `n` committed tokens (and what the caches hold of them)."""
        self.ids = self.ids[:n]
        self.trim(max(n - 1, 0))

    def trim(self, length: int) -> None:
        """Drop cache entries from `length` on, and the drafted subtree."""
        self.search = None
        for cache in (self.tcache, self.dcache):
            if cache.get_seq_length() > length:
                crop(cache, length)

    def rollback(self, before: tuple[int, int]) -> None:
        """Back to the cache lengths `before` a step that failed half-way (nothing was committed)."""
        self.search = None
        crop(self.tcache, before[0])
        crop(self.dcache, min(before[1], len(self.ids) - 1))

    def lengths(self) -> tuple[int, int]:
        return self.tcache.get_seq_length(), self.dcache.get_seq_length()

    @property
    def pending(self) -> int:
        """Committed tokens the target has not seen yet (the next pass's stem)."""
        return len(self.ids) - self.tcache.get_seq_length()
