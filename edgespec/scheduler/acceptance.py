"""Acceptance model: expected tokens committed per step as a function of the tree budget K.

expected(K) = 1 + factor · c(K), where

* c(K) is the drafter's own estimate of accepted draft tokens: the prefix sum of the sorted
  path probabilities of the best K nodes (the best-first top-K sets nest, so one tree gives the
  whole curve up to its size; the search it came from, holding more candidates and what it grew
  during the pass, gives it further: a small tree's step still measures the curve of bigger ones). Curves of the last `window` trees are averaged, the newest weighing
  most (`decay` per step back). Beyond a tree's size the curve continues as a + b·ln K, fitted on
  the tree's upper half (a conservative, slowly growing tail that new, bigger trees then correct).
* factor calibrates the drafter against reality: the moving average of accepted draft tokens over
  that of what the drafter predicted for the same trees, clipped to `clip`. It starts at 1 (worth
  `prior_steps` steps), averages evenly at first and then by an EMA of weight `alpha`: acceptance
  is noisy step to step, and the drafter's own curve already follows prompt changes at once.
* where steps record the accepted nodes' ranks (`StepStats.path_ranks`), the factor is measured per
  tree size: a tree's top-k nodes are the tree a budget of k would have drafted, so one step says what
  every smaller budget would have accepted (observed and predicted per power-of-two k, the same
  averages per k, each starting from the factor over all trees and leaning on it while it has seen
  few trees: worth `prior_steps` of them), and factor(K) interpolates them in log K (flat past the
  largest measured). The drafter's curve has the wrong shape on real text (its best 16 nodes were
  predicted 1.5x what they accepted while 256-node trees were predicted right: one factor made small
  trees look good); but sizes auto rarely drafts must not stay at "the drafter is right" where the
  drafter under-rates itself (benchmarks/scheduler_cpu.md, last section).
* the 1 is the target's own (bonus) token, committed on every step.

Accepted draft tokens never exceed min(K, max_depth). With no tree seen yet the prior is
c(K) = prior_scale · log2(1 + K), about 0.7 tokens for K = 1 and 7 for K = 1024: what a decent
drafter achieves on ordinary text.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from edgespec.base.stats import StepStats


class AcceptanceModel:
    """expected(ks): tokens committed per step for each budget; observe(step) learns from a step."""

    def __init__(self, window: int = 4, decay: float = 0.5, alpha: float = 0.05, clip=(0.1, 3.0),
                 prior_scale: float = 0.7, max_depth: int = 32, prior_steps: int = 4):
        self.window, self.decay, self.alpha, self.clip = window, decay, alpha, clip
        self.prior_steps = prior_steps  # the prior factor 1 counts as this many steps
        self.steps = 0
        self.prior_scale, self.max_depth = prior_scale, max_depth
        self.curves: deque[np.ndarray] = deque(maxlen=window)  # prefix sums, newest last
        self._num = self._den = 0.0  # EMAs of observed / predicted accepted draft tokens
        self._sizes: dict[int, list[float]] = {}  # top-k size -> [observed EMA, predicted EMA, steps]

    @property
    def factor(self) -> float:
        """Observed over drafter-predicted accepted draft tokens (1 before any evidence)."""
        if self._den <= 0:
            return 1.0
        return float(np.clip(self._num / self._den, *self.clip))

    def drafter_curve(self, ks) -> np.ndarray:
        """c(K) for each K in ks: the drafter's uncalibrated estimate of accepted draft tokens."""
        ks = np.asarray(ks, dtype=float)
        if not self.curves:
            c = self.prior_scale * np.log2(1 + np.maximum(ks, 0))
        else:
            weights = self.decay ** np.arange(len(self.curves))[::-1]
            c = sum(w * _evaluate(cs, ks) for w, cs in zip(weights, self.curves)) / weights.sum()
        return np.minimum(c, np.minimum(np.maximum(ks, 0), self.max_depth))

    def expected(self, ks) -> np.ndarray:
        """Expected tokens committed per step (accepted draft tokens + 1) for each budget in ks."""
        ks = np.asarray(ks, dtype=float)
        draft = np.minimum(self.factors(ks) * self.drafter_curve(ks), np.minimum(ks, self.max_depth))
        return 1.0 + np.maximum(draft, 0.0)

    def observe(self, step: StepStats) -> None:
        """Learn the newest tree's curve and how well the drafter predicted its acceptance."""
        if step.tree_size <= 0 or not step.node_probs:
            return  # a plain autoregressive step says nothing about drafting
        # the curve from the search the tree came from where it reaches further (measured, not extrapolated)
        probs = step.search_probs if len(step.search_probs) > len(step.node_probs) else step.node_probs
        cs = np.cumsum(np.sort(np.asarray(probs, dtype=float))[::-1])
        self.curves.append(cs)
        predicted, observed = float(sum(step.node_probs)), float(max(step.accepted - 1, 0))
        if self.steps == 0:
            self._num = self._den = predicted  # prior: the drafter is right
        self.steps += 1
        rate = max(1.0 / (self.steps + self.prior_steps), self.alpha)  # a running mean, then an EMA
        self._num += rate * (observed - self._num)
        self._den += rate * (predicted - self._den)
        if step.path_ranks is not None:
            self._observe_sizes(step.node_probs, step.path_ranks)

    def factors(self, ks) -> np.ndarray:
        """The factor at each budget: measured per tree size where steps recorded ranks, else the one factor."""
        ks = np.asarray(ks, dtype=float)
        if not self._sizes:
            return np.full(ks.shape, self.factor)
        sizes, overall = sorted(self._sizes), self.factor
        f = []
        for b in sizes:  # a size seen on few trees leans on the factor measured over all of them
            num, den, n = self._sizes[b]
            w = n / (n + self.prior_steps)
            f.append(np.clip(w * num / max(den, 1e-9) + (1 - w) * overall, *self.clip))
        return np.interp(np.log2(np.maximum(ks, 1.0)), np.log2(sizes), f)

    def _observe_sizes(self, probs: list[float], ranks: list[int]) -> None:
        """Observed vs predicted accepted draft tokens for every power-of-two top-k of one tree."""
        cs = np.cumsum(np.sort(np.asarray(probs, dtype=float))[::-1])
        k = 1
        while k <= cs.size:
            observed = next((j for j, r in enumerate(ranks) if r >= k), len(ranks))
            # prior: the factor measured so far over all trees (not "the drafter is right": a size the
            # scheduler rarely drafts would stay pessimistic where the drafter under-rates itself)
            num, den, n = self._sizes.get(k, [self.factor * cs[k - 1], cs[k - 1], 0])
            rate = max(1.0 / (n + 1 + self.prior_steps), self.alpha)
            self._sizes[k] = [num + rate * (observed - num), den + rate * (cs[k - 1] - den), n + 1]
            k *= 2

    def state(self) -> dict:
        return {"factor": round(self.factor, 4), "trees": len(self.curves),
                "last_tree": int(self.curves[-1].size) if self.curves else 0}


def _evaluate(cs: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """One tree's prefix-sum curve at budgets ks, extrapolated as a + b·ln K past its size."""
    n = cs.size
    inside = cs[np.clip(ks.astype(int), 1, n) - 1] * (ks >= 1)
    m = n // 2
    b = (cs[-1] - cs[m - 1]) / np.log(n / m) if m >= 1 else cs[-1]
    tail = cs[-1] + b * np.log(np.maximum(ks, n) / n)
    return np.where(ks <= n, inside, tail)
