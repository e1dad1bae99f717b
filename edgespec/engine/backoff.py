"""Out of device memory in a step: the step is rolled back (Conversation.rollback) and retried with half
the tree, the scheduler capped there, an eighth of the target's resident layers moved to streaming,
and a BackoffWarning saying so. The output is the same as without the failure."""
from __future__ import annotations

import warnings

import torch

from edgespec.base.device import empty_cache
from edgespec.base.errors import BackoffWarning, OutOfMemoryError
from edgespec.base.stats import Plan

OOM_ERRORS = (torch.cuda.OutOfMemoryError,)


def back_off(plan: Plan, scheduler, offload) -> Plan:
    """The smaller plan to retry with (after lowering the scheduler's bound and streaming more layers)."""
    smaller = Plan(plan.budget // 2, plan.max_depth, plan.branch, max(1, plan.batch // 2))
    scheduler.set_max_budget(smaller.budget)
    moved = offload.demote(max(1, offload.resident_layers // 8)) if offload is not None else 0
    empty_cache()
    layers = f", {moved} fewer resident target layers" if moved else ""
    warnings.warn(f"edgespec: out of device memory; retrying the step with a tree of {smaller.budget}{layers}",
                  BackoffWarning, stacklevel=5)
    return smaller


def out_of_memory() -> OutOfMemoryError:
    """What a step that fails even without a tree raises."""
    return OutOfMemoryError("Out of device memory even for a single-token step: free GPU memory, keep fewer "
                            "layers resident, or use a smaller drafter.")
