"""Loading the engine's models, one way: resolve → tensor source → placement.

1. resolve (edgespec/loading/resolve.py): a hub id, a folder or a GGUF file → local files;
2. tensor source (edgespec/loading/tensors.py): the folder's safetensors shards, or the GGUF file itself; a
   layer's tensors decoded, or — a GGUF's, for the streamer — raw, as the file's blocks;
3. placement (edgespec/offload/api.py): everything outside the decoder layers is loaded through
   transformers from that source (a zero-layer copy of the model, edgespec/loading/skeleton.py), and each
   decoder layer, read just before it is placed and released before the next, stays on the device or
   is packed into the streamer's host buffer — a GGUF's as its blocks, decoded on the device after each
   copy (`--stream-quant int8|nf4`: de-quantized here, then re-encoded).

Host RAM peaks at what the streamed layers keep plus one layer, never at the whole model in its load
dtype; an offloaded GGUF target keeps about its file's bytes for its streamed layers and writes no
de-quantized copy. Models this cannot read that way (no safetensors, pre-quantized weights, tensor
names transformers would rename, GGUF architectures whose tensors transformers renames or merges)
load as before (whole, or from the de-quantized copy), with a note saying why. The drafter, and a
target that is not offloaded, load whole (edgespec/loading/models.py). A target that drafts for itself
(edgespec/loading/self_drafter.py; `drafter="self"`, and the default for an offloaded target) is placed by the
pair's memory plan (edgespec/loading/memory_plan.py) and its drafter built from it afterwards.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgespec.loading import lowbit, memory_plan as pairplan, self_drafter as selfdraft
from edgespec.base import memory
from edgespec.base.config import LoadConfig
from edgespec.loading.convert import dequantized_copy, gguf_index, gguf_stamp
from edgespec.base.device import run_dtype
from edgespec.base.errors import InvalidArgumentError, OutOfMemoryError, UnsupportedModelError
from edgespec.loading.models import load_model, load_tokenizer, pick_device
from edgespec.core.pair import check_tokenizers
from edgespec.offload import api
from edgespec.offload.gguf_blocks import TYPES, supported
from edgespec.offload.layout import Encoded
from edgespec.offload.codecs import GGUFRaw
from edgespec.loading.resolve import resolve
from edgespec.loading.skeleton import (
    decoder_layers, gguf_model, graft, layer_dtypes, layer_groups, meta_model, outside_from_folder,
    outside_from_tensors,
)
from edgespec.loading.tensors import SafetensorsTensors, Unsupported


@dataclass
class Loaded:
    """What `Engine.from_pretrained` builds an engine from."""

    target: nn.Module
    drafter: nn.Module
    tokenizer: object
    offload: object = None  # the target's OffloadHandle, when its layers stream
    self_draft: object = None  # selfdraft.SelfDraft, when the target drafts for itself


def load_pair(config: LoadConfig) -> Loaded:
    """The target (offloaded unless `config.offload` is False), the drafter and the shared tokenizer.
    The drafter is the target itself (edgespec/loading/self_drafter.py) for `drafter="self"`, and by default for an
    offloaded target whose plan fits (pairplan.py, `_self_drafts`); else the given model, or the target's
    own copy."""
    c = config
    dev = pick_device(c.device)
    tok = load_tokenizer(c.target, c.progress)
    planner = _Planner(c, dev) if _self_drafts(c) else None
    draft_model = None if planner is not None else _separate_drafter(c, c.drafter or c.target, dev, tok)
    stream = dict(resident_layers=c.resident_layers, link_delay=c.link_delay, quantize=_codec(c.stream_quant))
    handle = None
    if c.target_shape:
        target_model, handle = load_padded(c, dev, stream, planner)
    elif c.offload:
        target_model = load_offloaded(c.target, dev, run_dtype(dev), progress=c.progress, plan=planner, **stream)
        handle = api.find_handle(target_model)
    else:
        target_model = load_model(c.target, device=dev, progress=c.progress)
    if planner is None:
        return Loaded(target_model, draft_model, tok, handle)
    return _self_drafted(c, planner, target_model, handle, tok, dev)


def load_padded(c: LoadConfig, device: torch.device, stream: dict, plan=None):
    """(target zero-padded into `c.target_shape`, its OffloadHandle or None). Offloaded, its layers are
    built one at a time straight into the streamer (edgespec/offload/padded.py): the padded model never
    exists whole in host memory (a 70B shape streamed nf4 needs its packed bytes, not 140 GB of bf16)."""
    from edgespec.offload.padded import PaddedLayers, pad_to_shape, padded_skeleton

    small = load_model(c.target, dtype=run_dtype(device), progress=c.progress)
    if not c.offload:
        return pad_to_shape(small, c.target_shape).to(device), None
    big = padded_skeleton(small, c.target_shape)
    source = PaddedLayers(small, big.config, device)
    return big, api.offload_layers(big, device, progress=c.progress, source=source, **_planned(plan, big, stream))


def load_offloaded(spec: str | None, device: torch.device, dtype: torch.dtype, *, progress: bool = True,
                   gguf_copy: bool = False, plan=None, **offload_kw) -> nn.Module:
    """Load `spec` with its decoder layers offloaded (see `offload_layers` for `offload_kw`), one layer
    at a time where the checkpoint allows it, else whole first. A GGUF streams its blocks as they are
    in the file; `gguf_copy=True` streams its de-quantized copy instead (the path before; comparisons).
    `plan(model, offload_kw)`: the offload options to place `model` with, decided once its sizes are known
    and before any layer is placed (the self-drafter's memory plan)."""
    folder, gguf = resolve(spec)
    if gguf and not gguf_copy:
        try:
            return _gguf_offloaded(Path(folder) / gguf, device, dtype, progress, offload_kw, plan)
        except Unsupported as why:
            _note(progress, f"streaming {gguf} from its de-quantized copy ({why})")
    if gguf:
        folder = str(dequantized_copy(folder, gguf, progress, dtype))
    try:
        model, source = _safetensors_target(folder, dtype)
    except Unsupported as why:
        _note(progress, f"loading the target whole before streaming it ({why})")
        model = load_model(folder, device="cpu", dtype=dtype, progress=progress)
        api.offload_layers(model, device, progress=progress, **_planned(plan, model, offload_kw))
        return model
    api.offload_layers(model, device, progress=progress, source=source, **_planned(plan, model, offload_kw))
    return model


# ---- safetensors -------------------------------------------------------------------------------
def _safetensors_target(folder: str, dtype: torch.dtype):
    """(model with meta decoder layers, its layer source) for a safetensors folder."""
    from transformers import AutoConfig

    ckpt = SafetensorsTensors.find(folder)
    if ckpt is None:
        raise Unsupported("no safetensors checkpoint")
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None):
        raise Unsupported("a pre-quantized checkpoint")
    skeleton = meta_model(config, dtype)
    prefix, _, _ = layer_groups(skeleton, ckpt)
    model = graft(outside_from_folder(folder, config, dtype), decoder_layers(skeleton))
    return model, LayerSource(ckpt, prefix)


