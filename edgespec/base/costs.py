"""A machine's measured step costs, as a JSON cost file: what a step costs there, replayed anywhere.

    {"version": 1, "source": "where the numbers come from",
     "pass": [[tokens, seconds], ...],                  # target pass vs tokens in it (stem + tree)
     "draft": {"per_forward": s, "per_token": s},       # one drafter forward feeding b tokens: per_forward + b * per_token
     "rest": s,                                         # per-step rest (planning, pruning, re-rooting, text, ...)
     "builds": [{"budget": K, "depth": d, "seconds": s}, ...]}   # optional: tree builds, for the record

The pass is piecewise linear through its points (sorted by tokens), extended past the last two (and
flat below the first). Drafting is charged per drafter forward: a tree's cost is the sum of its
forwards, so a tree grown from a carried-over search, or during the pass, costs what it drafts. A
file is written from a real run's steps (`Costs.from_steps`: `edgespec bench|profile --write-costs`)
or by hand from measured figures (benchmarks/costs/).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from edgespec.base.errors import InvalidArgumentError
from edgespec.base.files import write_file


@dataclass
class Costs:
    passes: list[tuple[float, float]]  # (tokens, seconds), ascending tokens
    per_forward: float  # seconds per drafter forward
    per_token: float  # seconds per token a drafter forward feeds
    rest: float  # seconds per step besides drafting and the pass
    source: str = ""
    builds: list[dict] = field(default_factory=list)

    def pass_time(self, tokens: float) -> float:
        """Seconds for a target pass over `tokens` tokens."""
        pts = self.passes
        if len(pts) == 1 or tokens <= pts[0][0]:
            return pts[0][1]
        i = next((j for j in range(1, len(pts)) if tokens <= pts[j][0]), len(pts) - 1)
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        return max(0.0, y0 + (y1 - y0) * (tokens - x0) / (x1 - x0))

    def draft_time(self, forwards: int, fed: int) -> float:
        """Seconds for `forwards` drafter forwards feeding `fed` tokens in all."""
        return forwards * self.per_forward + fed * self.per_token

    # ---- files -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {"version": 1, "source": self.source, "pass": [[round(t, 2), s] for t, s in self.passes],
               "draft": {"per_forward": self.per_forward, "per_token": self.per_token}, "rest": self.rest}
        return out | ({"builds": self.builds} if self.builds else {})

    @classmethod
    def from_dict(cls, d: dict, where: str = "costs") -> "Costs":
        try:
            passes = sorted((float(t), float(s)) for t, s in d["pass"])
            draft = d["draft"]
            costs = cls(passes, float(draft["per_forward"]), float(draft["per_token"]), float(d["rest"]),
                        str(d.get("source", "")), list(d.get("builds", [])))
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidArgumentError(f"{where}: not a cost file ({err!r}); it needs 'pass' [[tokens, seconds], ...], "
                                       "'draft' {per_forward, per_token} and 'rest' (see edgespec/base/costs.py)") from None
        numbers = [s for _, s in passes] + [t for t, _ in passes] + [costs.per_forward, costs.per_token, costs.rest]
        if not passes or any(not math.isfinite(x) or x < 0 for x in numbers):
            raise InvalidArgumentError(f"{where}: the pass points and the seconds must be finite and >= 0, "
                                       "with at least one pass point")
        if len({t for t, _ in passes}) < len(passes):
            raise InvalidArgumentError(f"{where}: two pass points at the same token count")
        return costs

    @classmethod
    def load(cls, path: str | Path) -> "Costs":
        try:
            data = json.loads(Path(path).read_text())
        except OSError as err:
            raise InvalidArgumentError(f"--costs {path}: cannot read it ({err.strerror})") from None
        except ValueError as err:
            raise InvalidArgumentError(f"--costs {path}: not JSON ({err})") from None
        return cls.from_dict(data if isinstance(data, dict) else {}, f"--costs {path}")

    def save(self, path: str | Path) -> None:
        write_file(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    # ---- from a run ------------------------------------------------------------------------
    @classmethod
    def from_steps(cls, steps, source: str = "") -> "Costs":
        """The costs a run's steps (base.stats.StepStats) measured: pass time by tokens (mean per
        power-of-two bucket), drafting per forward and per fed token (least squares, >= 0), the mean rest."""
        steps = list(steps)
        if not steps:
            raise InvalidArgumentError("no steps to take costs from: run at least one generation")
        per_forward, per_token = _fit_draft([(s.draft_forwards, s.draft_fed, s.draft_time) for s in steps
                                             if s.draft_forwards > 0])
        rest = sum(s.overhead_time for s in steps) / len(steps)
        return cls(_pass_points([(s.verify_tokens, s.verify_time) for s in steps]), per_forward, per_token,
                   rest, source)


def _pass_points(samples: list[tuple[int, float]]) -> list[tuple[float, float]]:
    buckets: dict[int, list[tuple[int, float]]] = {}
    for tokens, seconds in samples:
        buckets.setdefault(max(0, int(tokens)).bit_length(), []).append((tokens, seconds))
    return [(sum(t for t, _ in b) / len(b), sum(s for _, s in b) / len(b)) for _, b in sorted(buckets.items())]


def _fit_draft(samples: list[tuple[int, int, float]]) -> tuple[float, float]:
    """(per_forward, per_token) minimising the squared error of forwards * a + fed * b over the steps."""
    if not samples:
        return 0.0, 0.0
    sff = sum(f * f for f, _, _ in samples)
    stt = sum(t * t for _, t, _ in samples)
    sft = sum(f * t for f, t, _ in samples)
    sfy = sum(f * y for f, _, y in samples)
    sty = sum(t * y for _, t, y in samples)
    det = sff * stt - sft * sft
    if det > 1e-9 * max(sff * stt, 1.0):
        a, b = (sfy * stt - sty * sft) / det, (sty * sff - sfy * sft) / det
        if a >= 0 and b >= 0:
            return a, b
    # one term alone: the better of per forward only or per token only
    a_only, b_only = sfy / sff, (sty / stt if stt else 0.0)
    err = lambda a, b: sum((f * a + t * b - y) ** 2 for f, t, y in samples)  # noqa: E731
    return (a_only, 0.0) if err(a_only, 0.0) <= err(0.0, b_only) else (0.0, b_only)
