"""One step: the scheduler plans, the drafter builds a tree, the target verifies it, the conversation
commits the longest accepted path (both caches pruned to it, edgespec/engine/conversation.py), and the
scheduler learns what the step cost and bought. `Stepper.advance` is that whole step; an out-of-memory
on the device rolls the step back and retries it smaller (edgespec/engine/backoff.py); drafting can go
on during the pass (edgespec/engine/overlap.py).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from edgespec.engine.backoff import OOM_ERRORS, back_off, out_of_memory
from edgespec.engine.conversation import Conversation
from edgespec.base.clock import WallClock
from edgespec.base.device import on_stream, sync, wait_stream
from edgespec.core.search import TreeSearch
from edgespec.base import memory
from edgespec.base.stats import REST_PARTS, Plan, StepStats
from edgespec.core.tree import Tree
from edgespec.core.verify import Verdict, verify


CURVE_REACH = 4  # the acceptance curve a step reports reaches this many times its budget (where the search holds it)


class Stepper:
    """Runs steps for one target/drafter pair. `runner` runs the drafter (edgespec/core/draft_runner.py),
    `offload` is the target's streaming handle (None when it is not offloaded), `overlap` an Overlap or
    None, `stream` the drafter's side stream (None on a CPU), `clock` whose seconds the steps record
    (edgespec/base/clock.py; None: the wall clock's)."""

    def __init__(self, target, runner, device: torch.device, offload=None, overlap=None, stream=None, clock=None):
        self.target, self.runner, self.device = target, runner, device
        self.offload, self.overlap, self.stream = offload, overlap, stream
        self.clock = clock or WallClock()

    def advance(self, conv: Conversation, scheduler, remaining: int, max_context: int, sampler, calibration=None,
                grammar=None, logprobs: int | None = None, after=None):
        """Plan and run one step, hand it to `after(verdict, stats)` (the run's text and stop strings;
        None: nothing), then let `scheduler` observe it: (Verdict — the committed tokens, the grammar
        state after them, their log-probabilities —, StepStats, what `after` returned), or None when
        the context or the tokens still wanted leave no room for a step. `grammar`: the grammar state
        after the committed tokens (edgespec/core/grammar.py; None: unconstrained); `logprobs`: top
        alternatives per token. The step's rest (its time besides drafting and the pass) is split into
        the named parts of stats.REST_PARTS."""
        parts = Parts()
        start = time.perf_counter()
        with parts.timing("plan"):
            plan = self.plan_for(conv, scheduler, remaining, max_context)
        if plan is None:
            return None
        verdict, stats = self.step(conv, scheduler, plan, sampler, calibration, grammar, logprobs, parts)
        with parts.timing("text"):
            taken = after(verdict, stats) if after is not None else None
        with parts.timing("observe"):
            scheduler.observe(self._rest(stats, parts, time.perf_counter() - start))
        self._rest(stats, parts, time.perf_counter() - start)  # the observation's own time, after it
        return verdict, stats, taken

    def _rest(self, stats: StepStats, parts: "Parts", seconds: float) -> StepStats:
        """Fill in the step's rest: `seconds` of the whole step less drafting and the pass, by part (under
        a replay clock, the cost file's rest, shared out in the measured parts' proportions)."""
        named = sum(parts.values())
        other = max(0.0, seconds - parts.draft - parts.verify - named)
        rest = {name: parts.get(name, 0.0) for name in REST_PARTS if name != "other"} | {"other": other}
        total = named + other
        charged = self.clock.rest(total)
        if charged != total:
            rest = {k: v * charged / total for k, v in rest.items()} if total > 0 else rest | {"other": charged}
        stats.rest, stats.overhead_time = rest, charged
        return stats

    def plan_for(self, conv: Conversation, scheduler, remaining: int, max_context: int) -> Plan | None:
        """The scheduler's plan, clipped to the context window, the tokens still wanted and memory."""
        room = max_context - len(conv.ids)
        if room <= 0 or remaining <= 0:
            return None
        plan = scheduler.plan(context_room=room)
        depth = min(plan.max_depth, room - 1, remaining - 1)
        budget = min(plan.budget, self.memory_cap(conv)) if depth > 0 else 0
        return Plan(budget, max(depth, 1), plan.branch, plan.batch)

    def memory_cap(self, conv: Conversation) -> int:
        """The largest tree whose target-pass activations fit in half the free memory now."""
        fit = memory.max_tree_tokens(self.target.config, len(conv.ids), memory.free_memory(self.device))
        return max(0, fit - conv.pending)

    def step(self, conv: Conversation, scheduler, plan: Plan, sampler, calibration=None, grammar=None,
             logprobs: int | None = None, parts: "Parts | None" = None) -> tuple[Verdict, StepStats]:
        """Draft, verify, commit; on device out-of-memory, roll back and retry smaller (`scheduler` capped).
        `parts` collects the seconds of the rest's parts (capture, prune, reroot, observe)."""
        retries = 0
        parts = Parts() if parts is None else parts
        while True:
            conv.check()  # a step cut short earlier (Ctrl-C, an error) may have left the caches uneven
            before = conv.lengths()
            try:
                verdict, stats = self._step(conv, plan, sampler, calibration, grammar, logprobs, parts)
                stats.retries = retries
                return verdict, stats
            except OOM_ERRORS as err:
                conv.rollback(before)
                if plan.budget == 0:
                    raise out_of_memory() from err
                retries += 1
                plan = back_off(plan, scheduler, self.offload)

    @torch.no_grad()
    def _step(self, conv: Conversation, plan: Plan, sampler, calibration, grammar, logprobs,
              parts: "Parts") -> tuple[Verdict, StepStats]:
        if plan.budget > 0:
            with parts.timing("capture"):
                self.runner.prepare(conv.dcache)  # (re)captures the drafter's graphs, if any are missing
        t0 = time.perf_counter()
        search, reused, tree, fed = self._draft_tree(conv, plan, sampler, calibration, grammar)
        t1 = time.perf_counter()
        stem = torch.tensor(conv.ids[conv.tcache.get_seq_length():])
        verdict, overlap_time = self._verify(conv, stem, tree, sampler, search, plan, grammar, logprobs)
        t2 = time.perf_counter()
        with parts.timing("observe"):
            if calibration is not None:
                calibration.observe_tree(tree, verdict.path)
        nxt, draft_keep, curve = None, None, []
        if search is not None:
            curve = search.node_probs(CURVE_REACH * max(plan.budget, 1))
            with parts.timing("reroot"), on_stream(self.stream):
                nxt, draft_keep = search.reroot(verdict.path, verdict.tokens[-1])
        with parts.timing("prune"):
            conv.commit(verdict.tokens, verdict.path, nxt, draft_keep, self.stream)
        parts.draft, parts.verify = t1 - t0, t2 - t1  # measured, whatever the clock charges
        tokens = stem.numel() + tree.size
        stats = StepStats(plan.budget, tree.size, tree.depth, len(verdict.tokens), self.clock.draft(t1 - t0, *fed),
                          self.clock.verify(t2 - t1, tokens), tokens, tree.node_probs(), reused=reused,
                          overlap_time=overlap_time, draft_forwards=fed[0], draft_fed=fed[1], search_probs=curve,
                          path_ranks=tree.ranks(verdict.path))
        return verdict, stats

    def _draft_tree(self, conv: Conversation, plan: Plan, sampler, calibration, grammar=None):
        """(search, nodes it carried over, this step's tree, (drafter forwards, tokens fed) for it): last
        step's re-rooted search or a fresh one grown to the plan; no search and a bare root for a plain step."""
        if plan.budget <= 0:
            conv.trim(len(conv.ids) - 1)  # a plain step: drop any drafted subtree
            return None, 0, Tree.root_only(conv.ids[-1]), (0, 0)
        with on_stream(self.stream):
            search, reused = conv.take_search(), 0
            before = (search.forwards, search.fed_tokens) if search is not None else (0, 0)
            if search is not None:
                reused = search.resume(sampler, calibration)
            else:
                stem = torch.tensor(conv.ids[conv.dcache.get_seq_length():])
                search = TreeSearch.start(self.runner, conv.dcache, stem, sampler, plan.branch, conv.ids, calibration,
                                          grammar)
            search.grow(plan)
            tree = search.tree(plan.budget)
        wait_stream(self.stream)
        return search, reused, tree, (search.forwards - before[0], search.fed_tokens - before[1])

    def _verify(self, conv: Conversation, stem, tree: Tree, sampler, search, plan: Plan, grammar=None,
                logprobs=None) -> tuple[Verdict, float]:
        """The target pass over stem + tree: (verdict, seconds drafted during it)."""
        def run() -> Verdict:
            verdict = verify(self.target, conv.tcache, stem, tree, sampler, conv.ids, grammar, logprobs)
            sync(self.device)
            return verdict

        if self.overlap is not None and search is not None:
            if self.clock.replay:  # the pass, then what the replayed pass time lets the drafter do
                return self.overlap.replay(run(), search, plan, self.clock, stem.numel() + tree.size)
            return self.overlap.verify_while_drafting(run, search, plan)
        return run(), 0.0


class Parts(dict):
    """Seconds by part of a step's rest (stats.REST_PARTS), summed over the part's timed spans; `draft`
    and `verify` keep the measured seconds of drafting before the pass and of the pass."""

    draft = verify = 0.0

    @contextmanager
    def timing(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start