class LayerSource:
    """A decoder layer's tensors from a tensor source, for `offload_layers(source=)`: decoded into the
    layer, or (`raw`, a GGUF's streamed layers) handed over as the file's blocks."""

    def __init__(self, tensors, prefix: str, raw: bool = False):
        self.tensors, self.prefix, self.encodes = tensors, prefix, raw
        self._codecs: dict[str, GGUFRaw] = {}  # one per GGUF type, shared by every layer

    def fill(self, i: int, layer: nn.Module, streamed: bool) -> dict[str, Encoded]:
        prefix, dtypes = f"{self.prefix}.{i}.", layer_dtypes(layer)
        encoded = self._encoded(prefix, dtypes) if streamed and self.encodes else {}
        state = self.tensors.read({prefix + k: dt for k, dt in dtypes.items() if k not in encoded})
        result = layer.load_state_dict({k[len(prefix):]: t for k, t in state.items()}, strict=False, assign=True)
        if set(result.missing_keys) != set(encoded) or result.unexpected_keys:
            raise RuntimeError(f"layer {i}: {result}")  # cannot happen: the names were checked
        for p in layer.parameters():
            p.requires_grad_(False)
        return encoded

    def _encoded(self, prefix: str, dtypes: dict) -> dict[str, Encoded]:
        out = {}
        for k in dtypes:
            raw = self.tensors.raw(prefix + k)
            if raw is not None:
                codec = self._codecs.setdefault(raw.kind, GGUFRaw(raw.kind))
                out[k] = Encoded(codec, raw.nbytes, raw.write)
        return out


