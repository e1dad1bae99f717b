"""Memory planning for a target that drafts for itself: how many target layers stay on the device
(resident, shared exactly by the drafter) and which low-bit codec the streamed layers' draft copies use.

From the free memory (the GPU's; on a CPU the available host RAM, as edgespec/base/memory.py reads it), less
what the target's outside part takes, the KV caches of both models for `KV_TOKENS` tokens and the
activations of the largest tree (`TREE_TOKENS` tokens on that context, memory.pass_bytes), and a margin:

    resident x layer + (layers - resident) x copy(codec) + ring x slot  <=  budget

so each layer kept resident costs its dense bytes and saves its copy. On CUDA, `resident` is the largest
count that fits with the first codec of `ORDER` whose copies fit at all (every layer resident when the
whole target fits: no copies then). On a CPU, as for any offloaded target, no layer stays resident unless
asked (streaming is what is exercised) and the codec is the first whose copies fit in RAM besides the
streamed layers' host buffers. `resident` and `codec` given override the plan (the other is planned
around them); a plan that does not fit says what would. The out-of-memory back-off then works as for
any offloaded target: resident layers move to streaming and the drafter copies them (selfdraft.py).

ORDER is by measurement (benchmarks/self_drafter_cpu.md: tokens per target pass on 5 MT-Bench first turns,
greedy): int8 copies keep about twice the tokens per pass of any 4-bit codec (SmolLM2-135M at K=256 with
no layer resident: 17.8 against nf4's 8.0 and hqq4's 7.4; Qwen2.5-Coder-1.5B Q4_K_M: 22.9), more than
keeping half the layers exact with nf4 copies does (SmolLM2: 9.7), so int8 comes first although its
copies take 1.8x nf4's bytes; then nf4 (bitsandbytes' kernels; hqq4 keeps no more tokens per pass at the
same bytes), then HQQ's 3 and 2 bits, which lose most of the acceptance (SmolLM2: 2.4 and 1.0 tokens
per pass), only for when nothing else fits. Measured on a CPU; a GPU run may reorder int8 and nf4.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgespec.loading import lowbit
from edgespec.base import memory
from edgespec.base.config import text_config
from edgespec.base.errors import OutOfMemoryError
from edgespec.base import reach

ORDER = ("int8", "nf4", "hqq3", "hqq2")
KV_TOKENS = 4096  # context the KV caches are reserved for (or the model's window, if shorter)
TREE_TOKENS = 1024  # the largest tree whose target-pass activations are reserved
MARGIN = 0.05  # of the free memory: allocator fragmentation, the CUDA context's growth


@dataclass(frozen=True)
class PairSizes:
    """What the plan weighs, in device bytes: per decoder layer dense (`layer`) and as each codec's copy
    (`copy`), the target's part outside the layers still to be placed, one streaming slot, the reserve."""

    layers: int
    layer: int
    copy: dict
    outside: int
    slot: int
    ring: int
    reserve: int


@dataclass(frozen=True)
class PairPlan:
    resident: int
    codec: str | None  # None: every layer resident, no copies
    free: int
    used: int  # device bytes the plan places (weights, copies, slots) plus the reserve
    reserve: int
    given: tuple[str, ...]  # which of resident / codec the user fixed

    def describe(self) -> dict:
        return {"resident_layers": self.resident, "draft_codec": self.codec, "free_bytes": self.free,
                "planned_bytes": self.used, "reserved_bytes": self.reserve, "given": list(self.given)}

    def line(self) -> str:
        how = f"given {' and '.join(self.given)}" if self.given else "automatic"
        return (f"memory plan ({how}): {self.resident} resident, {self.codec or 'no'} copies, "
                f"{self.used / 2**30:.2f} of {self.free / 2**30:.2f} GiB free (reserve "
                f"{self.reserve / 2**30:.2f} GiB for KV caches and the largest tree)")


