"""The speculative token tree: nodes with parent, depth, token and draft score.

Node 0 is the root: the last committed token, whose successors the tree proposes. Nodes are kept
in topological order (a parent always has a smaller index than its children), so masks and
acceptance walks can be built in one pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Tree:
    tokens: torch.Tensor  # (N+1,) long, tokens[0] is the root (last committed token)
    parents: torch.Tensor  # (N+1,) long, parents[0] = -1
    depths: torch.Tensor  # (N+1,) long, depths[0] = 0
    scores: torch.Tensor  # (N+1,) float, cumulative (calibrated) draft log-probability (root 0)
    draft_pos: torch.Tensor  # (N+1,) long, drafter cache position of a node fed to the drafter, else -1
    # what calibration learns from (edgespec/core/scores.py): each node's own draft log-probability given
    # its parent, and its rank among its parent's proposals (0 = the drafter's top token); root: 0, 0
    logp: torch.Tensor | None = None
    rank: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """Draft nodes, root excluded."""
        return self.tokens.numel() - 1

    @property
    def depth(self) -> int:
        return int(self.depths.max()) if self.size else 0

    @classmethod
    def root_only(cls, token: int, draft_pos: int = -1) -> "Tree":
        one = lambda v, dt=torch.long: torch.tensor([v], dtype=dt)  # noqa: E731
        return cls(one(token), one(-1), one(0), one(0.0, torch.float), one(draft_pos))

    def node_probs(self) -> list[float]:
        """Draft path probabilities of the draft nodes, sorted descending."""
        return torch.exp(self.scores[1:]).sort(descending=True).values.tolist()

    def ranks(self, nodes: list[int]) -> list[int]:
        """Each draft node's rank by score among the draft nodes (0 = the best; ties: lower index first)."""
        order = self.scores[1:].sort(descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        return [int(rank[i - 1]) for i in nodes]

    def children(self) -> list[dict[int, int]]:
        """For each node, a map token → child index."""
        kids: list[dict[int, int]] = [{} for _ in range(self.size + 1)]
        for i, (p, t) in enumerate(zip(self.parents.tolist(), self.tokens.tolist())):
            if p >= 0:
                kids[p][t] = i
        return kids

    def ancestor_mask(self) -> torch.Tensor:
        """(N+1, N+1) bool: [i, j] is True when j is i or an ancestor of i."""
        return ancestor_mask(self.parents, self.depths)


def ancestor_chains(parents: torch.Tensor, nodes: torch.Tensor, max_depth: int) -> torch.Tensor:
    """(len(nodes), max_depth+1) node indices: each node, then its parent, grandparent…, -1 padded."""
    chain = [nodes]
    cur = nodes
    for _ in range(max_depth):
        cur = torch.where(cur >= 0, parents[cur.clamp(min=0)], cur)
        chain.append(cur)
    return torch.stack(chain, dim=1)


def ancestor_mask(parents: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
    n = parents.numel()
    mask = torch.eye(n, dtype=torch.bool)
    for d in range(1, int(depths.max()) + 1 if n else 0):
        idx = (depths == d).nonzero().squeeze(1)
        mask[idx] |= mask[parents[idx]]
    return mask
