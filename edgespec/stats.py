"""Per-step records that flow from the engine to the scheduler, the API and the CLI."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Plan:
    """What the scheduler asks the drafter to build for one step."""

    budget: int  # tree nodes, root excluded (0 = plain autoregressive step)
    max_depth: int = 32
    branch: int = 16  # children proposed per expanded node
    batch: int = 64  # nodes expanded per drafter forward


@dataclass
class StepStats:
    """What happened in one draft → verify → accept step."""

    budget: int  # budget requested by the plan
    tree_size: int  # draft nodes verified (root excluded)
    tree_depth: int
    accepted: int  # tokens committed this step (accepted draft nodes + the target's own token)
    draft_time: float  # seconds spent building the tree
    verify_time: float  # seconds for the target pass (streaming included)
    verify_tokens: int  # tokens in the target pass (pending stem + tree)
    # Draft path probabilities of the tree's nodes, sorted descending. Their prefix sums are the
    # drafter's own estimate of accepted draft tokens for every smaller budget (the top-K sets nest).
    node_probs: list[float] = field(default_factory=list)
    retries: int = 0  # out-of-memory back-offs taken in this step
    reused: int = 0  # draft nodes carried over from the previous step's search (already drafted)
    overlap_time: float = 0.0  # drafting done while the target pass ran (off the critical path)
    # the rest of the step: pruning caches, re-rooting the search, planning, detokenizing
    overhead_time: float = 0.0

    @property
    def step_time(self) -> float:
        return self.draft_time + self.verify_time + self.overhead_time


@dataclass
class RunStats:
    """Aggregate over the steps of one generate() call."""

    steps: list[StepStats] = field(default_factory=list)
    new_tokens: int = 0
    prefill_time: float = 0.0
    wall_time: float = 0.0
    stop_reason: str = ""
    # calibrated tree scores after the run (edgespec/scores.py): {"top"|"other": [(draft p, hit rate, tests)]}
    hit_rates: dict | None = None
    sampling: str = ""  # the sampling settings in force, in words (SamplingConfig.describe)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_time if self.wall_time > 0 else 0.0

    @property
    def accepted_per_pass(self) -> float:
        n = len(self.steps)
        return sum(s.accepted for s in self.steps) / n if n else 0.0

    def summary(self) -> dict:
        steps = self.steps
        return {
            "new_tokens": self.new_tokens,
            "steps": len(steps),
            "accepted_per_pass": round(self.accepted_per_pass, 3),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "mean_tree_size": round(sum(s.tree_size for s in steps) / len(steps), 1) if steps else 0.0,
            "draft_time": round(sum(s.draft_time for s in steps), 4),
            "verify_time": round(sum(s.verify_time for s in steps), 4),
            "overhead_time": round(sum(s.overhead_time for s in steps), 4),
            "overlap_time": round(sum(s.overlap_time for s in steps), 4),
            "wall_time": round(self.wall_time, 4),
            "stop_reason": self.stop_reason,
            "sampling": self.sampling,
        }
