"""What every scheduler shares: the two models, the memory bound and the stats bookkeeping."""
from __future__ import annotations

from collections import deque
from statistics import median_low
from typing import Protocol, runtime_checkable

from edgespec.base.errors import InvalidArgumentError
from edgespec.scheduler.acceptance import AcceptanceModel
from edgespec.scheduler.cost import CostModel
from edgespec.scheduler.tracker import Tracker
from edgespec.base.stats import Plan, StepStats


@runtime_checkable
class Scheduler(Protocol):
    """What the engine asks of a scheduler, per step: a plan, then the step's outcome."""

    def plan(self, context_room: int) -> Plan:
        """The next step's plan, for a context with `context_room` positions left."""

    def observe(self, step: StepStats) -> None:
        """Learn from the finished step."""

    def set_max_budget(self, n: int | None) -> None:
        """Never plan more than n draft tokens (after an out-of-memory back-off)."""

    def stats(self) -> dict:
        """For the API, chat's /stats and the server's /metrics."""

    def no_tree_reason(self) -> str | None:
        """One line saying why it decodes without a tree, when it has settled on that (else None)."""


class BaseScheduler:
    """Learns costs and acceptance from every step; subclasses decide `plan()`."""

    mode = "base"

    def __init__(self, cost: CostModel | None = None, acceptance: AcceptanceModel | None = None,
                 max_budget: int | None = None, max_depth: int = 32, branch: int = 16, batch: int = 64):
        if max_depth < 1 or branch < 1 or batch < 1:
            raise InvalidArgumentError(
                f"max_depth, branch and batch must be >= 1, got {max_depth}, {branch}, {batch}")
        self.cost = cost or CostModel()
        self.acceptance = acceptance or AcceptanceModel(max_depth=max_depth)
        self.max_budget = _check_bound(max_budget)
        self.max_depth, self.branch, self.batch = max_depth, branch, batch
        self.tracker = Tracker()
        self._stems: deque[int] = deque([1], maxlen=5)  # recent pending-stem lengths

    @property
    def pending(self) -> int:
        """Typical stem tokens in a pass besides the tree (the root, plus any catch-up)."""
        return max(1, int(median_low(self._stems)))

    def set_max_budget(self, n: int | None) -> None:
        """Cap future budgets (the engine lowers it after an out-of-memory back-off)."""
        self.max_budget = _check_bound(n)

    def bound(self, context_room: int) -> int:
        """The largest budget allowed now: memory bound and context room."""
        room = max(0, int(context_room))
        return room if self.max_budget is None else min(room, self.max_budget)

    def predict(self, k: int, depth: int | None = None) -> tuple[float | None, float | None]:
        """(expected tokens committed, predicted step seconds) for budget k; None where unknown."""
        expected = float(self.acceptance.expected([k])[0])
        if depth is not None:
            expected = min(expected, 1.0 + depth)
        time = self.cost.step_time(k, self.pending) if self.cost.ready else None
        return expected, time

    def make_plan(self, budget: int, context_room: int, expected=None, time=None) -> Plan:
        depth = max(1, min(self.max_depth, int(context_room)))
        self.tracker.planned(budget, expected, time)
        return Plan(budget, depth, self.branch, self.batch)

    def plan(self, context_room: int) -> Plan:
        raise NotImplementedError

    def observe(self, step: StepStats) -> None:
        """Learn from one finished step."""
        self._stems.append(max(1, step.verify_tokens - step.tree_size))
        self.cost.observe(step)
        self.acceptance.observe(step)
        self.tracker.observed(step)

    def no_tree_reason(self) -> str | None:
        return None

    def stats(self) -> dict:
        """For the API and CLI: the chosen budget, predictions next to outcomes, tokens/s."""
        last = self.tracker.pending or (self.tracker.records[-1] if self.tracker.records else None)
        out = {"mode": self.mode, "budget": last.budget if last else None, "max_budget": self.max_budget}
        out.update(self.tracker.summary())
        out["acceptance"] = self.acceptance.state()
        out["pending"] = self.pending
        return out


def _check_bound(n: int | None) -> int | None:
    if n is None:
        return None
    if int(n) < 0:
        raise InvalidArgumentError(f"max_budget must be >= 0, got {n}")
    return int(n)
