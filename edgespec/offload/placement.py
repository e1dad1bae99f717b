"""Where things live: finding the decoder layers, moving the resident part, sizing residency."""
from __future__ import annotations

import torch
from torch import nn

from edgespec.base.errors import UnsupportedModelError
from edgespec.base import reach


def decoder_layers(model: nn.Module, meta_layers: bool = False) -> nn.ModuleList:
    """`model.get_decoder().layers`, or UnsupportedModelError naming the architecture and the fix.
    `meta_layers`: the layers may still be on the meta device (they are filled as they are placed)."""
    arch = type(model).__name__
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedModelError(
            f"Cannot offload {arch}: edgespec streams the decoder layers found at "
            "`model.get_decoder().layers` (an nn.ModuleList), and this model has none. Use a Hugging Face "
            "causal LM with a standard decoder (Llama, Qwen2, Mistral, Gemma families), or run it without "
            "offloading."
        )
    if any(reach.accelerate_hooked(m) for m in model.modules()):
        raise UnsupportedModelError(
            f"Cannot offload {arch}: it is already dispatched by accelerate (device_map / cpu_offload hooks). "
            "Load it without `device_map` (on the CPU) and let edgespec place it."
        )
    inside = {id(t) for layer in layers for t in _tensors(layer)} if meta_layers else set()
    if any(t.is_meta and id(t) not in inside for t in _tensors(model)):
        raise UnsupportedModelError(
            f"Cannot offload {arch}: some weights are on the meta device (not loaded). Load the real weights "
            "on the CPU first."
        )
    return layers


def _tensors(module: nn.Module):
    for mod in module.modules():
        yield from (t for _, t, _ in reach.own_tensors(mod))


def check_no_sharing(model: nn.Module, streamed: list[nn.Module]) -> None:
    """A streamed layer must own its tensors: shared weights would be unbound under another user."""
    inside: dict[int, int] = {}
    for i, layer in enumerate(streamed):
        for t in set(map(id, _tensors(layer))):
            if inside.setdefault(t, i) != i:
                raise UnsupportedModelError(_shared_msg(model))
    owned = {id(m) for layer in streamed for m in layer.modules()}
    for mod in model.modules():
        if id(mod) in owned:
            continue
        for _, t, _ in reach.own_tensors(mod):
            if id(t) in inside:
                raise UnsupportedModelError(_shared_msg(model))


def _shared_msg(model) -> str:
    return (
        f"Cannot offload {type(model).__name__}: its decoder layers share weights with each other or with "
        "the rest of the model, so they cannot be streamed one at a time. Keep those layers resident "
        "(resident_layers=None on a large enough device) or run without offloading."
    )


def move_outside(model: nn.Module, streamed: list[nn.Module], device: torch.device) -> None:
    """Move every parameter and buffer not inside a streamed layer to `device` (tied weights stay tied)."""
    skip = {id(m) for layer in streamed for m in layer.modules()}
    moved: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        if id(mod) in skip:
            continue
        for name, t, is_param in list(reach.own_tensors(mod)):
            if id(t) not in moved:
                same = t.device == device
                moved[id(t)] = t if same else nn.Parameter(t.data.to(device), t.requires_grad) if is_param else t.to(device)
            reach.bind(mod, name, moved[id(t)], is_param)


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in _tensors(module)}.values())


def auto_resident(model: nn.Module, layers: nn.ModuleList, device: torch.device, ring: int,
                  reserve_bytes: int | None, staged: bool = False) -> int:
    """How many leading layers stay on the device: 0 on CPU (so streaming is exercised); on CUDA as
    many as fit in free memory minus `reserve_bytes` (default 20 % of free) minus the ring of slots
    (`staged`: streamed layers cross the link encoded, so each slot also stages their bytes)."""
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    reserve = int(0.2 * free) if reserve_bytes is None else reserve_bytes
    per_layer = max(module_bytes(layer) for layer in layers)
    inside = {id(t) for layer in layers for t in _tensors(layer)}
    outside = sum(t.numel() * t.element_size() for t in {id(t): t for t in _tensors(model)}.values()
                  if id(t) not in inside and t.device != device)
    budget = free - reserve - outside
    if budget >= per_layer * len(layers):
        return len(layers)
    slot = per_layer * (2 if staged else 1)  # a codec slot also stages the encoded bytes
    return max(0, min(len(layers), (budget - ring * slot) // per_layer))
