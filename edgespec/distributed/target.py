"""Stage 0's view of a target split across stages: `PipelineTarget` runs a verification pass as its
own layers (and the embeddings), then the other stages' in turn, and gets the target's verdict back
from the last stage, which walks the tree with the same sampler (the noise is a pure function of the
seed and the position, so the draw is the one a single process would make). `StagedCache` is the
target's cache as the conversation sees it: stage 0's own layers' entries and the length every
stage's cache has; keeping and cropping it sends the same surgery down the stages.

A stage that fails stops the pass with a StageFailedError naming it; the conversation's tokens are
untouched and the target's cache is emptied (every stage starts afresh), so the next answer, once the
stage is back, re-reads the conversation in its first pass.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from edgespec.base.errors import InvalidArgumentError, StageFailedError
from edgespec.core.kv import new_cache
from edgespec.core.tree import Tree
from edgespec.core.verify import TreeVerifier, Verdict, pass_inputs
from edgespec.distributed import wire
from edgespec.distributed.group import Coordinator, Timeouts, identity, release
from edgespec.distributed.hops import Net, emulated_seconds
from edgespec.distributed.layers import Range, StageModel, load_range, model_config
from edgespec.distributed.placement import Placement
from edgespec.distributed.wire import CROP, FORWARD, KEEP, PING, STOP, Header, Link


class PipelineTarget(TreeVerifier):
    """The target over `world` stages; this process is stage 0. `placement` says who holds which layers
    (edgespec/distributed/placement.py); the other stages run `edgespec stage` (edgespec/distributed/stage.py)."""

    def __init__(self, spec: str | None, placement: Placement, device: torch.device, *, bind: str = "127.0.0.1",
                 port: int = 0, timeouts: Timeouts = Timeouts(), allow_public: bool = False,
                 link_delay: float = 0.0, stream_quant: str | None = None, progress: bool = True, emulate=None):
        self.spec, self.placement, self.device, self.timeouts = spec, placement, device, timeouts
        self.config = model_config(spec, torch.float32)[0]
        self.coordinator = Coordinator(bind, port, placement.world, identity(spec), timeouts, allow_public)
        self.stream = dict(link_delay=link_delay, stream_quant=stream_quant, progress=progress)
        self.progress, self.plan, self.link, self.seq = progress, None, None, 0
        self.transport_s = 0.0  # the transport's own seconds per pass, measured at start (round_trip)
        self.emulate = emulate  # hops.Net: an emulated network on this stage's sends (benchmarks)
        self.stage: StageModel | None = None
        self.cache = StagedCache(self)

    @property
    def port(self) -> int:
        return self.coordinator.port

    @property
    def world(self) -> int:
        return self.placement.world

    def start(self) -> "PipelineTarget":
        """Gather the stages, check them, hand out the plan, load stage 0's part; shows the plan."""
        group, self.plan = self.coordinator.open(self._plan_for)
        names = [self.coordinator.name(r) for r in range(self.world)]
        self.link = Link(group, 0, names, self.timeouts.op, self.coordinator.watch, emulate=self.emulate)
        if self.stage is None:
            self.stage = load_range(self.spec, Range.of(self.plan, 0), self.device,
                                    **self.stream)
        self.cache.reset(new_cache(None))
        self.transport_s = self.round_trip()
        if self.progress:
            lines = self.describe() + [f"round trip through the stages: {self.transport_s * 1e3:.1f} ms per pass "
                                       "(the transport alone, measured)"]
            print("\n".join(f"edgespec: {line}" for line in lines), file=sys.stderr, flush=True)
        return self

    def round_trip(self, rounds: int = 5) -> float:
        """The transport's own seconds per pass (the median of `rounds` PINGs: a one-token pass's
        messages down every stage and a verdict back, no compute), less what emulated networks add:
        the per-pass constant a pass pays on top of its stages' compute and its bytes on the wire."""
        hidden = torch.zeros(1, self.config.hidden_size, dtype=self.model.dtype)
        seconds = []
        for _ in range(rounds):
            self.seq += 1
            head = Header(PING, self.seq, 0, 1, 1, hidden.shape[-1], wire.DTYPES.index(hidden.dtype))
            before, start = self.traffic(), time.perf_counter()
            self.link.send(1, [head.tensor(), torch.zeros(2, 1, dtype=torch.long),
                               torch.zeros(len(wire.SAMPLER), dtype=torch.float64), hidden])
            last = self.world - 1
            self.link.recv(last, (2 * self.link.recv_header(last).count + 1,))
            d = [a - b for a, b in zip(self.traffic(), before)]
            seconds.append(time.perf_counter() - start - emulated_seconds(self.nets(), (d[0], d[1]), (d[2], d[3])))
        return max(statistics.median(seconds), 0.0)

    def _plan_for(self, hellos: dict) -> dict:
        if self.plan is None:
            return self.placement.plan(self.config.num_hidden_layers, hellos, self.device)
        return self.plan  # a rejoin keeps the ranges every live stage has loaded

    def describe(self) -> list[str]:
        return [f"{self.coordinator.name(r)}: {Range.of(self.plan, r).describe()}"
                for r, rng in enumerate(self.plan["ranges"])]

    def traffic(self) -> tuple[int, int, int, int]:
        """Messages and bytes this stage sent down the pipeline, and got back (the verdicts), so far in
        this generation (a rejoin starts the counts again)."""
        if self.link is None:
            return 0, 0, 0, 0
        return (*self.link.sent, *self.link.received)

    def nets(self) -> list:
        """Each stage's emulated network on its sends (hops.Net; None: the real one), stage 0's first."""
        theirs = [self.coordinator.hellos.get(r, {}).get("emulate") for r in range(1, self.world)]
        return [self.emulate] + [Net(f"stage {r}", e[1], e[0]) if e else None for r, e in enumerate(theirs, 1)]

    @property
    def model(self):
        """Stage 0's model: embeddings (and its layers), what the engine reads the target's settings from."""
        return self.stage.model

    # ---- the pass ----------------------------------------------------------------------------
    def verify_tree(self, cache, stem: torch.Tensor, tree: Tree, sampler, history=None, grammar=None,
                    logprobs: int | None = None) -> Verdict:
        if grammar is not None or logprobs is not None:
            raise InvalidArgumentError("grammar constraints and log-probabilities are not available with a target "
                                       "split across stages yet: run without --stages, or leave them out")
        if cache is not self.cache:
            raise ValueError("a pipeline target verifies over its own StagedCache (engine.conversation.tcache)")
        if self.link is None:
            self._rejoin()
        past, s = cache.get_seq_length(), stem.numel()
        positions, allowed = pass_inputs(past, s, tree)
        try:
            hidden = self.stage.run(cache.local, positions, allowed, tokens=torch.cat([stem, tree.tokens[1:]]))
            verdict = self._remote(past, s, tree, sampler, history, hidden)
        except StageFailedError as err:
            raise self._failed(err) from None
        cache.length = past + positions.numel()
        return verdict

    def _remote(self, past: int, s: int, tree: Tree, sampler, history, hidden: torch.Tensor) -> Verdict:
        self.seq += 1
        hist = torch.as_tensor(history if sampler.repetition_penalty != 1.0 and history is not None else [],
                               dtype=torch.long)
        head = Header(FORWARD, self.seq, past, s, tree.tokens.numel(), hidden.shape[-1],
                      wire.DTYPES.index(hidden.dtype), hist.numel(), sampler.key)
        parts = [head.tensor(), torch.stack([tree.tokens, tree.parents]), wire.sampler_tensor(sampler)]
        self.link.send(1, parts + ([hist] if hist.numel() else []) + [hidden.cpu()])
        last = self.world - 1
        reply = self.link.recv_header(last)
        body = self.link.recv(last, (2 * reply.count + 1,)).tolist()
        return Verdict(body[: reply.count], body[reply.count:])

    def surgery(self, op: int, keep: torch.Tensor | None = None, length: int = 0) -> None:
        """Send KEEP / CROP / STOP down the stages (nothing while they are down: they start empty)."""
        if self.link is None:
            return
        self.seq += 1
        count = keep.numel() if keep is not None else length
        try:
            self.link.send(1, [Header(op, self.seq, count=count).tensor()] + ([keep] if keep is not None else []))
        except StageFailedError as err:
            raise self._failed(err) from None

    def _failed(self, err: StageFailedError) -> StageFailedError:
        """Empty the caches, leave the generation, and name the stage that failed (a stage whose
        heartbeat stopped, when one does within `dead_after`; else the one the error came from)."""
        self.cache.lost()
        release(self.link.group if self.link else None)
        self.link = None
        dead = self.coordinator.stale(self.timeouts.dead_after + 0.5) if err.stage != 0 else None
        stage = dead if dead is not None else err.stage
        name = self.coordinator.name(stage) if stage is not None else "a stage"
        why = str(err) if dead is None or dead == err.stage else f"no heartbeat ({err})"
        return StageFailedError(f"{name} failed: {why}. The conversation is kept; restart that stage (`edgespec "
                                f"stage --rank {stage} --coordinator {self.coordinator.bind}:{self.port} ...`) and "
                                "ask again: it rejoins.", stage)

    def _rejoin(self) -> None:
        """After a failure: a new generation with every stage back (their caches empty, as ours is)."""
        try:
            self.start()
        except StageFailedError as err:
            self.link = None
            raise StageFailedError(f"the pipeline is not back yet: {err}", err.stage) from None

    def close(self) -> None:
        """Stop every stage's loop (they exit) and leave the group."""
        try:
            self.surgery(STOP)
        except StageFailedError:
            pass
        release(self.link.group if self.link else None)
        self.link = None


class StagedCache:
    """The target's KV cache across the stages (a core.kv.KVCache): stage 0's own layers' entries
    (`local`) and `length`, the entries every stage holds; keep / crop_to apply here and go down the
    stages."""

    def __init__(self, target: PipelineTarget):
        self.target, self.local, self.length = target, new_cache(None), 0

    def get_seq_length(self) -> int:
        return self.length

    def layer_lengths(self) -> list[int]:
        return [self.length]  # a pass either completes on every stage or empties them all

    def keep(self, positions: torch.Tensor) -> None:
        self.local.keep(positions)
        self.length = positions.numel()
        self.target.surgery(KEEP, keep=positions.to(torch.long))

    def crop_to(self, length: int) -> None:
        if length >= self.length:
            return
        self.local.crop_to(length)
        self.length = length
        self.target.surgery(CROP, length=length)

    def reset(self, local) -> None:
        self.local, self.length = local, 0

    def lost(self) -> None:
        """The stages' caches are gone (a failure): empty this side too."""
        self.reset(new_cache(None))
