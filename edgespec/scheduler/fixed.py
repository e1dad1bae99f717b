"""FixedScheduler: the same budget every step (clipped to the context room and memory bound)."""
from __future__ import annotations

from edgespec.base.errors import InvalidArgumentError
from edgespec.scheduler.base import BaseScheduler
from edgespec.base.stats import Plan


class FixedScheduler(BaseScheduler):
    """Always plans `budget` nodes; still learns costs and acceptance so stats() can compare."""

    mode = "fixed"

    def __init__(self, budget: int, max_depth: int = 32, branch: int = 16, batch: int = 64, **kwargs):
        if int(budget) < 0:
            raise InvalidArgumentError(f"budget must be >= 0 or 'auto', got {budget}")
        super().__init__(max_depth=max_depth, branch=branch, batch=batch, **kwargs)
        self.budget = int(budget)

    def plan(self, context_room: int) -> Plan:
        k = min(self.budget, self.bound(context_room))
        return self.make_plan(k, context_room, *self.predict(k))
