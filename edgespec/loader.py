"""Loading the engine's models, one way: resolve → tensor source → placement.

1. resolve (edgespec/resolve.py): a hub id, a folder or a GGUF file → local files;
2. tensor source (edgespec/tensors.py): the folder's safetensors shards, or the GGUF file itself; a
   layer's tensors decoded, or — a GGUF's, for the streamer — raw, as the file's blocks;
3. placement (edgespec/offload/api.py): everything outside the decoder layers is loaded through
   transformers from that source (a zero-layer copy of the model, edgespec/skeleton.py), and each
   decoder layer, read just before it is placed and released before the next, stays on the device or
   is packed into the streamer's host buffer — a GGUF's as its blocks, decoded on the device after each
   copy (`--stream-quant int8|nf4`: de-quantized here, then re-encoded).

Host RAM peaks at what the streamed layers keep plus one layer, never at the whole model in its load
dtype; an offloaded GGUF target keeps about its file's bytes for its streamed layers and writes no
de-quantized copy. Models this cannot read that way (no safetensors, pre-quantized weights, tensor
names transformers would rename, GGUF architectures whose tensors transformers renames or merges)
load as before (whole, or from the de-quantized copy), with a note saying why. The drafter, and a
target that is not offloaded, load whole (edgespec/models.py).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgespec.config import LoadConfig
from edgespec.convert import dequantized_copy, gguf_index
from edgespec.device import run_dtype
from edgespec.errors import UnsupportedModelError
from edgespec.models import load_model, load_tokenizer, pick_device
from edgespec.pair import check_tokenizers
from edgespec.offload import api
from edgespec.offload.gguf_blocks import TYPES, supported
from edgespec.offload.layout import Encoded
from edgespec.offload.quant import GGUFRaw
from edgespec.resolve import resolve
from edgespec.skeleton import (
    decoder_layers, gguf_model, graft, layer_dtypes, layer_groups, meta_model, outside_from_folder,
    outside_from_tensors,
)
from edgespec.tensors import SafetensorsTensors, Unsupported


@dataclass
class Loaded:
    """What `Engine.from_pretrained` builds an engine from."""

    target: nn.Module
    drafter: nn.Module
    tokenizer: object
    offload: object = None  # the target's OffloadHandle, when its layers stream


def load_pair(config: LoadConfig) -> Loaded:
    """The target (offloaded unless `config.offload` is False), the drafter and the shared tokenizer."""
    c = config
    drafter = c.drafter or c.target  # no drafter: the target's own quantized copy drafts for it
    dev = pick_device(c.device)
    tok = load_tokenizer(c.target, c.progress)
    draft_tok = load_tokenizer(drafter, c.progress) if drafter != c.target else tok
    check_tokenizers(tok, draft_tok, "target", "drafter")  # before any weights are read
    draft_model = load_model(drafter, quantize=_codec(c.draft_quant), device=dev, progress=c.progress)
    stream = dict(resident_layers=c.resident_layers, link_delay=c.link_delay, quantize=_codec(c.stream_quant))
    handle = None
    if c.target_shape:
        target_model, handle = load_padded(c, dev, stream)
    elif c.offload:
        target_model = load_offloaded(c.target, dev, run_dtype(dev), progress=c.progress, **stream)
        handle = api.find_handle(target_model)
    else:
        target_model = load_model(c.target, device=dev, progress=c.progress)
    return Loaded(target_model, draft_model, tok, handle)


def load_padded(c: LoadConfig, device: torch.device, stream: dict):
    """(target zero-padded into `c.target_shape`, its OffloadHandle or None). Offloaded, its layers are
    built one at a time straight into the streamer (edgespec/offload/padded.py): the padded model never
    exists whole in host memory (a 70B shape streamed nf4 needs its packed bytes, not 140 GB of bf16)."""
    from edgespec.offload.padded import PaddedLayers, pad_to_shape, padded_skeleton

    small = load_model(c.target, dtype=run_dtype(device), progress=c.progress)
    if not c.offload:
        return pad_to_shape(small, c.target_shape).to(device), None
    big = padded_skeleton(small, c.target_shape)
    source = PaddedLayers(small, big.config, device)
    return big, api.offload_layers(big, device, progress=c.progress, source=source, **stream)


def load_offloaded(spec: str | None, device: torch.device, dtype: torch.dtype, *, progress: bool = True,
                   gguf_copy: bool = False, **offload_kw) -> nn.Module:
    """Load `spec` with its decoder layers offloaded (see `offload_layers` for `offload_kw`), one layer
    at a time where the checkpoint allows it, else whole first. A GGUF streams its blocks as they are
    in the file; `gguf_copy=True` streams its de-quantized copy instead (the path before; comparisons)."""
    folder, gguf = resolve(spec)
    if gguf and not gguf_copy:
        try:
            return _gguf_offloaded(Path(folder) / gguf, device, dtype, progress, offload_kw)
        except Unsupported as why:
            _note(progress, f"streaming {gguf} from its de-quantized copy ({why})")
    if gguf:
        folder = str(dequantized_copy(folder, gguf, progress, dtype))
    try:
        model, source = _safetensors_target(folder, dtype)
    except Unsupported as why:
        _note(progress, f"loading the target whole before streaming it ({why})")
        model = load_model(folder, device="cpu", dtype=dtype, progress=progress)
        api.offload_layers(model, device, progress=progress, **offload_kw)
        return model
    api.offload_layers(model, device, progress=progress, source=source, **offload_kw)
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
def _gguf_offloaded(path: Path, device: torch.device, dtype: torch.dtype, progress: bool, offload_kw: dict):
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
    api.offload_layers(model, device, progress=progress, source=LayerSource(source, prefix, raw), **offload_kw)
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


# ---- small pieces ------------------------------------------------------------------------------
def _codec(name: str | None) -> str | None:
    """A quantization option as the loaders take it: "none" or "" means None."""
    return None if name in ("none", "") else name


def _note(progress: bool, text: str) -> None:
    if progress:
        print(f"edgespec: {text}", file=sys.stderr, flush=True)