def plan_pair(sizes: PairSizes, free: int, device_type: str, resident: int | None = None,
              codec: str | None = None, order=ORDER) -> PairPlan:
    """The layout (see the module's docstring); OutOfMemoryError naming the fix when nothing fits."""
    given = tuple(name for name, v in (("resident layers", resident), ("codec", codec)) if v is not None)
    budget = free - sizes.outside - sizes.reserve
    if resident is None and device_type == "cuda" and sizes.layers * sizes.layer <= budget:
        return PairPlan(sizes.layers, None, free, free - budget + sizes.layers * sizes.layer, sizes.reserve, given)
    for c in ([codec] if codec is not None else order):
        r = resident if resident is not None else (0 if device_type != "cuda" else _most_resident(sizes, c, budget))
        used = _used(sizes, c, min(r, sizes.layers), device_type)
        if r >= 0 and used <= budget:
            return PairPlan(min(r, sizes.layers), c, free, free - budget + used, sizes.reserve, given)
    raise OutOfMemoryError(
        f"the self-drafter does not fit: {free / 2**30:.2f} GiB free, the target's layers take "
        f"{sizes.layer / 2**20:,.1f} MiB each and their {codec or order[-1]} copies "
        f"{sizes.copy[codec or order[-1]] / 2**20:,.1f} MiB, with {sizes.reserve / 2**30:.2f} GiB reserved for the "
        "KV caches and trees. Free device memory, pass --resident-layers with fewer layers, a lower-bit "
        "--draft-quant (hqq2), or a separate small drafter (--draft).")


def _most_resident(sizes: PairSizes, codec: str, budget: int) -> int:
    """The most resident layers whose dense bytes, the other layers' copies and the ring fit `budget`."""
    q = sizes.copy[codec]
    room = budget - sizes.ring * sizes.slot - sizes.layers * q
    if room < 0:
        return -1
    return min(sizes.layers - 1, int(room // max(sizes.layer - q, 1)))


def _used(sizes: PairSizes, codec: str, resident: int, device_type: str) -> int:
    streamed = sizes.layers - resident
    copies = streamed * sizes.copy[codec]
    if device_type != "cuda":  # the host also holds the streamed layers' buffers (about a dense layer each)
        return copies + streamed * sizes.layer
    return resident * sizes.layer + copies + (sizes.ring * sizes.slot if streamed else 0)


# ---- the sizes of a model about to be placed --------------------------------------------------------
def sizes_of(model: nn.Module, device: torch.device, ring: int = 2, staged: bool = False,
             kv_tokens: int = KV_TOKENS, tree_tokens: int = TREE_TOKENS, codecs=lowbit.CODECS) -> PairSizes:
    """`model`'s sizes before its layers are placed (they may be on the meta device)."""
    layers = model.get_decoder().layers
    inside = {id(t) for layer in layers for t in _tensors(layer)}
    outside = {id(t): t for t in _tensors(model) if id(t) not in inside and t.device != device}
    dense = max(_bytes(_tensors(layer)) for layer in layers)
    copy = {c: max(layer_copy_bytes(layer, c) for layer in layers) for c in codecs}
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    width = torch.empty((), dtype=dtype).element_size()
    window = getattr(model.config, "max_position_embeddings", None) or kv_tokens
    past = min(kv_tokens, window)
    kv = 2 * past * len(layers) * kv_layer_bytes(model.config, dtype)  # both models' caches
    act = memory.pass_bytes(model.config, tree_tokens, past, width)
    return PairSizes(len(layers), dense, copy, _bytes(outside.values()), dense * (2 if staged else 1),
                     min(ring, len(layers)), kv + act)


def reserve_for(sizes: PairSizes, free: int) -> PairSizes:
    """`sizes` with the margin of `free` added to the reserve."""
    return PairSizes(sizes.layers, sizes.layer, sizes.copy, sizes.outside, sizes.slot, sizes.ring,
                     sizes.reserve + int(MARGIN * free))


def layer_copy_bytes(layer: nn.Module, codec: str) -> int:
    """Device bytes of `layer`'s draft copy: its linear weights in `codec`, everything else dense."""
    total, coded = 0, set()
    for mod in layer.modules():
        if lowbit.applies(mod, codec):
            total += lowbit.copy_bytes(tuple(mod.weight.shape), codec)
            coded.add(id(mod.weight))
    return total + _bytes(t for t in _tensors(layer) if id(t) not in coded)


def kv_layer_bytes(config, dtype: torch.dtype) -> int:
    """K and V bytes one token takes in one layer's cache."""
    cfg = text_config(config)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def _tensors(module: nn.Module):
    seen = set()
    for mod in module.modules():
        for _, t, _ in reach.own_tensors(mod):
            if id(t) not in seen:
                seen.add(id(t))
                yield t


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