# ---- GGUF --------------------------------------------------------------------------------------
def _gguf_offloaded(path: Path, device: torch.device, dtype: torch.dtype, progress: bool, offload_kw: dict,
                    plan=None):
    """A GGUF target: outside tensors and resident layers de-quantized once, streamed layers raw."""
    config, skeleton, source = gguf_model(path, gguf_index(str(path.parent), path.name), dtype)
    prefix, outside, per_layer = layer_groups(skeleton, source)
    raw = offload_kw.get("quantize") is None
    if raw:
        _check_streamable(source, per_layer, path)
    dtypes = {k: t.dtype for k, t in skeleton.state_dict(keep_vars=True).items()}
    state = source.read({k: dtypes[k] for k in outside})
    model = graft(outside_from_tensors(type(skeleton), config, state, dtype), decoder_layers(skeleton))
    del state
    model.config.name_or_path = str(path)
    api.offload_layers(model, device, progress=progress, source=LayerSource(source, prefix, raw),
                       **_planned(plan, model, offload_kw))
    return model


def _check_streamable(source, per_layer: list[list[str]], path: Path) -> None:
    """Refuse, before anything is loaded, a GGUF whose layers hold a type the device cannot decode."""
    for names in per_layer:
        for name in names:
            kind = source.kind(name)
            if not supported(kind):
                raise UnsupportedModelError(
                    f"{path.name}: tensor {source.gguf_name(name)} ({name}) is {kind}, which edgespec cannot "
                    f"stream as the file holds it (it decodes {', '.join(TYPES)} on the device). Pass "
                    "--stream-quant int8 (or nf4) to de-quantize it on the host and stream it re-encoded, or use "
                    "a Q4_K_M / Q5_K_M / Q8_0 file of this model.")


# ---- the drafter --------------------------------------------------------------------------------
SELF = "self"  # LoadConfig.drafter: the target drafts for itself
SEPARATE_QUANT = ("nf4", "int8")  # what a separate drafter's bitsandbytes copy takes (or none)


def _separate_drafter(c: LoadConfig, spec, dev: torch.device, tok) -> nn.Module:
    """A drafter model of its own: `spec` (the target's own copy when it names the target)."""
    quant = "nf4" if c.draft_quant == "auto" else _codec(c.draft_quant)
    if quant is not None and quant not in SEPARATE_QUANT:
        raise InvalidArgumentError(f"--draft-quant {quant} is for the self-drafter's copies (--draft self); a separate "
                                   "drafter is quantized nf4, int8 or none")
    draft_tok = load_tokenizer(spec, c.progress) if spec != c.target else tok
    check_tokenizers(tok, draft_tok, "target", "drafter")  # before any weights are read
    return load_model(spec, quantize=quant, device=dev, progress=c.progress)


def _self_drafts(c: LoadConfig) -> bool:
    """Whether the target drafts for itself: asked (`drafter="self"`), or by default for an offloaded target
    (not one zero-padded into a benchmark shape, whose own copy is the small model it predicts as; not with
    `draft_quant="none"`, which asks for an unquantized copy)."""
    if c.drafter == SELF:
        return True
    return c.drafter is None and c.offload and not c.target_shape and c.draft_quant != "none"


