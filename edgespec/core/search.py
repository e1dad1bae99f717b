"""Drafting: build a token tree best-first by cumulative draft probability (SpecExec-style).

Each round feeds up to `batch` of the most probable unexpanded nodes to the drafter in ONE forward
(tree mask over its KV cache, position = root position + depth), then proposes each node's top
`branch` children. Only the global top-`budget` nodes survive; because a child never scores above
its parent, the survivors always form a connected subtree, and the top-K sets for K < budget nest,
which lets the scheduler read the acceptance curve off a single tree. The search stops when no
unexpanded survivor can beat the K-th best node, or at `max_depth`. With a calibration on the
sampler (edgespec/core/scores.py) a node's score sums its edges' learnt hit rates instead of raw draft
log-probabilities; each node keeps its raw log-probability and rank, for the calibration to learn
from and for `rescore` when it has.

A search outlives its step: it can keep growing while the target verifies (overlap), and after
acceptance `reroot` re-roots it at the target's new token, so the next step starts from the
subtree already drafted under it. The search writes the drafter's KV cache only by feeding nodes;
`reroot` says which entries the committed tokens and the kept subtree need, and the conversation
(edgespec/engine/conversation.py) compacts the cache to them when it commits the step.

Under a grammar (edgespec/core/grammar.py) every expanded node carries its grammar state — its parent's,
forked, plus its own token — and the drafter proposes only the tokens that state allows, scored by its
probabilities renormalised over them; re-rooting keeps the states under the new root.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from edgespec.base.errors import NonFiniteLogitsError
from edgespec.core.attention import slides
from edgespec.core.grammar import GrammarState, allowed_rows
from edgespec.core.scores import FORCED
from edgespec.base.stats import Plan
from edgespec.core.tree import Tree, ancestor_chains

if TYPE_CHECKING:
    from edgespec.core.scores import ScoreCalibration


class TreeSearch:
    """Best-first search state: candidate nodes (pruned ones marked dead) and the drafter cache.

    Candidates beyond the budget are kept up to `slack` x budget (cheap: no drafter work), so that
    after verification the target's token is often found already drafted under the accepted path.
    """

    slack = 4

    def __init__(self, runner, cache, sampler, root_token: int, root_pos: int, seen: torch.Tensor | None = None,
                 calibration: "ScoreCalibration | None" = None, grammar: GrammarState | None = None):
        self.runner, self.cache, self.sampler = runner, cache, sampler
        self.calibration = calibration  # maps draft log-probs to calibrated log hit rates (None: raw scores)
        self.root_pos = root_pos  # drafter cache position (= sequence position) of the root
        self.seen = seen  # (vocab,) bool: committed tokens, for the repetition penalty (None: off)
        self.tokens = torch.tensor([root_token])
        self.parents = torch.tensor([-1])
        self.depths = torch.tensor([0])
        self.scores = torch.tensor([0.0])  # cumulative edge scores (calibrated when a calibration is given)
        self.logp = torch.tensor([0.0])  # each node's raw draft log-prob given its parent
        self.rank = torch.tensor([0])  # each node's rank among its parent's proposals
        self.fed = torch.tensor([root_pos])  # drafter cache position, -1 until fed
        self.expanded = torch.tensor([False])
        self.alive = torch.tensor([True])
        self.snapshot: torch.Tensor | None = None  # search indices of the last tree handed out
        self.forwards = self.fed_tokens = 0  # drafter forwards this search ran, and the tokens they fed
        # node -> its grammar state (the text up to and including its token), for expanded nodes; None: no grammar
        self.states: dict[int, GrammarState] | None = {0: grammar} if grammar is not None else None

    @classmethod
    def start(cls, runner, cache, stem: torch.Tensor, sampler, branch: int, history=None,
              calibration: "ScoreCalibration | None" = None, grammar: GrammarState | None = None) -> "TreeSearch":
        """Feed the pending `stem` (ending in the root) to the drafter's `runner` (edgespec/core/draft_runner.py) and
        propose the root's children. `history`: the committed tokens, root included (for the
        repetition penalty); `calibration`: how to score nodes (edgespec/core/scores.py; None: raw);
        `grammar`: the grammar state after the root (None: unconstrained)."""
        past = cache.get_seq_length()
        s = stem.numel()
        logits = runner.logits(runner.hidden_states(cache, stem, torch.arange(past, past + s), None)[-1:])
        seen = sampler.seen(history, logits.shape[-1]) if history is not None else None
        own = grammar.fork() if grammar is not None else None  # (the verifying thread reads the caller's)
        search = cls(runner, cache, sampler, int(stem[-1]), past + s - 1, seen, calibration, own)
        search.forwards, search.fed_tokens = 1, s
        search._add_children(torch.tensor([0]), logits, branch)
        return search

    # ---- growing -----------------------------------------------------------------------------
    def grow(self, plan: Plan, rounds: int | None = None) -> bool:
        """Expand best-first until the top-`budget` tree is final (or `rounds` forwards ran).
        Returns True when there is nothing left to expand."""
        done = 0
        while rounds is None or done < rounds:
            threshold = self._keep_top(plan.budget, keep=plan.budget * self.slack)
            nodes = self._frontier(plan.max_depth, threshold, plan.batch)
            if nodes.numel() == 0:
                return True
            self._add_children(nodes, self._feed(nodes), plan.branch)
            done += 1
        return False

    def tree(self, budget: int) -> Tree:
        """The current top-`budget` subtree, topologically ordered (root first)."""
        scores = self.scores.masked_fill(~self.alive, float("-inf"))
        scores[0] = float("-inf")
        order = scores.sort(descending=True, stable=True).indices[: min(budget, int(self.alive.sum()) - 1)]
        keep = torch.cat([torch.tensor([0]), order.sort().values])
        self.snapshot = keep
        remap = torch.full((self.tokens.numel(),), -1)
        remap[keep] = torch.arange(keep.numel())
        parents = self.parents[keep]
        parents = torch.where(parents >= 0, remap[parents.clamp(min=0)], parents)
        return Tree(self.tokens[keep], parents, self.depths[keep], self.scores[keep], self.fed[keep],
                    self.logp[keep], self.rank[keep])

    def node_probs(self, limit: int) -> list[float]:
        """The scores (as probabilities) of the best `limit` alive draft nodes, descending: what a tree of
        up to `limit` nodes drawn from this search would hold, for the acceptance curve past the tree
        verified (the search holds more: slack candidates, and what it grew during the pass)."""
        scores = self.scores[self.alive][1:]  # the root (index 0) is always alive
        return torch.exp(scores).sort(descending=True).values[:limit].tolist()

    def resume(self, sampler, calibration: "ScoreCalibration | None") -> int:
        """Carry the search into the next step, under that step's `sampler` and `calibration` (scores
        recomputed with what the calibration has learnt since); returns the draft nodes carried over."""
        self.sampler, self.calibration = sampler, calibration
        self.rescore()
        return int(self.alive.sum()) - 1

    def rescore(self) -> None:
        """Recompute every node's score from its edges with the calibration as it is now (it learnt
        from the trees verified since these nodes were drafted)."""
        calib = self.calibration
        if calib is None or self.tokens.numel() <= 1:
            return
        edges = calib.edge_scores(self.logp, self.rank)
        edges[0] = 0.0
        nodes = torch.arange(self.tokens.numel())
        chains = ancestor_chains(self.parents, nodes, int(self.depths.max()))
        self.scores = edges[chains.clamp(min=0)].masked_fill(chains < 0, 0.0).sum(dim=1)

    # ---- after verification ------------------------------------------------------------------
    def reroot(self, path: list[int], bonus: int) -> "tuple[TreeSearch | None, list[int]]":
        """The search after the accepted `path` (indices into the last tree) and the target's `bonus`
        token, and the drafter cache positions it needs, in order: (the re-rooted search, the committed
        tokens' entries then that subtree's) when the search already holds the bonus token under the
        path's end with its children drafted and some of them still alive, else (None, the committed
        tokens' entries). The cache is not touched: the conversation keeps exactly these entries when it
        commits the step."""
        nodes = [int(self.snapshot[j]) for j in path]
        fed_path = [int(self.fed[n]) for n in nodes]
        fed_path = fed_path[: next((i for i, p in enumerate(fed_path) if p < 0), len(fed_path))]
        end = nodes[-1] if nodes else 0
        hit = ((self.parents == end) & (self.tokens == bonus) & self.alive & self.expanded).nonzero()
        prefix = list(range(self.root_pos + 1)) + fed_path
        if hit.numel() == 0 or len(fed_path) < len(nodes):
            return None, prefix
        if not bool((self.alive & (self.parents == hit[0])).any()):  # expanded, then all its children pruned:
            return None, prefix  # grow() would never expand it again (an empty tree); draft it afresh
        return self._reroot_at(int(hit[0]), prefix)

    def _reroot_at(self, new_root: int, prefix: list[int]) -> "tuple[TreeSearch, list[int]]":
        alive = self.alive.nonzero().squeeze(1)
        chains = ancestor_chains(self.parents, alive, int(self.depths.max()))
        sub = alive[(chains == new_root).any(dim=1)]  # the new root and its alive descendants (ascending)
        sub_fed = self.fed[sub]
        kept_fed = sub_fed[sub_fed >= 0]
        positions = torch.cat([torch.tensor(prefix, dtype=torch.long), kept_fed.sort().values])
        new_pos = torch.full((int(positions.max()) + 1,), -1)
        new_pos[positions] = torch.arange(positions.numel())
        remap = torch.full((self.tokens.numel(),), -1)
        remap[sub] = torch.arange(sub.numel())
        seen = self.seen
        if seen is not None:  # the accepted path and the new root are committed now
            seen = seen.clone()
            path = ancestor_chains(self.parents, torch.tensor([new_root]), int(self.depths[new_root]))[0]
            seen[self.tokens[path]] = True
        nxt = TreeSearch(self.runner, self.cache, self.sampler, int(self.tokens[new_root]), len(prefix), seen,
                         self.calibration)
        if self.states is not None:  # expanded nodes under the new root keep their states
            nxt.states = {int(remap[n]): st for n, st in self.states.items() if remap[n] >= 0}
        parents = self.parents[sub]
        nxt.parents = torch.where(sub == new_root, -1, remap[parents.clamp(min=0)])
        nxt.tokens, nxt.depths = self.tokens[sub], self.depths[sub] - self.depths[new_root]
        nxt.scores = self.scores[sub] - self.scores[new_root]
        nxt.logp, nxt.rank = self.logp[sub], self.rank[sub]
        nxt.logp[0], nxt.rank[0] = 0.0, 0
        nxt.fed = torch.where(sub_fed >= 0, new_pos[sub_fed.clamp(min=0)], sub_fed)
        nxt.expanded, nxt.alive = self.expanded[sub], torch.ones(sub.numel(), dtype=torch.bool)
        assert int(nxt.fed[0]) == len(prefix), "the new root must sit right after the committed tokens"
        return nxt, positions.tolist()

    # ---- internals ---------------------------------------------------------------------------
    def _add_children(self, parents: torch.Tensor, logits: torch.Tensor, branch: int) -> None:
        positions = self.root_pos + self.depths[parents] + 1  # sequence positions of the children
        allowed = self._allowed_at(parents)
        top_lp, top_tok = self.sampler.draft_children(logits, positions, branch, self._seen_at(parents), allowed)
        top_lp = top_lp.cpu()
        if bool(top_lp.isnan().any()):  # a NaN or infinite logit makes its whole row NaN: checked once a forward
            raise NonFiniteLogitsError("drafter", int(positions[0]))
        k = top_tok.shape[1]
        n = parents.numel() * k
        rank = torch.arange(k).expand(parents.numel(), k).clone()
        if allowed is not None:  # the only token the grammar allows there (a host mask): certain (scores.FORCED)
            rank[allowed.sum(dim=-1) == 1, 0] = FORCED
        calib = self.calibration
        edge = calib.edge_scores(top_lp, rank) if calib is not None else top_lp
        self.tokens = torch.cat([self.tokens, top_tok.reshape(-1).cpu()])
        self.parents = torch.cat([self.parents, parents.repeat_interleave(k)])
        self.depths = torch.cat([self.depths, (self.depths[parents] + 1).repeat_interleave(k)])
        self.scores = torch.cat([self.scores, (self.scores[parents][:, None] + edge).reshape(-1)])
        self.logp = torch.cat([self.logp, top_lp.reshape(-1)])
        self.rank = torch.cat([self.rank, rank.reshape(-1)])
        self.fed = torch.cat([self.fed, torch.full((n,), -1)])
        self.expanded = torch.cat([self.expanded, torch.zeros(n, dtype=torch.bool)])
        self.alive = torch.cat([self.alive, torch.isfinite(top_lp).reshape(-1)])  # top-k/p, min-p removed: dead
        self.expanded[parents] = True

    def _seen_at(self, parents: torch.Tensor) -> torch.Tensor | None:
        """(n, V) bool: the tokens before each child of `parents`: committed ones, and the parent's
        path from the root (for the repetition penalty); None when it is off."""
        if self.seen is None:
            return None
        chains = ancestor_chains(self.parents, parents, int(self.depths[parents].max()))
        seen = self.seen.expand(parents.numel(), -1).clone()
        return seen.scatter_(1, self.tokens[chains.clamp(min=0)], True)  # padding -1 → the root, already seen

    def _allowed_at(self, parents: torch.Tensor) -> torch.Tensor | None:
        """(n, V) bool: what the grammar allows after each of `parents` (None: no grammar)."""
        if self.states is None:
            return None
        return allowed_rows([self._state(int(p)) for p in parents])

    def _state(self, node: int) -> GrammarState:
        """`node`'s grammar state: its parent's (expanded before it) followed by its token."""
        state = self.states.get(node)
        if state is None:
            state = self.states[node] = self._state(int(self.parents[node])).then(int(self.tokens[node]))
        return state

    def _keep_top(self, budget: int, keep: int) -> float:
        """Mark all but the root and the best `keep` nodes dead; returns the `budget`-th best score."""
        scores = self.scores.masked_fill(~self.alive, float("-inf"))
        scores[0] = float("-inf")
        order = scores.sort(descending=True, stable=True).indices  # ties: parents (lower index) first
        self.alive[order[keep:]] = False
        self.alive[0] = True
        full = int(self.alive.sum()) - 1 >= budget
        return float(scores[order[budget - 1]]) if full and budget > 0 else float("-inf")

    def _frontier(self, max_depth: int, threshold: float, batch: int) -> torch.Tensor:
        ok = self.alive & ~self.expanded & (self.depths < max_depth) & (self.scores > threshold)
        idx = ok.nonzero().squeeze(1)
        if idx.numel() > batch:
            idx = idx[self.scores[idx].sort(descending=True, stable=True).indices[:batch]]
        return idx.sort().values

    def _feed(self, nodes: torch.Tensor) -> torch.Tensor:
        """One drafter forward over `nodes`; each sees the committed prefix, its ancestors and itself."""
        start = self.cache.get_seq_length()
        b = nodes.numel()
        self.fed[nodes] = start + torch.arange(b)
        chains = ancestor_chains(self.parents, nodes, int(self.depths[nodes].max()))  # node, parent, …, root
        cols = torch.where(chains >= 0, self.fed[chains.clamp(min=0)], torch.full_like(chains, -1))
        allowed = torch.zeros(b, start + b, dtype=torch.bool)
        allowed[:, : self.root_pos] = True  # committed tokens before the root
        rows = torch.arange(b)[:, None].expand_as(cols)
        valid = cols >= 0
        allowed[rows[valid], cols[valid]] = True
        kv_pos = self._slot_positions(start + b) if slides(self.runner.config) else None
        self.forwards, self.fed_tokens = self.forwards + 1, self.fed_tokens + b
        hidden = self.runner.hidden_states(self.cache, self.tokens[nodes], self.root_pos + self.depths[nodes],
                                            allowed, kv_pos)
        return self.runner.logits(hidden)

    def _slot_positions(self, n: int) -> torch.Tensor:
        """Sequence position of each of the drafter cache's first `n` slots: committed slots are their
        positions, a fed node's slot holds position root + depth (sliding windows go by position)."""
        pos = torch.arange(n)
        fed = self.fed >= 0
        pos[self.fed[fed]] = self.root_pos + self.depths[fed]
        return pos


def build_tree(runner, cache, stem: torch.Tensor, plan: Plan, sampler) -> Tree:
    """Feed the pending `stem` (ending in the root) to the drafter, then grow a tree under the root."""
    if plan.budget <= 0:
        return Tree.root_only(int(stem[-1]))  # the stem stays pending: nothing drafted
    search = TreeSearch.start(runner, cache, stem, sampler, plan.branch)
    search.grow(plan)
    return search.tree(plan.budget)
