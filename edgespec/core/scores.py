"""Calibrated tree scores: how often the target really takes a draft node, learnt from verified trees.

Best-first drafting ranks nodes by the product of their edges' draft probabilities, which treats a
draft probability p as the chance the target takes that token. It is not: in greedy decoding the
target takes its argmax, so a drafter close to the target is right about its top token far more
often than p says (a top token at p = 0.5 may be the target's choice 80 % of the time), and about
its second token less often. Scoring by raw p spends the budget on siblings where depth pays.

Every verified tree measures the truth. A node is *tested* when the target accepted its parent
(the root always is); it is a *hit* when the target then took it. `ScoreCalibration` keeps, for
the parent's top proposal and for the others separately, hit and test counts in bins of the draft
log-probability (exponentially forgotten, so it follows the conversation), and maps a raw draft
log-probability to log of the estimated hit rate. Bins with few tests shrink towards the drafter's
own p (the prior), the rates are made non-decreasing in p (pool adjacent violators) and are
interpolated between bins, so the drafter's ordering stands. The expected number of accepted nodes of a tree is then the sum of its nodes'
calibrated path probabilities (exact by linearity, given that the chance to take a node depends on
its own draft probability once its parent is taken), which is what best-first maximises.

A proposal the grammar forces (the only token it allows after its parent: a JSON key, a closing
quote) is certain — the target's masked pick there has nowhere else to go — so it is ranked FORCED,
scores log 1 = 0 (its depth is free) and is never observed: it would teach the top bin that
confident guesses always hit.

The tree's shape changes, never the output: verification ignores draft scores.
"""
from __future__ import annotations

import math

import numpy as np
import torch

