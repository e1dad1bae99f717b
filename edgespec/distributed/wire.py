"""What travels between stages: tensors only, never pickle. Every message is a fixed-layout int64
header (16 slots) followed by the payload tensors its op names, each of a shape and dtype the header
fixes, so a receiver allocates exactly what it reads and nothing it reads is ever executed.

    FORWARD  0 → 1 → … → last   header, tree (2, n+1) int64 [tokens; parents], sampler (6,) float64,
                                history (h,) int64 when the repetition penalty is on, hidden (q, H)
    VERDICT  last → 0           header, (2p + 1,) int64: the accepted path, then the committed tokens
    KEEP     0 → 1 → … → last   header, (count,) int64: the cache positions every stage keeps
    CROP     0 → 1 → … → last   header only: every stage drops its cache entries from `length` on
    STOP     0 → 1 → … → last   header only: the stage leaves its loop
    PING     0 → 1 → … → last → 0   a FORWARD's messages with no compute, answered as a VERDICT of an
                                empty path: the transport's own cost of a pass (target.round_trip)

`Link` sends and receives them over a torch.distributed process group (gloo between CPU processes,
NCCL-capable groups take the same calls): every wait has a deadline, and while it waits a `watch`
callback may raise (a stage whose heartbeat stopped, a new generation), so nothing hangs.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch

from edgespec.base.errors import StageFailedError

MAGIC, WIRE_VERSION, SLOTS = 0x45445350, 2, 16
FORWARD, VERDICT, KEEP, CROP, STOP, PING = 1, 2, 3, 4, 5, 6
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SAMPLER = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "draft_temperature")
IDLE = timedelta(days=7)  # a stage waiting for the next request (a chat between turns)


@dataclass
class Header:
    """The int64 slots: op, seq, then the op's sizes. FORWARD: past (cache entries before the pass),
    stem, nodes (tree nodes, root included), hidden (H), dtype (index in DTYPES), history (length) and
    key (the sampler's noise key); VERDICT: count (path length); KEEP: count; CROP: count (the length);
    PING: as FORWARD."""

    op: int
    seq: int = 0
    past: int = 0
    stem: int = 0
    nodes: int = 0
    hidden: int = 0
    dtype: int = 0
    history: int = 0
    key: int = 0
    count: int = 0

    FIELDS = ("op", "seq", "past", "stem", "nodes", "hidden", "dtype", "history", "key", "count")

    def tensor(self) -> torch.Tensor:
        values = [MAGIC, WIRE_VERSION] + [getattr(self, f) for f in self.FIELDS]
        return torch.tensor(values + [0] * (SLOTS - len(values)), dtype=torch.long)

    @classmethod
    def parse(cls, t: torch.Tensor, sender: str) -> "Header":
        v = t.tolist()
        if v[0] != MAGIC or v[1] != WIRE_VERSION:
            raise StageFailedError(f"{sender} sent a message that is not edgespec's wire format version "
                                   f"{WIRE_VERSION} (magic {v[0]:#x}, version {v[1]}): run the same edgespec on "
                                   "every machine.")
        return cls(**dict(zip(cls.FIELDS, v[2:])))

    @property
    def queries(self) -> int:
        return self.stem + max(self.nodes - 1, 0)


class Link:
    """Point-to-point sends and receives over `group` with a deadline on each (`timeout` seconds, or
    IDLE for a stage waiting for its next request); `watch()` is called every `poll` seconds while
    a wait lasts and may raise to abandon it. `names[r]` says who rank r is, for errors."""

    def __init__(self, group, rank: int, names: list[str], timeout: float, watch: Callable[[], None] = lambda: None,
                 poll: float = 0.05, emulate=None):
        self.group, self.rank, self.names = group, rank, names
        self.timeout, self.watch, self.poll = timeout, watch, poll
        self.emulate = emulate  # hops.Net: sleep as a message over that network would take (benchmarks)
        self.sent = [0, 0]  # messages, bytes
        self.received = [0, 0]  # messages (headers), bytes

    def send(self, dst: int, tensors: list[torch.Tensor]) -> None:
        what = f"sending to {self.names[dst]}"
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self.sent[0], self.sent[1] = self.sent[0] + 1, self.sent[1] + nbytes
        if self.emulate is not None:
            time.sleep(self.emulate.seconds(nbytes))
        parts = [t.contiguous() for t in tensors]  # alive until every send is done
        self._wait([self._start(lambda t=t: self.group.send([t], dst, 0), what, dst) for t in parts], what, dst)

    def recv(self, src: int, shape, dtype=torch.long, idle: bool = False) -> torch.Tensor:
        return self.recv_many(src, [(shape, dtype)], idle)[0]

    def recv_many(self, src: int, specs: list, idle: bool = False) -> list[torch.Tensor]:
        """Receive one tensor per (shape, dtype) in `specs`, in the order they were sent, all posted
        at once and waited for together (a message's parts in one wait, not one each)."""
        out = [torch.empty(shape, dtype=dtype) for shape, dtype in specs]
        self.received[1] += sum(t.numel() * t.element_size() for t in out)
        what = f"waiting for {self.names[src]}"
        works = [self._start(lambda t=t: self.group.recv([t], src, 0), what, src) for t in out if t.numel()]
        if works:
            self._wait(works, what, src, idle)
        return out

    @staticmethod
    def _start(call, what: str, peer: int):
        """Post a send or receive; gloo refuses at once on a connection already closed."""
        try:
            return call()
        except RuntimeError as err:
            raise StageFailedError(f"{what} failed: {_short(err)}", peer) from None

    def recv_header(self, src: int, idle: bool = False) -> Header:
        self.received[0] += 1
        return Header.parse(self.recv(src, (SLOTS,), idle=idle), self.names[src])

    def _wait(self, works: list, what: str, peer: int, idle: bool = False) -> None:
        """Wait for every one of `works` in one helper thread (gloo's own wait cannot be interrupted),
        watching meanwhile."""
        deadline = IDLE.total_seconds() if idle else self.timeout
        done, failed = threading.Event(), []

        def wait():
            try:
                for work in works:
                    work.wait(timedelta(seconds=deadline))
            except Exception as err:  # noqa: BLE001 — reported below, with who failed
                failed.append(err)
            done.set()

        threading.Thread(target=wait, daemon=True, name="edgespec-wire").start()
        start = time.monotonic()
        while not done.wait(self.poll):
            self.watch()
            if time.monotonic() - start > deadline:
                raise StageFailedError(f"{self.names[peer]} did not answer within {deadline:g} s ({what})", peer)
        if failed:
            raise StageFailedError(f"{what} failed: {_short(failed[0])}", peer)


def _short(err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text.split("] ", 1)[-1][:200]


def sampler_tensor(sampler) -> torch.Tensor:
    return torch.tensor([float(getattr(sampler, f)) for f in SAMPLER], dtype=torch.float64)


def sampler_from(values: torch.Tensor, key: int):
    """The stage-0 sampler rebuilt from its settings and noise key (its noise is a pure function of the
    key and the position: the last stage draws exactly what stage 0 would)."""
    from edgespec.core.sampling import Sampler

    v = dict(zip(SAMPLER, values.tolist()))
    return Sampler(v["temperature"], v["top_p"], key, draft_temperature=v["draft_temperature"], top_k=int(v["top_k"]),
                   min_p=v["min_p"], repetition_penalty=v["repetition_penalty"])
