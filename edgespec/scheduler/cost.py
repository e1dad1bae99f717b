"""Cost model: seconds per target pass against pass tokens, per tree build against budget, and a
per-step overhead (cache pruning, re-rooting the search, planning, detokenizing: fixed per step, so
ignoring it would make every step look cheaper than it is and favour too-small trees).

Both are `Curve`s (monotone piecewise-linear over log-spaced buckets, EMA-refined online). The
pass curve can be calibrated up front by a short profiling run supplied by the engine and cached
in a small JSON file keyed by machine + model, so later sessions start with a measured curve.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Callable, Iterable

from edgespec.base.files import cache_dir, write_file
from edgespec.scheduler.curve import DEFAULT_BUCKETS, Curve
from edgespec.base.stats import StepStats

CALIBRATION_SIZES = (1, 4, 16, 64, 256, 1024)
DRAFT_CALIBRATION_SIZES = (1, 4, 16, 64, 256)  # larger budgets extrapolate (drafting grows ~linearly)
LONG_STEM = 16  # steps feeding more pending tokens than this (prefill) say little about drafting


class CostModel:
    """pass_time(n): target pass over n tokens; draft_time(k): building a k-node tree (0 for k=0)."""

    def __init__(self, pass_curve: Curve | None = None, draft_curve: Curve | None = None,
                 buckets=DEFAULT_BUCKETS, alpha: float = 0.3):
        self.pass_curve = pass_curve or Curve(buckets, alpha, prior_exponent=0.0, mode="add", jump=0.15)
        # drafting takes milliseconds and is noisier: only a 30% surprise counts as a change. It stays at
        # its bucket: a step's drafting before the pass depends on what it carried over and what it drafted
        # during the last pass, not on the machine, and on a GPU it grows with the tree's depth, not its
        # size (one forward per level: 16 nodes 25 ms, 256 nodes 51 ms on an H200), so spreading a surprise
        # at 64 nodes to every size made big trees look several times their cost
        self.draft_curve = draft_curve or Curve(buckets, alpha, prior_exponent=1.0, mode="mul", jump=0.3,
                                                spread=False)
        self.alpha = alpha
        self.overhead: float | None = None  # seconds per step besides drafting and the pass (EMA)

    @property
    def ready(self) -> bool:
        """True once both curves hold at least one measurement."""
        return self.pass_curve.known and self.draft_curve.known

    def pass_time(self, n: float) -> float:
        return self.pass_curve(max(n, 1))

    def draft_time(self, k: float) -> float:
        return 0.0 if k <= 0 else self.draft_curve(k)

    def step_time(self, k: int, pending: int = 1) -> float:
        """Predicted seconds for one step with budget k and `pending` stem tokens."""
        return self.draft_time(k) + self.pass_time(k + pending) + (self.overhead or 0.0)

    def observe(self, step: StepStats) -> None:
        """Refine both curves from one engine step."""
        if step.verify_tokens > 0:
            self.pass_curve.observe(step.verify_tokens, step.verify_time)
        if step.overhead_time > 0:
            o = step.overhead_time
            self.overhead = o if self.overhead is None else (1 - self.alpha) * self.overhead + self.alpha * o
        pending = step.verify_tokens - step.tree_size
        if step.budget > 0 and step.tree_size > 0 and pending <= LONG_STEM:
            self.draft_curve.observe(step.budget, step.draft_time)

    def calibrate(self, measure_fn: Callable[[int], float], sizes: Iterable[int] = CALIBRATION_SIZES,
                  draft_fn: Callable[[int], float] | None = None,
                  draft_sizes: Iterable[int] = DRAFT_CALIBRATION_SIZES) -> "CostModel":
        """Measure the pass at each size (and drafting at each draft size); fills the buckets directly."""
        for n in sorted(sizes):
            self.pass_curve.set(self.pass_curve.nearest(n), float(measure_fn(int(n))))
        for k in sorted(draft_sizes) if draft_fn is not None else ():
            self.draft_curve.set(self.draft_curve.nearest(k), float(draft_fn(int(k))))
        return self

    # ---- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"pass": self.pass_curve.to_dict(), "draft": self.draft_curve.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        return cls(Curve.from_dict(d["pass"]), Curve.from_dict(d["draft"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CostModel":
        return cls.from_dict(json.loads(text))

    @classmethod
    def load_or_calibrate(cls, path: str | os.PathLike | None, key: str, measure_fn: Callable[[int], float],
                          sizes: Iterable[int] = CALIBRATION_SIZES,
                          draft_fn: Callable[[int], float] | None = None,
                          draft_sizes: Iterable[int] = DRAFT_CALIBRATION_SIZES) -> "CostModel":
        """The cached model for `key`, or a fresh calibration that is then cached under it."""
        path = Path(path) if path else default_cache_path()
        entries = _read_cache(path)
        if key in entries:
            try:
                return cls.from_dict(entries[key])
            except (KeyError, TypeError, ValueError):
                pass  # a damaged entry: measure again
        model = cls().calibrate(measure_fn, sizes, draft_fn, draft_sizes)
        entries[key] = model.to_dict()
        _write_cache(path, entries)
        return model


def default_cache_path() -> Path:
    """$EDGESPEC_CACHE/costs.json, else ~/.cache/edgespec/costs.json."""
    return cache_dir() / "costs.json"


def machine_key(model: str, extra: str = "") -> str:
    """A cache key naming this machine and the model (plus e.g. dtype or offload settings)."""
    parts = [platform.node(), platform.machine(), _gpu_name(), model, extra]
    return "|".join(p for p in parts if p)


def _gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    except Exception:  # noqa: BLE001 - the key only loses detail
        return ""


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data.get("entries", {}) if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, entries: dict) -> None:
    """Write atomically; a read-only cache directory only costs a recalibration next time."""
    try:
        write_file(path, json.dumps({"version": 1, "entries": entries}, indent=1, sort_keys=True))
    except OSError:
        pass
