"""`offload_layers`: keep the first layers (and everything outside the layers) on the device, stream
the rest from host memory through a ring of device slots."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from edgespec.base.errors import InvalidArgumentError
from edgespec.offload.layout import LayerPack, make_slots
from edgespec.offload.placement import auto_resident, check_no_sharing, decoder_layers, move_outside
from edgespec.offload.codecs import CODECS, make_codec
from edgespec.offload.streamer import OffloadHandle, find_handle
from edgespec.offload.transport import make_transport


def offload_layers(model: nn.Module, device: str | torch.device = "cuda", resident_layers: int | None = None,
                   ring: int = 2, link_delay: float = 0.0, quantize: str | None = None, progress: bool = True,
                   reserve_bytes: int | None = None, source=None) -> OffloadHandle:
    """Offload `model`'s decoder layers; returns a handle (`find_handle(model)` finds it again).

    - `resident_layers`: leading layers kept on `device`; None = as many as fit in free device memory
      minus `reserve_bytes` (default 20 % of free) on CUDA, 0 on CPU (so streaming is exercised).
    - `ring`: device slots for streamed layers (clamped to the number of streamed layers); ring - 1
      layers load ahead while one computes. ring=1 is correct but does not overlap.
    - `link_delay`: emulated extra seconds per streamed layer (a slow link). CPU: the copy thread
      sleeps; CUDA: the copy stream spins (torch.cuda._sleep), the host never sleeps.
    - `quantize`: "int8" or "nf4" keeps streamed 2-D weights encoded in host memory (fewer bytes
      cross the link), decoded on the device after each copy. Resident layers stay unquantized.
    - `source`: for layers still on the meta device (edgespec/loading/loader.py): `source.fill(i, layer,
      streamed)` gives layer i its host weights just before it is placed, so only one layer's host copy
      exists at a time. For a streamed layer it may instead return some tensors already encoded
      ({state-dict name: layout.Encoded}, e.g. GGUF blocks as in the file), which are packed as they
      are and decoded on the device after each copy; `source.encodes` says whether it does.
    """
    device = _device(device)
    _check(ring, link_delay, quantize, resident_layers)
    if find_handle(model) is not None:
        raise InvalidArgumentError("This model is already offloaded: call handle.remove() before offloading again.")
    layers = decoder_layers(model, meta_layers=source is not None)
    n = len(layers)
    staged = quantize is not None or bool(getattr(source, "encodes", False))
    if resident_layers is None:
        resident = auto_resident(model, layers, device, ring, reserve_bytes, staged)
    else:
        resident = min(resident_layers, n)
    streamed = list(layers)[resident:]
    check_no_sharing(model, streamed)
    bar = tqdm(total=n, desc=_desc(device, source is not None), unit="layer", disable=not progress)
    fill = source.fill if source is not None else (lambda i, layer, streamed: {})
    with torch.no_grad(), bar:
        for i in range(resident):  # one at a time: a filled layer leaves the host before the next is read
            fill(i, layers[i], False)
            move_outside(layers[i], [], device)
            bar.update()
        move_outside(model, streamed, device)
        codec = make_codec(quantize)
        packs = []
        for i in range(resident, n):
            encoded = fill(i, layers[i], True)
            packs.append(LayerPack.pack(i, layers[i], codec, pin=device.type == "cuda", encoded=encoded))
            bar.update()
        _prepare_codecs(packs, device)
        slots = make_slots(packs, min(ring, len(packs)), device)
    handle = OffloadHandle(model, layers, device, packs, slots, make_transport(device, float(link_delay)), quantize,
                           codec=codec, ring_size=ring)
    return handle


def _prepare_codecs(packs: list[LayerPack], device: torch.device) -> None:
    """Stage each codec's tables on the device once, outside the copy path; on CUDA also decode one
    tensor of each codec and dtype there, so its kernel is built now, not during the first pass."""
    codecs, first = {}, {}
    for p in packs:
        for e in p.entries:
            if e.codec is not None:
                codecs[id(e.codec)] = e.codec
                first.setdefault((e.codec.name, e.dtype), (p, e))
    for codec in codecs.values():
        codec.prepare(device)
    if device.type == "cuda":
        for pack, entry in first.values():
            pack.decoded(entry, device)


def _desc(device: torch.device, loading: bool) -> str:
    """What the progress bar says: layers are read from the checkpoint, or only pinned / packed."""
    verb = "loading" if loading else "pinning" if device.type == "cuda" else "packing"
    return f"edgespec: {verb} layers"


def _device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError("device='cuda' was asked for but CUDA is not available: pass device='cpu'.")
        return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    if device.type != "cpu":
        raise InvalidArgumentError(f"Offloading supports device 'cuda' or 'cpu', not {device.type!r}.")
    return device


def _check(ring, link_delay, quantize, resident_layers) -> None:
    if not isinstance(ring, int) or ring < 1:
        raise InvalidArgumentError(f"ring must be an int >= 1 (device slots for streamed layers), got {ring!r}.")
    if link_delay < 0:
        raise InvalidArgumentError(f"link_delay must be >= 0 seconds, got {link_delay}.")
    if quantize is not None and quantize not in CODECS:
        raise InvalidArgumentError(f"quantize must be None or one of {sorted(CODECS)}, got {quantize!r}.")
    if resident_layers is not None and (not isinstance(resident_layers, int) or resident_layers < 0):
        raise InvalidArgumentError(f"resident_layers must be None or an int >= 0, got {resident_layers!r}.")
