"""Streaming statistics: per pass (one forward through all decoder layers) and cumulative."""
from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field


@dataclass
class PassStats:
    """Times in seconds. `transfer_time` is copy-side time (link delay included; on a CPU decoding too:
    its copy thread decodes; on CUDA the decode runs on its own stream, after the copy), `decode_time`
    the time spent decoding encoded bytes on the device, `compute_time` the time layers spent
    computing, `wait_time` the time compute was blocked waiting for a layer (copied and decoded)."""

    passes: int = 0
    layers: int = 0  # streamed layers consumed
    bytes: int = 0  # bytes that crossed the link
    transfer_time: float = 0.0
    compute_time: float = 0.0
    wait_time: float = 0.0
    wall_time: float = 0.0
    decode_time: float = 0.0

    @property
    def overlap(self) -> float:
        """Fraction of transfer time hidden behind compute: 1 - wait / transfer (1.0 if nothing moved)."""
        if self.transfer_time <= 0:
            return 1.0
        return min(1.0, max(0.0, 1.0 - self.wait_time / self.transfer_time))

    @property
    def bandwidth(self) -> float:
        """Achieved copy-side bytes per second."""
        return self.bytes / self.transfer_time if self.transfer_time > 0 else 0.0

    def add(self, other: "PassStats") -> None:
        for name in ("passes", "layers", "bytes", "transfer_time", "compute_time", "wait_time", "wall_time",
                     "decode_time"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict:
        return {**asdict(self), "overlap": round(self.overlap, 4), "bandwidth": self.bandwidth}


@dataclass
class OffloadStats:
    """`passes`: the most recent passes (up to `history`), oldest first; `total`: all since reset."""

    history: int = 1024
    passes: deque = field(default_factory=deque)
    total: PassStats = field(default_factory=PassStats)

    def record(self, one: PassStats) -> None:
        self.passes.append(one)
        while len(self.passes) > self.history:
            self.passes.popleft()
        self.total.add(one)

    @property
    def last(self) -> PassStats | None:
        return self.passes[-1] if self.passes else None

    def as_dict(self) -> dict:
        return {"total": self.total.as_dict(), "last": self.last.as_dict() if self.last else None}


@dataclass
class LayerTrace:
    """Raw marks of one layer in one pass, resolved into seconds later (CUDA events resolve lazily)."""

    wait_start: object
    compute_start: object
    compute_end: object = None
    ticket: object = None  # None for resident layers


@dataclass
class PassTrace:
    start: object
    layers: list = field(default_factory=list)
    end: object = None

    def resolve(self, transport) -> PassStats:
        s = PassStats(passes=1, wall_time=transport.elapsed(self.start, self.end))
        for lt in self.layers:
            s.compute_time += transport.elapsed(lt.compute_start, lt.compute_end)
            if lt.ticket is not None:
                s.layers += 1
                s.bytes += lt.ticket.nbytes
                s.wait_time += transport.elapsed(lt.wait_start, lt.compute_start)
                s.transfer_time += transport.transfer_time(lt.ticket)
                s.decode_time += transport.decode_time(lt.ticket)
        return s
