"""Tree-budget schedulers: how many draft nodes the next target pass should verify.

The engine calls, per step::

    plan = scheduler.plan(context_room=room)   # Plan(budget, max_depth, branch, batch)
    ...  draft with plan, verify  ...
    scheduler.observe(step_stats)

and reads `scheduler.stats()`. `FixedScheduler` always asks for the same budget; `AutoScheduler`
maximises expected accepted tokens per second from an online `CostModel` (pass and draft times)
and `AcceptanceModel` (the drafter's own acceptance curve, calibrated against outcomes).
"""
from __future__ import annotations

from typing import Callable, Iterable

from edgespec.base.errors import InvalidArgumentError
from edgespec.scheduler.acceptance import AcceptanceModel
from edgespec.scheduler.base import BaseScheduler, Scheduler
from edgespec.scheduler.cost import CALIBRATION_SIZES, CostModel, default_cache_path, machine_key
from edgespec.scheduler.curve import Curve
from edgespec.scheduler.fixed import FixedScheduler
from edgespec.scheduler.policy import DEFAULT_BUDGETS, AutoScheduler

__all__ = [
    "AcceptanceModel", "AutoScheduler", "BaseScheduler", "Scheduler", "CostModel", "Curve", "FixedScheduler",
    "DEFAULT_BUDGETS", "CALIBRATION_SIZES", "default_cache_path", "machine_key", "make_scheduler",
]


def make_scheduler(budget="auto", *, max_depth: int = 32, branch: int = 16, batch: int = 64,
                   max_budget: int | None = None, cost: CostModel | None = None,
                   cache_key: str | None = None, measure_fn: Callable[[int], float] | None = None,
                   sizes: Iterable[int] = CALIBRATION_SIZES, draft_fn: Callable[[int], float] | None = None,
                   cache_path=None, **auto_kwargs) -> BaseScheduler:
    """`budget="auto"` → AutoScheduler; an int (or digit string) → FixedScheduler.

    For "auto", the cost model is `cost` if given, else the cached calibration for `cache_key`
    (measured with `measure_fn(n) -> seconds` per pass size and `draft_fn(k) -> seconds` per draft
    budget on a cache miss), else an empty model learnt online.
    Extra keyword arguments (explore, seed, budgets, initial_budget) go to AutoScheduler.
    """
    if isinstance(budget, str) and budget.strip().lower() == "auto":
        if cost is None and cache_key and measure_fn:
            cost = CostModel.load_or_calibrate(cache_path, cache_key, measure_fn, sizes, draft_fn)
        return AutoScheduler(cost, max_budget=max_budget, max_depth=max_depth, branch=branch,
                             batch=batch, **auto_kwargs)
    try:
        k = int(budget)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"budget must be 'auto' or a non-negative integer, got {budget!r}") from None
    if isinstance(budget, float) and budget != k or isinstance(budget, bool):
        raise InvalidArgumentError(f"budget must be 'auto' or a non-negative integer, got {budget!r}")
    return FixedScheduler(k, max_depth, branch, batch, cost=cost, max_budget=max_budget)