# bin edges on the draft probability: fine near 1, where a drafter's top tokens live
EDGES = (1e-3, 0.01, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
MAX_HIT = 0.995  # a calibrated edge never scores log(1) = 0: depth is never free
TIE = 1e-3  # a sliver of the raw log-prob, so equal calibrated rates still rank by draft probability
FORCED = -1  # the rank of a proposal the grammar forces (the only token it allows there): certain


class ScoreCalibration:
    """Maps draft log-probabilities to calibrated log hit rates; learns from verified trees.

    prior_weight: pseudo-tests per bin at the drafter's own probability; decay: counts are multiplied by
    this per observed tree (0.98: about the last 50 trees count).
    """

    def __init__(self, prior_weight: float = 2.0, decay: float = 0.98):
        self.prior_weight, self.decay = prior_weight, decay
        self.edges = torch.tensor([math.log(e) for e in EDGES], dtype=torch.float64)
        shape = (2, len(EDGES) + 1)  # [top proposal, other proposals] x bins
        self.tests = torch.zeros(shape, dtype=torch.float64)
        self.hits = torch.zeros(shape, dtype=torch.float64)
        self.logp_sum = torch.zeros(shape, dtype=torch.float64)  # of tested nodes: where each bin's mass sits
        self.trees = 0
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---- mapping -----------------------------------------------------------------------------
    def edge_scores(self, logp: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
        """Calibrated log hit rate for draft log-probabilities `logp` of proposals ranked `rank` (0 = top;
        FORCED: certain, 0)."""
        forced = rank.to(logp.device) == FORCED
        if self.trees == 0:
            return logp.clamp(max=math.log(MAX_HIT)).masked_fill(forced, 0.0)
        knots, rates = self._table_now()
        flat, ranks = logp.reshape(-1).double().cpu(), (rank.reshape(-1).cpu() > 0).long()
        out = torch.empty_like(flat)
        for r in (0, 1):
            sel = ranks == r
            if sel.any():
                # knots ascend strictly (each lies inside its own bin); constant beyond the end knots
                out[sel] = torch.from_numpy(np.interp(flat[sel].numpy(), knots[r].numpy(), rates[r].numpy()))
        out = out + TIE * flat  # pooled bins keep the drafter's own ordering
        out = out.clamp(max=math.log(MAX_HIT)).to(logp.dtype).reshape(logp.shape)
        return out.to(logp.device).masked_fill(forced, 0.0)

    def _table_now(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per rank class: knots (mean log p of each bin's tests, the bin's centre if none) and the log hit
        rate there, shrunk to p by `prior_weight` pseudo-tests and made non-decreasing in p."""
        if self._table is None:
            w = self.prior_weight
            seen = self.tests > 0
            knots = torch.where(seen, self.logp_sum / self.tests.clamp(min=1e-12), _bin_centres(self.edges))
            rate = (self.hits + w * knots.exp()) / (self.tests + w)
            rate = torch.stack([_isotonic(rate[r], self.tests[r] + w) for r in range(2)])
            self._table = knots, rate.clamp(1e-9, 1.0).log()
        return self._table

    # ---- learning ----------------------------------------------------------------------------
    def observe(self, logp: torch.Tensor, rank: torch.Tensor, hit: torch.Tensor) -> None:
        """One verified tree's tested nodes: their draft log-probs, proposal ranks and outcomes (forced
        proposals left out: certain, they say nothing of the drafter)."""
        chosen = rank.reshape(-1) != FORCED
        logp, rank, hit = logp.reshape(-1)[chosen], rank.reshape(-1)[chosen], hit.reshape(-1)[chosen]
        self.tests *= self.decay
        self.hits *= self.decay
        self.logp_sum *= self.decay
        self.trees += 1
        self._table = None
        if logp.numel() == 0:
            return
        logp = logp.reshape(-1).double().cpu()
        row = (rank.reshape(-1).cpu() > 0).long()
        col = torch.bucketize(logp, self.edges)
        idx = row * self.tests.shape[1] + col
        for table, values in ((self.tests, torch.ones_like(logp)), (self.hits, hit.reshape(-1).double().cpu()),
                              (self.logp_sum, logp)):
            table.view(-1).index_add_(0, idx, values)

    def observe_tree(self, tree, path: list[int]) -> None:
        """Learn from a verified `tree` (with `logp` and `rank` per node) and its accepted `path`."""
        if tree.size == 0 or tree.logp is None:
            return
        on_path = torch.zeros(tree.size + 1, dtype=torch.bool)
        on_path[0] = True
        on_path[torch.tensor(path, dtype=torch.long)] = True
        parents = tree.parents[1:]
        tested = on_path[parents]  # the parent was taken: this node was put to the test
        self.observe(tree.logp[1:][tested], tree.rank[1:][tested], on_path[1:][tested])

    def state(self) -> dict:
        """Hit rate against draft probability, for stats: {'top'|'other': [(p, hit rate, tests), ...]}."""
        knots, rates = self._table_now()
        out = {}
        for r, name in ((0, "top"), (1, "other")):
            rows = [(round(math.exp(k), 4), round(math.exp(h), 4), round(float(n), 1))
                    for k, h, n in zip(knots[r].tolist(), rates[r].tolist(), self.tests[r].tolist()) if n >= 1]
            out[name] = rows
        return out


def _bin_centres(edges: torch.Tensor) -> torch.Tensor:
    """Log-probability in the middle of each bin (both rank classes)."""
    lo = torch.cat([edges[:1] - 2.0, edges])
    hi = torch.cat([edges, torch.zeros(1, dtype=edges.dtype)])
    return ((lo + hi) / 2).expand(2, -1)


def _isotonic(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted least-squares non-decreasing fit of y (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(y.tolist(), weight.tolist()):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (v1, w1, n1), (v2, w2, n2) = blocks.pop(-2), blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return torch.tensor([b[0] for b in blocks for _ in range(b[2])], dtype=y.dtype)


class ScoreCalibrations:
    """One calibration per sampling setting (greedy, or each temperature/top-p/... combination), kept
    across generations: what the trees of one setting teach says little about another's."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled  # False: raw draft scores everywhere
        self.by_setting: dict[tuple, ScoreCalibration] = {}

    def for_sampler(self, sampler) -> ScoreCalibration | None:
        if not self.enabled:
            return None
        return self.by_setting.setdefault(sampler.key_of_setting(), ScoreCalibration())
