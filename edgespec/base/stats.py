"""Per-step records that flow from the engine to the scheduler, the API and the CLI."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# The named parts of a step's rest (its time outside drafting before the pass and the pass itself):
# planning and the memory query, the drafter's graph (re)capture, pruning both caches, re-rooting the
# search, the scheduler's (and the score calibration's) observation, detokenising and stop strings, and
# whatever falls between them.
REST_PARTS = ("plan", "capture", "prune", "reroot", "observe", "text", "other")


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
    # tokens committed this step (accepted draft nodes + the target's own token); in a RunStats, the tokens
    # the answer kept of them (none past its end of sequence, stop string or token limit)
    accepted: int
    draft_time: float  # seconds spent building the tree
    verify_time: float  # seconds for the target pass (streaming included)
    verify_tokens: int  # tokens in the target pass (pending stem + tree)
    # Draft path probabilities of the tree's nodes, sorted descending. Their prefix sums are the
    # drafter's own estimate of accepted draft tokens for every smaller budget (the top-K sets nest).
    node_probs: list[float] = field(default_factory=list)
    # the same for the search the tree came from (a superset: its slack candidates and what it grew during
    # the pass): the acceptance curve past the tree's size, measured instead of extrapolated (empty: none)
    search_probs: list[float] = field(default_factory=list)
    retries: int = 0  # out-of-memory back-offs taken in this step
    reused: int = 0  # draft nodes carried over from the previous step's search (already drafted)
    overlap_time: float = 0.0  # drafting done while the target pass ran (off the critical path)
    # the rest of the step: its total, and that total split into the REST_PARTS (seconds each)
    overhead_time: float = 0.0
    rest: dict[str, float] = field(default_factory=dict)
    draft_forwards: int = 0  # drafter forwards this step ran before the pass
    draft_fed: int = 0  # tokens those forwards fed (the stem's catch-up included)
    # the accepted draft nodes' ranks by score in the tree (0 = best), in path order: what every smaller
    # top-k tree (they nest) would have accepted; None: not recorded
    path_ranks: list[int] | None = None

    @property
    def step_time(self) -> float:
        return self.draft_time + self.verify_time + self.overhead_time


@dataclass
class RunStats:
    """Aggregate over the steps of one generate() call."""

    steps: list[StepStats] = field(default_factory=list)
    new_tokens: int = 0
    prefill_time: float = 0.0  # seconds of the first step: it takes the prompt's uncached tokens in (with a tree)
    wall_time: float = 0.0
    stop_reason: str = ""
    # calibrated tree scores after the run (edgespec/core/scores.py): {"top"|"other": [(draft p, hit rate, tests)]}
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
        return {**Totals.of([self]).as_dict(), "stop_reason": self.stop_reason, "sampling": self.sampling}


@dataclass
class Totals:
    """Counters over the steps of one or more generations (an answer, a chat session, a benchmark row):
    the one place per-step stats are summed. `line()` says them in words, `as_dict()` as numbers."""

    answers: int = 0
    new_tokens: int = 0
    wall_time: float = 0.0
    steps: int = 0
    accepted: int = 0  # tokens committed by the steps (accepted draft tokens + the target's own)
    budget: int = 0
    tree_tokens: int = 0
    tree_depth: int = 0
    draft_time: float = 0.0
    verify_time: float = 0.0
    overhead_time: float = 0.0
    overlap_time: float = 0.0
    rest: dict[str, float] = field(default_factory=lambda: dict.fromkeys(REST_PARTS, 0.0))
    histogram: Counter = field(default_factory=Counter)  # steps by tokens committed

    @classmethod
    def of(cls, runs) -> "Totals":
        totals = cls()
        for run in runs:
            totals.add(run)
        return totals

    def add(self, run: RunStats) -> "Totals":
        self.answers += 1
        self.new_tokens += run.new_tokens
        self.wall_time += run.wall_time
        for s in run.steps:
            self.steps += 1
            self.accepted += s.accepted
            self.budget += s.budget
            self.tree_tokens += s.tree_size
            self.tree_depth += s.tree_depth
            self.draft_time += s.draft_time
            self.verify_time += s.verify_time
            self.overhead_time += s.overhead_time
            self.overlap_time += s.overlap_time
            for name, seconds in s.rest.items():
                self.rest[name] = self.rest.get(name, 0.0) + seconds
            self.histogram[s.accepted] += 1
        return self

    def _mean(self, total: float) -> float:
        return total / self.steps if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_time if self.wall_time > 0 else 0.0

    @property
    def accepted_per_pass(self) -> float:
        return self._mean(self.accepted)

    @property
    def tokens_per_pass(self) -> float:
        """New tokens per target pass (the answers' tokens: a step cut by a stop counts what was kept)."""
        return self._mean(self.new_tokens)

    def as_dict(self) -> dict:
        return {
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "accepted_per_pass": round(self.accepted_per_pass, 3),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "mean_budget": round(self._mean(self.budget), 1),
            "mean_tree_size": round(self._mean(self.tree_tokens), 1),
            "mean_tree_depth": round(self._mean(self.tree_depth), 2),
            "draft_time": round(self.draft_time, 4),
            "verify_time": round(self.verify_time, 4),
            "overhead_time": round(self.overhead_time, 4),
            "overlap_time": round(self.overlap_time, 4),
            "rest": {name: round(seconds, 4) for name, seconds in self.rest.items()},
            "wall_time": round(self.wall_time, 4),
            "accepted_histogram": {str(k): self.histogram[k] for k in sorted(self.histogram)},
        }

    def line(self) -> str:
        """E.g. "120 tokens in 9.80 s (12.24 tokens/s), 30 steps, 4.00 accepted/pass, budget 64"."""
        return (f"{self.new_tokens} tokens in {self.wall_time:.2f} s ({self.tokens_per_second:.2f} tokens/s), "
                f"{self.steps} steps, {self.accepted_per_pass:.2f} accepted/pass, budget {self._mean(self.budget):.0f}")
