"""Bookkeeping for `scheduler.stats()`: each plan's predictions next to what the step measured."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from edgespec.base.stats import StepStats


@dataclass
class Record:
    budget: int
    expected_accepted: float | None
    predicted_time: float | None
    accepted: int | None = None
    step_time: float | None = None


class Tracker:
    """Keeps the last `window` (prediction, outcome) pairs and totals over the whole run."""

    def __init__(self, window: int = 32):
        self.records: deque[Record] = deque(maxlen=window)
        self.pending: Record | None = None
        self.steps = 0
        self.tokens = 0
        self.seconds = 0.0

    def planned(self, budget: int, expected_accepted: float | None, predicted_time: float | None) -> None:
        self.pending = Record(budget, expected_accepted, predicted_time)

    def observed(self, step: StepStats) -> None:
        rec = self.pending if self.pending and self.pending.budget == step.budget else None
        rec = rec or Record(step.budget, None, None)  # e.g. the engine backed off after OOM
        rec.accepted, rec.step_time = step.accepted, step.step_time
        self.records.append(rec)
        self.pending = None
        self.steps += 1
        self.tokens += step.accepted
        self.seconds += step.step_time

    def summary(self) -> dict:
        """Last step and recent means: expected vs actual acceptance, predicted vs actual time."""
        recs = list(self.records)
        last = recs[-1] if recs else None
        paired = [r for r in recs if r.expected_accepted is not None]
        return {
            "steps": self.steps,
            "expected_accepted": _round(last.expected_accepted if last else None),
            "actual_accepted": last.accepted if last else None,
            "predicted_step_time": _round(last.predicted_time if last else None, 5),
            "actual_step_time": _round(last.step_time if last else None, 5),
            "mean_expected_accepted": _round(_mean([r.expected_accepted for r in paired])),
            "mean_actual_accepted": _round(_mean([r.accepted for r in paired])),
            "mean_predicted_step_time": _round(_mean([r.predicted_time for r in paired]), 5),
            "mean_actual_step_time": _round(_mean([r.step_time for r in paired]), 5),
            "tokens_per_second": _round(self.tokens / self.seconds if self.seconds > 0 else None),
            "recent_tokens_per_second": _round(_rate(recs)),
        }


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _rate(recs) -> float | None:
    t = sum(r.step_time or 0.0 for r in recs)
    return sum(r.accepted or 0 for r in recs) / t if t > 0 else None


def _round(x, nd: int = 3):
    return None if x is None else round(float(x), nd)
