"""What is configured, one small dataclass per thing: how trees are drafted (`DraftConfig`) and what to
load (`LoadConfig`). The sampling settings are `sampling.SamplingConfig`. The CLI's options map onto
these fields (tests/test_cli.py checks that every option reaches one)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from edgespec.base.errors import InvalidArgumentError
from edgespec.base.stats import Plan

TREE_SCORES = ("calibrated", "draft")
LEAN_SWITCH = {"0": "transformers", "dynamic": "lean", "static": "static"}  # EDGESPEC_LEAN → DraftConfig.forward


def forward_from_env() -> str:
    """The drafter forward the EDGESPEC_LEAN switch asks for ("auto" when it is unset): 0 = transformers'
    forward, dynamic = the lean forward without CUDA graphs, static = lean over static buffers."""
    return LEAN_SWITCH.get(os.environ.get("EDGESPEC_LEAN", "auto"), "auto")


def text_config(config):
    """The decoder's config of a model config (a multimodal model's text part; itself otherwise)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


@dataclass(frozen=True)
class DraftConfig:
    """How the drafter builds trees: `max_depth` levels at most, `branch` children proposed per expanded
    node, `batch` nodes expanded per drafter forward; `overlap` drafting while the target pass runs ("auto":
    when the pass waits on a real or emulated link), growing the search up to `overlap_factor` x the
    budget meanwhile; `draft_temperature` sharpens greedy tree scores below 1; `tree_scores` ranks nodes
    by learnt hit rates ("calibrated") or raw draft probabilities ("draft"); `forward` is the drafter's
    forward (edgespec/core/draft_runner.py; its default reads EDGESPEC_LEAN: `forward_from_env`)."""

    max_depth: int = 32
    branch: int = 16
    batch: int = 64
    overlap: bool | str = "auto"
    overlap_factor: int = 4
    draft_temperature: float = 1.0
    tree_scores: str = "calibrated"
    forward: str = field(default_factory=forward_from_env)

    def __post_init__(self):
        if self.max_depth < 1 or self.branch < 1 or self.batch < 1 or self.overlap_factor < 1:
            raise InvalidArgumentError(f"max_depth, branch, batch and overlap_factor must be >= 1, got "
                                       f"{self.max_depth}, {self.branch}, {self.batch}, {self.overlap_factor}")
        if self.tree_scores not in TREE_SCORES:
            raise InvalidArgumentError(f"tree_scores must be 'calibrated' or 'draft', got {self.tree_scores!r}")
        if not self.draft_temperature > 0:
            raise InvalidArgumentError(f"draft_temperature must be > 0 (1 = the drafter's own probabilities), "
                                       f"got {self.draft_temperature}")

    def plan(self, budget: int) -> Plan:
        return Plan(budget, self.max_depth, self.branch, self.batch)


@dataclass(frozen=True)
class LoadConfig:
    """What `Engine.from_pretrained` loads: `target` / `drafter` (hub id, folder, .gguf; None = the
    embedded default), on `device`. `drafter="self"`: the target drafts for itself (its resident layers
    shared, its streamed layers as low-bit copies: edgespec/loading/self_drafter.py); no drafter: the same for an
    offloaded target when its memory plan fits (edgespec/loading/memory_plan.py), else — and for a `target_shape`
    target, or `draft_quant="none"` — the target's own quantized copy. `draft_quant`: the self-drafter's copies (nf4, fp4, int8, hqq4/3/2; "auto": planned) or a
    separate drafter's bitsandbytes copy (nf4 — "auto" —, int8, none). The target's layers stream from
    host RAM (`offload`) with `resident_layers` kept on the device (None = as fit, or as planned),
    `stream_quant`-encoded in host RAM, through a link slowed by `link_delay` seconds per layer
    (emulation); `target_shape` zero-pads the target into a bigger shape (benchmarks)."""

    target: str | None = None
    drafter: str | None = None
    device: str = "auto"
    draft_quant: str | None = "auto"
    offload: bool = True
    resident_layers: int | None = None
    link_delay: float = 0.0
    stream_quant: str | None = None
    target_shape: str | None = None
    progress: bool = True


def split_fields(kw: dict, *classes) -> list[dict]:
    """`kw` split by which dataclass has each field; an unknown name is an InvalidArgumentError."""
    names = [{f.name for f in fields(cls)} for cls in classes]
    unknown = set(kw) - set().union(*names)
    if unknown:
        raise InvalidArgumentError(f"unknown option(s) {sorted(unknown)}: expected fields of "
                                   + ", ".join(cls.__name__ for cls in classes))
    return [{k: v for k, v in kw.items() if k in n} for n in names]
