"""A monotone piecewise-linear cost curve over log-spaced buckets, refined online.

Each bucket (1, 2, 4, …, 4096 by default) holds a time. Between known buckets the curve
interpolates linearly; beyond them it extrapolates linearly from the two outermost points (never
downwards, and on the left never below the straight line through the origin, since real costs
have a fixed overhead). With a single known point the curve is `y0 * (x / x0) ** prior_exponent`:
0 means flat (a bandwidth-bound pass), 1 means proportional (drafting).

An observation y at x updates the nearest bucket b:

* an empty bucket takes it outright (moved along the current shape first, `y * f(b) / f(x)`,
  so the bucket grid does not bias it);
* a known one by an exponential moving average (`alpha`), or outright when it is off by more
  than `jump` (15%): the machine got slower or faster (another process on the link, a throttled
  GPU), and the scheduler should see it at once.

A change at a bucket measured recently is news about the machine, so it spreads to the other
buckets (after a jump to all of them, whose measurements predate it, in full if b was measured
within the last `RECENT` observations; otherwise the more, the longer they have gone unmeasured): additively for `mode="add"` (a slower link adds the same
seconds to every pass), as a factor for `mode="mul"` (a busier GPU slows every draft alike). A
change at a bucket not measured for a while is news about the shape and stays local. "Recently"
fades by `memory` per observation since the bucket's last update. Finally the
newest value wins on monotonicity: buckets that contradict it (higher below it, lower above it)
are moved to it, not dropped (a dropped point would let the curve extrapolate steeply from a new
bucket next to an old one: one drafting step at 128 nodes, above the calibration's 256, once made
a 512-node tree look four times its cost).
"""
from __future__ import annotations

import math

import numpy as np

DEFAULT_BUCKETS = tuple(2**i for i in range(13))  # 1 … 4096
RECENT = 4  # a jump at a bucket measured within this many observations spreads in full


class Curve:
    """y = f(x) for x >= 1 (seconds against tokens or nodes), monotone non-decreasing."""

    def __init__(self, buckets=DEFAULT_BUCKETS, alpha: float = 0.3, prior_exponent: float = 0.0,
                 mode: str = "add", jump: float = 0.15, memory: float = 0.5, spread: bool = True):
        if mode not in ("add", "mul"):
            raise ValueError(f"mode must be 'add' or 'mul', got {mode!r}")
        self.buckets = tuple(sorted(int(b) for b in buckets))
        self.alpha = alpha  # EMA weight of an observation in its bucket
        self.prior_exponent = prior_exponent
        self.mode, self.jump, self.memory = mode, jump, memory
        self.spread = spread  # False: every change stays at its bucket (news about the shape, never the machine)
        self.values: dict[int, float] = {}
        self.stamps: dict[int, int] = {}  # observation count at each bucket's last update
        self.clock = 0

    @property
    def known(self) -> bool:
        return bool(self.values)

    def points(self) -> list[tuple[int, float]]:
        return sorted(self.values.items())

    # ---- evaluation -------------------------------------------------------------------------
    def __call__(self, x: float) -> float:
        """The curve at x (NaN while nothing is known)."""
        pts = self.points()
        if not pts:
            return math.nan
        x = max(float(x), 1e-9)
        if len(pts) == 1:
            x0, y0 = pts[0]
            return y0 * (x / x0) ** self.prior_exponent
        if x <= pts[0][0]:
            return _left(pts, x)
        if x >= pts[-1][0]:
            return _right(pts, x)
        return _inside(pts, x)

    # ---- updates ----------------------------------------------------------------------------
    def observe(self, x: float, y: float) -> None:
        """Blend one measurement (y seconds at size x) into the curve."""
        if not (x >= 1 and y > 0 and math.isfinite(y)):
            return
        self.clock += 1
        b = self.nearest(x)
        target = y * self._shape_ratio(b, x)
        old = self.values.get(b)
        if old is None:  # a new bucket fills in shape; it says nothing about a change
            self.set(b, target)
            return
        jumped = abs(target / old - 1) > self.jump
        new = target if jumped else old + self.alpha * (target - old)
        if self.spread:
            self._spread(b, old, new, everywhere=jumped)
        self.set(b, new)

    def freshness(self, b: int) -> float:
        """1 for a bucket updated at the previous observation, fading by `memory` per observation."""
        return self.memory ** max(self.clock - self.stamps.get(b, -10**9) - 1, 0)

    def _spread(self, b: int, old: float, new: float, everywhere: bool) -> None:
        """Carry a change at bucket b over to the others, weighted by how fresh b is."""
        recent = self.clock - self.stamps.get(b, -10**9) <= RECENT
        source = 1.0 if everywhere and recent else self.freshness(b)
        for other, v in self.values.items():
            w = source * (1.0 if everywhere else 1 - self.freshness(other))
            if other == b or w <= 0:
                continue
            if self.mode == "add":
                self.values[other] = max(v + w * (new - old), v / 20)  # stays positive
            else:
                self.values[other] = v * (new / old) ** w

    def set(self, b: int, y: float) -> None:
        """Store y at bucket b outright; buckets that now contradict monotonicity are moved to y (kept: a
        dropped point would leave the curve to extrapolate from a single new one, steeply, far past it)."""
        self.values[b] = float(y)
        self.stamps[b] = self.clock
        for other, v in list(self.values.items()):
            if other < b and v > y or other > b and v < y:
                self.values[other] = float(y)

    def nearest(self, x: float) -> int:
        lx = math.log2(max(x, 1e-9))
        return min(self.buckets, key=lambda b: abs(math.log2(b) - lx))

    def _shape_ratio(self, b: int, x: float) -> float:
        """f(b) / f(x) on the current curve (the prior shape while empty)."""
        fb, fx = self(b), self(x)
        if self.known and fx > 0 and fb > 0:
            return fb / fx
        return (b / x) ** self.prior_exponent

    # ---- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"buckets": list(self.buckets), "alpha": self.alpha, "prior_exponent": self.prior_exponent,
                "mode": self.mode, "jump": self.jump, "memory": self.memory, "spread": self.spread,
                "values": {str(k): v for k, v in self.points()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Curve":
        c = cls(d.get("buckets", DEFAULT_BUCKETS), d.get("alpha", 0.3), d.get("prior_exponent", 0.0),
                d.get("mode", "add"), d.get("jump", 0.15), d.get("memory", 0.5), d.get("spread", True))
        c.values = {int(k): float(v) for k, v in d.get("values", {}).items()}
        return c


def _line(p: tuple[float, float], q: tuple[float, float], x: float) -> float:
    (x0, y0), (x1, y1) = p, q
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _left(pts, x: float) -> float:
    """Left of the first point: the line through the first two, between y0·x/x0 and y0."""
    x0, y0 = pts[0]
    return min(max(_line(pts[0], pts[1], x), y0 * x / x0), y0)


def _right(pts, x: float) -> float:
    """Right of the last point: the line through the last two, never falling."""
    return max(_line(pts[-2], pts[-1], x), pts[-1][1])


def _inside(pts, x: float) -> float:
    xs, ys = zip(*pts)
    return float(np.interp(x, xs, ys))