class _Planner:
    """The self-drafter's memory plan, made when the target's sizes are known and before its layers are
    placed (load_offloaded's `plan`): the resident layers it places the target with, and the codec of the
    copies, in `.plan`. A default self-drafter (no --draft) that would not fit, or would share every layer
    (the whole target fits: its separate copy drafts faster), leaves `.plan` None and the placement as
    for a separate drafter, with `.why`."""

    def __init__(self, c: LoadConfig, device: torch.device):
        self.explicit = c.drafter == SELF
        codec = None if c.draft_quant == "auto" else _codec(c.draft_quant)
        if codec is None and c.draft_quant != "auto":
            raise InvalidArgumentError("--draft-quant none: the self-drafter runs its streamed layers as low-bit "
                                       f"copies ({', '.join(lowbit.CODECS)}, or auto); keep layers resident with "
                                       "--resident-layers to draft with them exactly")
        if codec is not None:
            lowbit.check(codec)
        self.codec, self.resident, self.device = codec, c.resident_layers, device
        self.plan, self.why = None, None

    def __call__(self, model: nn.Module, offload_kw: dict) -> dict:
        staged = offload_kw.get("quantize") is not None or self.device.type == "cuda"
        sizes = pairplan.sizes_of(model, self.device, offload_kw.get("ring", 2), staged)
        free = memory.free_memory(self.device)
        try:
            plan = pairplan.plan_pair(pairplan.reserve_for(sizes, free), free, self.device.type, self.resident,
                                      self.codec)
        except OutOfMemoryError as err:
            if self.explicit:
                raise
            self.why = str(err)
            return offload_kw
        if plan.codec is None and not self.explicit:
            self.why = "every target layer fits on the device: its own nf4 copy drafts faster than the whole target"
            return offload_kw
        self.plan = plan
        return {**offload_kw, "resident_layers": plan.resident}


def _planned(plan, model: nn.Module, offload_kw: dict) -> dict:
    return plan(model, offload_kw) if plan is not None else offload_kw


def _self_drafted(c: LoadConfig, planner: _Planner, target: nn.Module, handle, tok, dev: torch.device) -> Loaded:
    """The pair with the target drafting for itself, or — a default that does not fit — its own copy."""
    if planner.why is not None:
        _note(c.progress, f"drafting with the target's nf4 copy, not the self-drafter: {planner.why}")
        return Loaded(target, _separate_drafter(c, c.target, dev, tok), tok, handle)
    plan = planner.plan  # None: not offloaded, every layer shared
    codec = (plan.codec if plan is not None else None) or planner.codec or pairplan.ORDER[0]
    sd = selfdraft.build(target, handle, codec, cache=_copies_folder(c, codec, dev), plan=plan,
                         progress=c.progress)
    return Loaded(target, sd.model, tok, handle, sd)


def _copies_folder(c: LoadConfig, codec: str, dev: torch.device):
    """Where the self-drafter's copies of this target are saved (None: its files cannot be found)."""
    import hashlib

    from edgespec.base.files import cache_dir
    from edgespec.loading.bnb_copy import source_stamp

    folder, gguf = resolve(c.target)
    stamp = gguf_stamp(Path(folder) / gguf) if gguf else source_stamp(folder)
    if stamp is None:
        return None
    setup = [codec, lowbit.library_version(codec), f"v{lowbit.VERSION}", str(run_dtype(dev)), dev.type,
             f"stream:{c.stream_quant}", f"shape:{c.target_shape}"]
    key = hashlib.sha1("|".join([stamp, *setup]).encode()).hexdigest()[:12]
    name = Path(gguf or str(folder).rstrip("/")).stem or "model"
    return cache_dir() / "selfdraft" / f"{name}-{codec}-{dev.type}-{key}"


# ---- small pieces ------------------------------------------------------------------------------
def _codec(name: str | None) -> str | None:
    """A quantization option as the loaders take it: "none" or "" means None."""
    return None if name in ("none", "") else name


def _note(progress: bool, text: str) -> None:
    if progress:
        print(f"edgespec: {text}", file=sys.stderr, flush=True)
