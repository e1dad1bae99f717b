"""The scheduler's start-up calibration: target pass time against tree size and drafting time against
budget, measured once per machine, models and link (cached by the scheduler's cost model), with a
progress bar that appears only when something is measured."""
from __future__ import annotations

import torch

from edgespec.base.config import DraftConfig
from edgespec.base.device import compute_dtype, model_device
from edgespec.scheduler import timing
from edgespec.scheduler.cost import CALIBRATION_SIZES, DRAFT_CALIBRATION_SIZES, CostModel, machine_key


def startup_costs(target, draft, offload, config: DraftConfig, progress: bool = True, clock=None,
                  prefix: list[int] | None = None) -> dict:
    """make_scheduler's keyword arguments for a cached (or measured) calibration of this pair; under a
    replay clock (edgespec/base/clock.py), the cost file's pass times and the replayed cost of the
    drafter's real trees (not cached: the file is the measurement). `prefix`: the tokens the trees are
    drafted under (a real prompt: on random tokens the drafter is unsure and its trees shallow, fewer
    forwards than a real answer's trees take; None: 64 random tokens)."""
    gen = torch.Generator().manual_seed(0)
    prefix = prefix or torch.randint(0, draft.config.vocab_size, (64,), generator=gen).tolist()
    if clock is not None and clock.replay:
        return {"cost": replayed_costs(draft, config, clock, prefix)}
    runs = len(CALIBRATION_SIZES) + len(DRAFT_CALIBRATION_SIZES)
    bar = _LazyBar("edgespec: calibrating the scheduler (once per machine and models)", progress, runs)
    device = model_device(target)
    return {"cache_key": pair_key(target, draft, offload, config),
            "measure_fn": bar.wrap(lambda n: timing.time_passes(target, device, [n], past=64)[0]["pass_s"]),
            "draft_fn": bar.wrap(lambda k: timing.time_drafts(draft, prefix, [k], config.plan,
                                                       draft_temperature=config.draft_temperature)[0]["draft_s"])}


def replayed_costs(draft, config: DraftConfig, clock, prefix: list[int]) -> CostModel:
    """The start-up calibration as the machine of `clock`'s costs would measure it: its pass times, and
    its drafting time for the trees this drafter really builds under `prefix` at each calibration budget."""

    def draft_fn(k: int) -> float:
        row = timing.time_drafts(draft, prefix, [k], config.plan, repeats=0,
                                 draft_temperature=config.draft_temperature)[0]
        return clock.draft(row["draft_s"], row["forwards"], row["fed"])

    return CostModel().calibrate(lambda n: clock.verify(0.0, n), CALIBRATION_SIZES, draft_fn, DRAFT_CALIBRATION_SIZES)


def pair_key(target, draft, offload, config: DraftConfig) -> str:
    """What the measured costs depend on: the machine, both models and how they run, the link."""
    link = "plain" if offload is None else (
        f"offload:resident={offload.resident_layers}:delay={offload.transport.link_delay}:q={offload.quantize}")
    pair = f"{model_name(target)}+draft:{model_name(draft.model)}:{draft.describe()}"
    if config.draft_temperature != 1.0:  # other tree shapes, other drafting costs
        pair += f":dt{config.draft_temperature:g}"
    return machine_key(pair, f"{link}:{compute_dtype(target)}")


def model_name(model) -> str:
    name = str(getattr(model.config, "name_or_path", "")) or type(model).__name__
    quant = getattr(model, "quantization_config", None) or getattr(model.config, "quantization_config", None)
    bits = getattr(quant, "bnb_4bit_quant_type", None) if getattr(quant, "load_in_4bit", False) else (
        "int8" if getattr(quant, "load_in_8bit", False) else None)
    return f"{name}:{bits}" if bits else name


class _LazyBar:
    """A progress bar that appears only if the wrapped measurements actually run (a cache miss)."""

    def __init__(self, desc: str, enabled: bool, total: int | None = None):
        self.desc, self.enabled, self.total, self.bar = desc, enabled, total, None

    def wrap(self, fn):
        def measured(n):
            if self.bar is None and self.enabled:
                from tqdm.auto import tqdm

                self.bar = tqdm(desc=self.desc, unit="run", total=self.total)
            value = fn(n)
            if self.bar is not None:
                self.bar.update()
            return value

        return measured
