"""Drafting while the target pass runs: the pass goes to a worker thread, the search keeps growing (up
to `factor` x the budget) so the next step's tree is partly drafted when the pass ends.

A drafting round that would outlast the pass would delay the step, so rounds stop at the pass's
expected end: both the pass and a round are timed as they run (moving averages).
"""
from __future__ import annotations

import threading
import time

import torch

from edgespec.base.device import on_stream, wait_stream
from edgespec.base.stats import Plan


class Overlap:
    def __init__(self, factor: int = 4, stream=None):
        self.factor, self.stream = factor, stream  # the drafter's side stream (None on a CPU)
        self.pass_estimate, self.round_estimate = float("inf"), 0.0  # seconds

    def verify_while_drafting(self, verify, search, plan: Plan):
        """Run `verify()` in a worker thread while growing `search`; returns (its verdict, seconds spent
        drafting meanwhile). The worker's exception is raised here."""
        box: dict = {}
        ended = threading.Event()  # not join/is_alive: a Ctrl-C inside join makes is_alive() lie (Python < 3.13)

        def work():
            try:
                with torch.no_grad():
                    box["verdict"] = verify()
                    box["done"] = time.perf_counter()
            except BaseException as err:  # re-raised in the caller's thread
                box["error"] = err
            finally:
                ended.set()

        worker = threading.Thread(target=work, name="edgespec-verify", daemon=True)
        start = time.perf_counter()
        worker.start()
        try:
            self._draft(search, Plan(plan.budget * self.factor, plan.max_depth, plan.branch, plan.batch),
                        ended, start + self.pass_estimate)
        finally:  # even on Ctrl-C: the pass writes the target's cache until it ends, so wait for it
            _wait(ended)
        drafted = time.perf_counter() - start
        if "error" in box:
            raise box["error"]
        took = box["done"] - start
        self.pass_estimate = took if self.pass_estimate == float("inf") else 0.5 * (self.pass_estimate + took)
        return box["verdict"], drafted

    def replay(self, verdict, search, plan: Plan, clock, tokens: int):
        """Under a replay clock (edgespec/base/clock.py): the pass ran already; grow `search` by the
        rounds that fit in the pass's replayed seconds (over `tokens` tokens), each round charged what
        its forward costs there. Returns (`verdict`, replayed seconds drafted): the same rounds on any
        machine, however busy."""
        budget, spent, last = clock.verify(0.0, tokens), 0.0, 0.0
        wider = Plan(plan.budget * self.factor, plan.max_depth, plan.branch, plan.batch)
        with on_stream(self.stream):
            while spent + last < budget:
                forwards, fed = search.forwards, search.fed_tokens
                done = search.grow(wider, rounds=1)
                last = clock.draft(0.0, search.forwards - forwards, search.fed_tokens - fed)
                spent += last
                if done:
                    break
        wait_stream(self.stream)
        return verdict, spent

    def _draft(self, search, wider: Plan, ended: threading.Event, deadline: float) -> None:
        with on_stream(self.stream):
            while not ended.is_set() and time.perf_counter() + self.round_estimate < deadline:
                t = time.perf_counter()
                if search.grow(wider, rounds=1):
                    break
                self.round_estimate = 0.7 * self.round_estimate + 0.3 * (time.perf_counter() - t)
        wait_stream(self.stream)


def _wait(ended: threading.Event) -> None:
    """Wait for the pass to end, through any Ctrl-C meanwhile (raised once it has)."""
    interrupted = None
    while not ended.is_set():
        try:
            ended.wait(0.05)
        except KeyboardInterrupt as err:
            interrupted = err
    if interrupted is not None:
        raise interrupted


def wanted(offload) -> bool:
    """Overlap when the pass waits on a (real or emulated) link."""
    if offload is None:
        return False
    return torch.device(offload.device).type == "cuda" or offload.transport.link_delay > 0
