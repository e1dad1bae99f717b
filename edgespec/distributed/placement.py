"""Who holds which layers: `--stages HOST:LAYERS[:RESIDENT],...` (stage 0 first), a small TOML file, or
an automatic split by each stage's free memory (RAM on a CPU, VRAM on a GPU) as its hello reports it.

    --stages 192.168.1.10:0-11,192.168.1.11:12-29          layers first-last, inclusive
    --stages 127.0.0.1:8,127.0.0.1:22:4                    counts in order; 4 of the 22 resident
    --stages 127.0.0.1:auto,192.168.1.11:auto              by free memory

    # stages.toml
    [[stage]]
    host = "192.168.1.10"
    layers = "0-11"
    [[stage]]
    host = "192.168.1.11"
    layers = "auto"   # or a count, or "first-last"
    resident = 8      # of its layers kept on its device; the rest stream from its RAM (default: all)
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from edgespec.base import memory
from edgespec.base.errors import InvalidArgumentError

AUTO = "auto"


@dataclass(frozen=True)
class StageSpec:
    host: str
    layers: str = AUTO  # "first-last" (inclusive), a count, or "auto"
    resident: int | None = None  # None: every layer of the range resident


@dataclass(frozen=True)
class Placement:
    stages: tuple[StageSpec, ...]

    def __post_init__(self):
        if len(self.stages) < 2:
            raise InvalidArgumentError("a split target needs at least two stages (stage 0 and one more)")

    @property
    def world(self) -> int:
        return len(self.stages)

    @classmethod
    def parse(cls, text: str) -> "Placement":
        """`HOST:LAYERS[:RESIDENT],...`; a path ending in .toml reads that file instead."""
        if text.strip().endswith(".toml"):
            return cls.from_toml(Path(text.strip()))
        stages = []
        for item in filter(None, (s.strip() for s in text.split(","))):
            host, layers, resident = _split(item)
            stages.append(StageSpec(host, layers, resident))
        return cls(tuple(stages))

    @classmethod
    def from_toml(cls, path: Path) -> "Placement":
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise InvalidArgumentError(f"cannot read the stages file {path}: {err}") from None
        items = data.get("stage")
        if not isinstance(items, list):
            raise InvalidArgumentError(f"{path}: expected [[stage]] tables with host, layers and resident")
        return cls(tuple(StageSpec(str(s.get("host", "127.0.0.1")), str(s.get("layers", AUTO)),
                                   _int(s.get("resident"), "resident")) for s in items))

    def plan(self, total: int, hellos: dict[int, dict], device) -> dict:
        """{"total", "ranges": [[first, last, resident]...], "free"} for a target of `total` layers."""
        free = [memory.free_memory(device)] + [int(hellos[r]["free"]) for r in range(1, self.world)]
        counts = self.counts(total, free)
        ranges, first = [], 0
        for spec, n in zip(self.stages, counts):
            ranges.append([first, first + n, spec.resident])
            first += n
        return {"total": total, "ranges": ranges, "free": free}

    def counts(self, total: int, free: list[int]) -> list[int]:
        """Layers per stage: as given, or split by free memory (every stage after 0 gets one at least)."""
        kinds = {spec.layers == AUTO for spec in self.stages}
        if kinds == {True}:
            return auto_split(total, free)
        if True in kinds:
            raise InvalidArgumentError("give every stage's layers, or none (auto): not some of them")
        counts, expect = [], 0
        for r, spec in enumerate(self.stages):
            first, n = _layers(spec.layers, expect)
            if first != expect or n < (0 if r == 0 else 1):
                raise InvalidArgumentError(f"stage {r} ({spec.host}) takes layers {spec.layers}: stages must take "
                                           f"contiguous ranges in order, starting at {expect}, one layer at least")
            counts.append(n)
            expect += n
        if expect != total:
            raise InvalidArgumentError(f"the stages take {expect} layers, the model has {total}")
        return counts


def auto_split(total: int, free: list[int]) -> list[int]:
    """Layers in proportion to each stage's free bytes, every stage after 0 one at least."""
    if total < len(free) - 1:
        raise InvalidArgumentError(f"{total} layers cannot be split across {len(free) - 1} stages after stage 0")
    weights = [max(f, 1) for f in free]
    counts = [int(total * w / sum(weights)) for w in weights]
    for r in range(1, len(counts)):
        counts[r] = max(counts[r], 1)
    while sum(counts) > total:
        r = max(range(len(counts)), key=lambda i: counts[i])
        counts[r] -= 1
    order = sorted(range(len(counts)), key=lambda i: -weights[i])
    for i in range(total - sum(counts)):
        counts[order[i % len(order)]] += 1
    return counts


def _split(item: str) -> tuple[str, str, int | None]:
    if item.startswith("["):  # [IPv6]:LAYERS
        host, _, rest = item[1:].partition("]:")
    else:
        host, _, rest = item.partition(":")
    layers, _, resident = rest.partition(":")
    if not host or not layers:
        raise InvalidArgumentError(f"--stages {item!r}: expected HOST:LAYERS[:RESIDENT], e.g. 192.168.1.11:12-29")
    return host, layers, _int(resident or None, "resident")


def _layers(text: str, start: int) -> tuple[int, int]:
    """(first, count) of "first-last" or "count"."""
    try:
        if "-" in text:
            a, b = (int(x) for x in text.split("-", 1))
            return a, b - a + 1
        return start, int(text)
    except ValueError:
        raise InvalidArgumentError(f"layers {text!r}: expected first-last (inclusive), a count, or auto") from None


def _int(value, what: str) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{what} {value!r}: expected a whole number") from None
    if n < 0:
        raise InvalidArgumentError(f"{what} must be >= 0, got {n}")
    return n
