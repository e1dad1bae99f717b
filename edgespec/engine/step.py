"""One step: the scheduler plans, the drafter builds a tree, the target verifies it, the longest
accepted path is kept, both caches are pruned to it, and the scheduler learns what the step cost and
bought. `Stepper.advance` is that whole step; an out-of-memory on the device rolls the step back and
retries it smaller (edgespec/engine/backoff.py); drafting can go on during the pass (edgespec/engine/overlap.py).
"""
from __future__ import annotations

import time

import torch

from edgespec.engine.backoff import OOM_ERRORS, back_off, out_of_memory
from edgespec.core.kv import prune_to_path
from edgespec.engine.conversation import Conversation
from edgespec.base.device import on_stream, sync, wait_stream
from edgespec.core.search import TreeSearch
from edgespec.base import memory
from edgespec.base.stats import Plan, StepStats
from edgespec.core.tree import Tree
from edgespec.core.verify import Verdict, verify


class Stepper:
    """Runs steps for one target/drafter pair. `draft` is the drafter (edgespec/core/drafter.py), `offload`
    the target's streaming handle (None when it is not offloaded), `overlap` an Overlap or None."""

    def __init__(self, target, draft, scheduler, device: torch.device, offload=None, overlap=None, stream=None):
        self.target, self.draft, self.scheduler, self.device = target, draft, scheduler, device
        self.offload, self.overlap, self.stream = offload, overlap, stream

    def advance(self, conv: Conversation, remaining: int, max_context: int, sampler, calibration=None,
                grammar=None, logprobs: int | None = None):
        """Plan and run one step, then let the scheduler observe it: (Verdict — the committed tokens, the
        grammar state after them, their log-probabilities —, StepStats), or None when the context or the
        tokens still wanted leave no room for a step. `grammar`: the grammar state after the committed
        tokens (edgespec/core/grammar.py; None: unconstrained); `logprobs`: top alternatives per token."""
        start = time.perf_counter()
        plan = self.plan_for(conv, remaining, max_context)
        if plan is None:
            return None
        verdict, stats = self.step(conv, plan, sampler, calibration, grammar, logprobs)
        stats.overhead_time = max(0.0, time.perf_counter() - start - stats.draft_time - stats.verify_time)
        self.scheduler.observe(stats)
        return verdict, stats

    def plan_for(self, conv: Conversation, remaining: int, max_context: int) -> Plan | None:
        """The scheduler's plan, clipped to the context window, the tokens still wanted and memory."""
        room = max_context - len(conv.ids)
        if room <= 0 or remaining <= 0:
            return None
        plan = self.scheduler.plan(context_room=room)
        depth = min(plan.max_depth, room - 1, remaining - 1)
        budget = min(plan.budget, self.memory_cap(conv)) if depth > 0 else 0
        return Plan(budget, max(depth, 1), plan.branch, plan.batch)

    def memory_cap(self, conv: Conversation) -> int:
        """The largest tree whose target-pass activations fit in half the free memory now."""
        fit = memory.max_tree_tokens(self.target.config, len(conv.ids), memory.free_memory(self.device))
        return max(0, fit - conv.pending)

    def step(self, conv: Conversation, plan: Plan, sampler, calibration=None, grammar=None,
             logprobs: int | None = None) -> tuple[Verdict, StepStats]:
        """Draft, verify, accept, prune; on device out-of-memory, roll back and retry smaller."""
        retries = 0
        while True:
            before = conv.lengths()
            try:
                verdict, stats = self._step(conv, plan, sampler, calibration, grammar, logprobs)
                stats.retries = retries
                return verdict, stats
            except OOM_ERRORS as err:
                conv.rollback(before)
                if plan.budget == 0:
                    raise out_of_memory() from err
                retries += 1
                plan = back_off(plan, self.scheduler, self.offload)

    @torch.no_grad()
    def _step(self, conv: Conversation, plan: Plan, sampler, calibration, grammar, logprobs) -> tuple[Verdict, StepStats]:
        if plan.budget > 0:
            self.draft.prepare(conv.dcache)  # (re)captures the drafter's graphs, if any are missing
        t0 = time.perf_counter()
        search, reused, tree = self._draft_tree(conv, plan, sampler, calibration, grammar)
        t1 = time.perf_counter()
        tlen = conv.tcache.get_seq_length()
        stem = torch.tensor(conv.ids[tlen:])
        verdict, overlap_time = self._verify(conv, stem, tree, sampler, search, plan, grammar, logprobs)
        t2 = time.perf_counter()
        if calibration is not None:
            calibration.observe_tree(tree, verdict.path)
        root = tlen + stem.numel()  # entries up to and including the root
        prune_to_path(conv.tcache, root, [root - 1 + j for j in verdict.path])
        with on_stream(self.stream):
            conv.search = search.advance(verdict.path, verdict.tokens[-1]) if search is not None else None
        conv.ids.extend(verdict.tokens)
        stats = StepStats(plan.budget, tree.size, tree.depth, len(verdict.tokens), t1 - t0, t2 - t1,
                          stem.numel() + tree.size, tree.node_probs(), reused=reused, overlap_time=overlap_time)
        return verdict, stats

    def _draft_tree(self, conv: Conversation, plan: Plan, sampler, calibration, grammar=None):
        """(search, nodes it carried over, this step's tree): last step's re-rooted search or a fresh
        one grown to the plan; no search and a bare root for a plain step."""
        if plan.budget <= 0:
            conv.trim(len(conv.ids) - 1)  # a plain step: drop any drafted subtree
            return None, 0, Tree.root_only(conv.ids[-1])
        with on_stream(self.stream):
            search, reused = conv.search, 0
            if search is not None:
                search.sampler, search.calibration = sampler, calibration
                search.rescore()
                reused = int(search.alive.sum()) - 1
            else:
                stem = torch.tensor(conv.ids[conv.dcache.get_seq_length():])
                search = TreeSearch.start(self.draft, conv.dcache, stem, sampler, plan.branch, conv.ids, calibration,
                                          grammar)
            search.grow(plan)
            tree = search.tree(plan.budget)
        wait_stream(self.stream)
        return search, reused, tree

    def _verify(self, conv: Conversation, stem, tree: Tree, sampler, search, plan: Plan, grammar=None,
                logprobs=None) -> tuple[Verdict, float]:
        """The target pass over stem + tree: (verdict, seconds drafted during it)."""
        def run() -> Verdict:
            verdict = verify(self.target, conv.tcache, stem, tree, sampler, conv.ids, grammar, logprobs)
            sync(self.device)
            return verdict

        if self.overlap is not None and search is not None:
            return self.overlap.verify_while_drafting(run, search, plan)
        return run(), 0.0
