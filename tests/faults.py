"""A seeded fault injector for tests: raise (KeyboardInterrupt by default) or cancel at a random instant
inside one part of a step — the drafter's forward, the target's pass (mid-layer), the pruning after
a step, the detokeniser — or anywhere in edgespec's own code.

`FaultInjector(seed).arm(engine, site)` picks where and when (the n-th event of that site, n drawn
from the seeded generator) and installs the fault; `disarm()` removes it; `fired` says whether it
went off. Sites:

- "draft": a forward hook on a random module of a random drafter layer (the lean forward calls the
  projections and the MLP as modules, transformers' the whole layer), raising on its n-th call;
- "pass": the same on the target's layers (after a layer's attention: its cache entries written,
  the later layers' not);
- "prune": a line tracer over the functions that prune, crop and commit (kv, static_kv,
  conversation, the search's re-rooting, the run's wind-up), raising at its n-th line;
- "detok": the tokenizer's decode, raising on its n-th call;
- "anywhere": a line tracer over every edgespec module the step runs through;
- "stream": a line tracer over the offload streamer's ring (its hooks, waits and restarts).
`arm(..., at=n)` puts the fault at the n-th event instead (a sweep over every instant).
"""
from __future__ import annotations

import os
import random
import sys

import edgespec

SITES = ("draft", "pass", "prune", "detok", "anywhere")
ROOT = os.path.dirname(edgespec.__file__)
PRUNING = {"commit", "keep", "crop_to", "prune_to_path", "trim", "_even_out", "check", "reroot", "_reroot_at",
           "_finish", "sync", "rollback"}
SPANS = {"draft": 60, "pass": 12, "prune": 400, "detok": 6, "anywhere": 6000, "stream": 400}  # n: 1..span
STREAMER = os.path.join(ROOT, "offload", "streamer.py")


class FaultInjector:
    def __init__(self, seed: int, error=KeyboardInterrupt):
        self.rng = random.Random(seed)
        self.error = error  # an exception class, or a callable run instead of raising (e.g. a cancel)
        self.fired = False
        self._undo: list = []

    def arm(self, engine, site: str, at: int | None = None) -> None:
        self.fired, self.site = False, site
        self.left = at or self.rng.randint(1, SPANS[site])
        if site in ("draft", "pass"):
            self._hook(engine.drafter if site == "draft" else engine.target)
        elif site == "detok":
            self._decode(engine.tokenizer)
        elif site == "stream":
            self._trace(None, STREAMER)
        else:
            self._trace(PRUNING if site == "prune" else None)

    def disarm(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _go(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.fired = True
            if isinstance(self.error, type) and issubclass(self.error, BaseException):
                raise self.error(f"injected at {self.site}")
            self.error()

    def _hook(self, model) -> None:
        layer = self.rng.choice(list(model.get_decoder().layers))
        attn = layer.self_attn
        module = self.rng.choice([layer, attn, attn.k_proj, attn.v_proj, attn.o_proj, layer.mlp])
        if self.rng.random() < 0.5:
            handle = module.register_forward_pre_hook(lambda m, a: self._go())
        else:
            handle = module.register_forward_hook(lambda m, a, o: self._go())
        self._undo.append(handle.remove)

    def _decode(self, tokenizer) -> None:
        real = tokenizer.decode

        def decode(*args, **kwargs):
            self._go()
            return real(*args, **kwargs)

        tokenizer.decode = decode
        self._undo.append(lambda: delattr(tokenizer, "decode"))

    def _trace(self, names: set[str] | None, root: str = ROOT) -> None:
        def lines(frame, event, arg):
            if event == "line":
                self._go()
            return lines

        def calls(frame, event, arg):
            code = frame.f_code
            if code.co_filename.startswith(root) and (names is None or code.co_name in names):
                return lines
            return None

        sys.settrace(calls)
        self._undo.append(lambda: sys.settrace(None))
