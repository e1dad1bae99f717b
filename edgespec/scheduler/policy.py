"""AutoScheduler: pick the tree budget that maximises expected tokens per second.

For each candidate budget K within min(max_budget, context_room):

    rate(K) = expected_accepted(K) / (draft_time(K) + pass_time(K + pending) + per-step overhead)

and the best K is planned. Until both cost curves hold a measurement, `initial_budget` is planned
instead (its step provides the first measurements). With probability `explore` the candidate
nearest half or twice the best is planned instead, so the cost curve keeps being measured in the
neighbouring buckets (the shape around the optimum is what decides it); from budget 0 (plain
steps, which teach nothing about drafting) the best non-zero budget is tried instead — rarely when
it is predicted far worse, since that step also pays the drafter's catch-up on every token it
missed. The draws come from a generator seeded with `seed`, so a run is reproducible.
"""
from __future__ import annotations

import random

import numpy as np

from edgespec.scheduler.acceptance import AcceptanceModel
from edgespec.scheduler.base import BaseScheduler
from edgespec.scheduler.cost import CostModel
from edgespec.base.stats import Plan

ZERO_MARGIN = 0.75  # from budget 0, explore a tree predicted at >= this fraction of the best rate...
ZERO_RARE = 0.1  # ...and one predicted worse only with this fraction of the exploration rate
DEFAULT_BUDGETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024,
                   1536, 2048)


class AutoScheduler(BaseScheduler):
    """Plans the budget with the best predicted tokens per second.

    cost: a CostModel (calibrated, cached or empty); acceptance: an AcceptanceModel (default: the
    prior); budgets: the candidate grid; max_budget: the memory bound (None = the grid's largest),
    never exceeded and lowered by `set_max_budget`; explore/seed: the exploration rate and its
    seed; initial_budget: planned while the cost model has no measurements.
    """

    mode = "auto"

    def __init__(self, cost: CostModel | None = None, acceptance: AcceptanceModel | None = None,
                 budgets=DEFAULT_BUDGETS, max_budget: int | None = None, max_depth: int = 32,
                 branch: int = 16, batch: int = 64, explore: float = 0.05, seed: int = 0,
                 initial_budget: int = 64):
        super().__init__(cost, acceptance, max_budget, max_depth, branch, batch)
        self.budgets = np.array(sorted({int(b) for b in budgets if int(b) >= 0} | {0}))
        self.explore, self.initial_budget = explore, initial_budget
        self.rng = random.Random(seed)
        self.explored = 0
        self.last_rates: dict[int, float] = {}

    def candidates(self, context_room: int) -> np.ndarray:
        """The grid within the current bound, plus the bound itself when it falls inside the grid."""
        cap = self.bound(context_room)
        ks = self.budgets[self.budgets <= cap]
        if cap < self.budgets[-1] and cap not in ks:
            ks = np.append(ks, cap)
        return ks

    def rates(self, ks: np.ndarray, depth: int) -> np.ndarray:
        """Expected tokens per second for each budget."""
        expected = np.minimum(self.acceptance.expected(ks), 1.0 + depth)
        times = np.array([self.cost.step_time(int(k), self.pending) for k in ks])
        return expected / np.maximum(times, 1e-12)

    def plan(self, context_room: int) -> Plan:
        ks = self.candidates(context_room)
        depth = max(1, min(self.max_depth, int(context_room)))
        if not self.cost.ready:
            k = min(self.initial_budget, int(ks[-1]))
        else:
            rates = self.rates(ks, depth)
            self.last_rates = {int(k): float(r) for k, r in zip(ks, rates)}
            k = int(ks[self._pick(ks, rates)])
        return self.make_plan(k, context_room, *self.predict(k, depth))

    def _pick(self, ks: np.ndarray, rates: np.ndarray) -> int:
        """Index of the budget to plan: the best, or now and then one an octave away."""
        best = int(np.argmax(rates))
        if self.explore <= 0 or len(ks) < 2 or self.rng.random() >= self.explore:
            return best
        if ks[best] == 0:  # a plain step teaches nothing about drafting: try the best real tree
            alt = 1 + int(np.argmax(rates[1:]))
            # ...but after plain steps the drafter must first catch up on every token it missed, so
            # when that tree is predicted far worse, explore it only rarely (bounded loss)
            if rates[alt] < ZERO_MARGIN * rates[best] and self.rng.random() >= ZERO_RARE:
                return best
            self.explored += 1
            return alt
        self.explored += 1
        target = ks[best] * self.rng.choice((0.5, 2.0))
        dist = np.abs(np.log2(np.maximum(ks, 0.5) / target))
        dist[best] = np.inf
        return int(np.argmin(dist))

    def no_tree_reason(self) -> str | None:
        """One line saying why the scheduler decodes without a tree, when its best budget is 0."""
        if not self.last_rates or max(self.last_rates, key=self.last_rates.get) != 0:
            return None
        ms = lambda s: f"{1e3 * s:.0f} ms"  # noqa: E731
        c = self.cost
        return (f"no speculation here: a target pass takes {ms(c.pass_time(1))} ({ms(c.pass_time(65))} with a "
                f"64-token tree) and drafting that tree {ms(c.draft_time(64))} (one drafter forward ~"
                f"{ms(c.draft_time(1))}), so a tree costs more than the tokens it saves and the scheduler decodes "
                "plainly. Trees pay when the target pass waits on the link: a GPU with the target streamed, "
                "or --link-delay 0.05 to emulate a slow link here.")

    def stats(self) -> dict:
        out = super().stats()
        reason = self.no_tree_reason()
        if reason:
            out["no_tree_reason"] = reason
        if self.last_rates:
            best = max(self.last_rates, key=self.last_rates.get)
            out["best_budget"] = best
            out["predicted_tokens_per_second"] = round(self.last_rates[best], 3)
        out["explored_steps"] = self.explored
        return out
