"""Whose seconds the scheduler and the benchmarks see: the wall clock's, or a cost file's replayed.

Every time a step records (drafting before the pass, the pass, the rest), the overlap's drafting
during the pass, the scheduler's start-up calibration and a run's wall time go through a `Clock`, handed
down explicitly from the engine (`Engine(..., clock=)`). `WallClock` passes the measured seconds
through. `ReplayClock` charges what a cost file (edgespec/base/costs.py) says the same work costs on
the machine that measured it, while the real models still run here and decide every token: the
scheduler's behaviour on a GPU can be reproduced, tested and tuned on a CPU, and the replayed time
does not depend on how busy this machine is.
"""
from __future__ import annotations

from typing import Protocol

from edgespec.base.costs import Costs


class Clock(Protocol):
    replay: bool  # True: the charged seconds do not come from this machine's wall time

    def draft(self, measured: float, forwards: int, fed: int) -> float:
        """Seconds charged for drafting: `forwards` drafter forwards feeding `fed` tokens."""

    def verify(self, measured: float, tokens: int) -> float:
        """Seconds charged for a target pass over `tokens` tokens."""

    def rest(self, measured: float) -> float:
        """Seconds charged for a step's rest."""

    def run_time(self, measured: float, steps) -> float:
        """Seconds charged for a whole generation made of `steps` (base.stats.StepStats)."""


class WallClock:
    """This machine's seconds, as measured."""

    replay = False

    def draft(self, measured: float, forwards: int, fed: int) -> float:
        return measured

    def verify(self, measured: float, tokens: int) -> float:
        return measured

    def rest(self, measured: float) -> float:
        return measured

    def run_time(self, measured: float, steps) -> float:
        return measured

    def describe(self) -> str:
        return "wall clock"


class ReplayClock:
    """The seconds `costs` (a base.costs.Costs, or a cost file's path) says the work takes there."""

    replay = True

    def __init__(self, costs: "Costs | str"):
        self.costs = costs if isinstance(costs, Costs) else Costs.load(costs)
        self.path = None if isinstance(costs, Costs) else str(costs)

    def draft(self, measured: float, forwards: int, fed: int) -> float:
        return self.costs.draft_time(forwards, fed)

    def verify(self, measured: float, tokens: int) -> float:
        return self.costs.pass_time(tokens)

    def rest(self, measured: float) -> float:
        return self.costs.rest

    def run_time(self, measured: float, steps) -> float:
        return sum(s.step_time for s in steps)

    def replay_steps(self, steps) -> float:
        """The seconds these recorded steps (measured by any clock) would take under the costs."""
        return sum(self.draft(0.0, s.draft_forwards, s.draft_fed) + self.verify(0.0, s.verify_tokens)
                   + self.rest(0.0) for s in steps)

    def describe(self) -> str:
        return f"replayed costs ({self.path or 'given'}{': ' + self.costs.source if self.costs.source else ''})"
