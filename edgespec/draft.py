"""Drafting: build a token tree best-first by cumulative draft probability (SpecExec-style).

Each round feeds up to `batch` of the most probable unexpanded nodes to the drafter in ONE forward
(tree mask over its KV cache, position = root position + depth), then proposes each node's top
`branch` children. Only the global top-`budget` nodes survive; because a child never scores above
its parent, the survivors always form a connected subtree, and the top-K sets for K < budget nest,
which lets the scheduler read the acceptance curve off a single tree. The search stops when no
unexpanded survivor can beat the K-th best node, or at `max_depth`.
"""
from __future__ import annotations

import torch

from edgespec.forward import hidden_states, logits_from_hidden
from edgespec.stats import Plan
from edgespec.tree import Tree, ancestor_chains


class _Pool:
    """Growing node arrays for the search (candidates included, pruned ones marked dead)."""

    def __init__(self, root_token: int, root_pos: int):
        self.tokens = torch.tensor([root_token])
        self.parents = torch.tensor([-1])
        self.depths = torch.tensor([0])
        self.scores = torch.tensor([0.0])
        self.fed = torch.tensor([root_pos])  # drafter cache position, -1 until fed
        self.expanded = torch.tensor([False])
        self.alive = torch.tensor([True])

    def add_children(self, parents: torch.Tensor, logprobs: torch.Tensor, branch: int) -> None:
        top_lp, top_tok = logprobs.topk(min(branch, logprobs.shape[-1]), dim=-1)
        k = top_tok.shape[1]
        self.tokens = torch.cat([self.tokens, top_tok.reshape(-1).cpu()])
        self.parents = torch.cat([self.parents, parents.repeat_interleave(k)])
        self.depths = torch.cat([self.depths, (self.depths[parents] + 1).repeat_interleave(k)])
        child_scores = (self.scores[parents][:, None] + top_lp.cpu()).reshape(-1)
        self.scores = torch.cat([self.scores, child_scores])
        n = child_scores.numel()
        self.fed = torch.cat([self.fed, torch.full((n,), -1)])
        self.expanded = torch.cat([self.expanded, torch.zeros(n, dtype=torch.bool)])
        self.alive = torch.cat([self.alive, torch.ones(n, dtype=torch.bool)])
        self.expanded[parents] = True

    def keep_top(self, budget: int) -> float:
        """Mark all but the root and the best `budget` nodes dead; returns the K-th best score."""
        scores = self.scores.masked_fill(~self.alive, float("-inf"))
        scores[0] = float("-inf")
        order = scores.sort(descending=True, stable=True).indices  # ties: parents (lower index) first
        self.alive[order[budget:]] = False
        self.alive[0] = True
        alive_count = int(self.alive.sum()) - 1
        return float(scores[order[budget - 1]]) if alive_count >= budget else float("-inf")

    def frontier(self, max_depth: int, threshold: float, batch: int) -> torch.Tensor:
        ok = self.alive & ~self.expanded & (self.depths < max_depth) & (self.scores > threshold)
        idx = ok.nonzero().squeeze(1)
        if idx.numel() > batch:
            idx = idx[self.scores[idx].sort(descending=True, stable=True).indices[:batch]]
        return idx.sort().values

    def to_tree(self) -> Tree:
        keep = self.alive.nonzero().squeeze(1)  # ascending = topological
        remap = torch.full((self.tokens.numel(),), -1)
        remap[keep] = torch.arange(keep.numel())
        parents = self.parents[keep]
        parents = torch.where(parents >= 0, remap[parents.clamp(min=0)], parents)
        return Tree(self.tokens[keep], parents, self.depths[keep], self.scores[keep], self.fed[keep])


def build_tree(model, cache, stem: torch.Tensor, plan: Plan, sampler) -> Tree:
    """Feed the pending `stem` (ending in the root) to the drafter, then grow a tree under the root.

    The drafter cache ends up holding the stem plus every fed node; `Tree.draft_pos` records where.
    """
    past = cache.get_seq_length()
    s = stem.numel()
    root_pos = past + s - 1
    if plan.budget <= 0:
        return Tree.root_only(int(stem[-1]))  # the stem stays pending: nothing drafted
    hidden = hidden_states(model, cache, stem, torch.arange(past, past + s), None)
    pool = _Pool(int(stem[-1]), root_pos)
    pool.add_children(torch.tensor([0]), sampler.draft_logprobs(logits_from_hidden(model, hidden[-1:])), plan.branch)
    while True:
        threshold = pool.keep_top(plan.budget)
        nodes = pool.frontier(plan.max_depth, threshold, plan.batch)
        if nodes.numel() == 0:
            return pool.to_tree()
        logits = _feed(model, cache, pool, nodes, prefix=root_pos, max_depth=plan.max_depth)
        pool.add_children(nodes, sampler.draft_logprobs(logits), plan.branch)


def _feed(model, cache, pool: _Pool, nodes: torch.Tensor, prefix: int, max_depth: int) -> torch.Tensor:
    """One drafter forward over `nodes`; each sees the committed prefix, its ancestors and itself."""
    start = cache.get_seq_length()
    b = nodes.numel()
    pool.fed[nodes] = start + torch.arange(b)
    chains = ancestor_chains(pool.parents, nodes, max_depth)  # node, parent, …, root, -1…
    cols = torch.where(chains >= 0, pool.fed[chains.clamp(min=0)], torch.full_like(chains, -1))
    allowed = torch.zeros(b, start + b, dtype=torch.bool)
    allowed[:, :prefix] = True  # committed tokens before the root
    rows = torch.arange(b)[:, None].expand_as(cols)
    valid = cols >= 0
    allowed[rows[valid], cols[valid]] = True
    positions = prefix + pool.depths[nodes]
    hidden = hidden_states(model, cache, pool.tokens[nodes], positions, allowed)
    return logits_from_hidden(model, hidden)
