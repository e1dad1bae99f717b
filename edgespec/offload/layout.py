"""One decoder layer's parameters and buffers packed into one contiguous host byte buffer.

The *dense* layout is what a device slot holds: every tensor at its own dtype, at an aligned byte
offset. The *host* layout is what crosses the link: the dense layout itself, or, with a codec,
compact encoded regions that `load` decodes into the dense layout on the device. A tensor can also
arrive already encoded (`Encoded`: GGUF blocks as they are in the file); its bytes are packed as is.

While a layer is not loaded its parameters and buffers are meta tensors (shape and dtype kept), so
a layer that runs without its weights fails loudly instead of reading a slot that was overwritten.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from edgespec.offload.pinned import host_buffer, unpin
from edgespec.offload.codecs import align, typed
from edgespec.base import reach


@dataclass(eq=False)
class Slot:
    """One preallocated layer-sized buffer on the device (plus a staging area for encoded bytes)."""

    index: int
    dense: torch.Tensor  # uint8, slot_bytes
    staging: torch.Tensor | None = None  # uint8, for codecs: encoded bytes land here, then are decoded
    free: object = None  # transport-specific "previous occupant finished computing" marker

    @property
    def nbytes(self) -> int:
        return self.dense.numel() + (self.staging.numel() if self.staging is not None else 0)


@dataclass(eq=False)
class Entry:
    """One tensor of the layer: where it lives in both layouts and which module attributes name it."""

    targets: list[tuple[nn.Module, str]]
    is_param: bool
    requires_grad: bool
    shape: torch.Size
    dtype: torch.dtype
    offset: int = 0  # byte offset in the dense layout
    host_offset: int = 0  # byte offset in the host layout
    host_nbytes: int = 0
    codec: object = None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass(eq=False)
class Encoded:
    """A tensor already in `codec`'s byte layout (e.g. GGUF blocks as in the file): `write(region)` puts
    its `nbytes` bytes into the pack's host region, once; `codec` decodes them on the device."""

    codec: object
    nbytes: int
    write: Callable[[torch.Tensor], None]


def collect(layer: nn.Module) -> list[tuple[Entry, torch.Tensor]]:
    """Every parameter and buffer of `layer`, once each (a tensor named twice gets two targets)."""
    found: dict[int, tuple[Entry, torch.Tensor]] = {}
    for mod in layer.modules():
        for name, t, is_param in reach.own_tensors(mod):
            if id(t) not in found:
                entry = Entry([], is_param, bool(t.requires_grad), t.shape, t.dtype)
                found[id(t)] = (entry, t)
            found[id(t)][0].targets.append((mod, name))
    return list(found.values())


def _encoded_of(layer: nn.Module, found, encoded: dict[str, Encoded]) -> list:
    """The `Encoded` given for each found tensor (None where it is packed from the tensor itself)."""
    if not encoded:
        return [None] * len(found)
    names = {id(t): k for k, t in layer.state_dict(keep_vars=True).items()}
    unknown = set(encoded) - set(names.values())
    if unknown:
        raise KeyError(f"encoded tensors not in the layer: {sorted(unknown)}")
    return [encoded.get(names.get(id(t))) for _, t in found]


def _assign(entry: Entry, value: torch.Tensor) -> None:
    for mod, name in entry.targets:
        reach.bind(mod, name, value, entry.is_param)


@dataclass(eq=False)
class LayerPack:
    """A streamed layer: its packed host bytes, and the views it binds to in each slot."""

    index: int  # position in the decoder's layer list
    entries: list[Entry]
    host: torch.Tensor  # uint8, host layout (pinned on CUDA)
    dense_bytes: int
    codec: object = None
    plain_bytes: int = 0  # the host layout's leading bytes that are the dense layout's too (not encoded)
    _idle: list = field(default_factory=list)
    _views: dict = field(default_factory=dict)  # slot index -> bound tensors, one per entry
    _loads: dict = field(default_factory=dict)  # slot index -> ([(copy dst, src)], [decode steps])

    @property
    def host_bytes(self) -> int:
        return self.host.numel()

    @property
    def staged_bytes(self) -> int:
        """Host bytes that land in a slot's staging area to be decoded (0 when nothing is encoded)."""
        return self.host_bytes - self.plain_bytes if self.staged else 0

    @property
    def staged(self) -> bool:
        """Whether some tensor crosses the link encoded (its slot then stages bytes and decodes them)."""
        return any(e.codec is not None for e in self.entries)

    @classmethod
    def pack(cls, index: int, layer: nn.Module, codec=None, pin: bool = False,
             encoded: dict[str, Encoded] | None = None) -> "LayerPack":
        """Copy `layer`'s tensors into one new host buffer; the layer is left unbound (meta).
        `encoded`: tensors (by state-dict name in the layer) given already encoded, packed as they are.
        A codec encodes each weight on the weight's own device; its bytes land in the host buffer."""
        found = collect(layer)
        items = list(zip(found, _encoded_of(layer, found, encoded or {})))
        for (entry, t), enc in items:
            if enc is not None:
                entry.codec, entry.host_nbytes = enc.codec, enc.nbytes
            else:
                entry.codec = codec if codec is not None and entry.is_param and codec.applies(t) else None
                entry.host_nbytes = entry.codec.nbytes(t.shape) if entry.codec else entry.nbytes
        items.sort(key=lambda item: item[0][0].codec is not None)  # plain tensors first (a stable sort)
        dense = host = plain = 0
        for (entry, _), _ in items:
            entry.offset, dense = dense, align(dense + entry.nbytes)
            entry.host_offset, host = host, align(host + entry.host_nbytes)
            plain = host if entry.codec is None else plain  # the prefix where both layouts agree
        pack = cls(index, [e for (e, _), _ in items], torch.empty(0, dtype=torch.uint8), dense,
                   codec if any(e.codec is codec for e, _ in found) else None, plain_bytes=plain)
        pack.host = buf = host_buffer(host, pin, pack)
        with torch.no_grad():
            for (entry, t), enc in items:
                region = buf[entry.host_offset : entry.host_offset + entry.host_nbytes]
                if enc is not None:
                    enc.write(region)
                elif entry.codec:
                    entry.codec.encode_into(t, region)
                else:
                    typed(buf, entry.host_offset, entry.numel, entry.dtype, entry.shape).copy_(t)
        pack._idle = [pack._placeholder(e) for e in pack.entries]
        pack.unbind()
        return pack

    @staticmethod
    def _placeholder(entry: Entry) -> torch.Tensor:
        t = torch.empty(entry.shape, dtype=entry.dtype, device="meta")
        return nn.Parameter(t, requires_grad=False) if entry.is_param else t

    def attach(self, slot: Slot) -> None:
        """Precompute (once, outside any inference mode) the views this layer uses in `slot`: its
        host-to-device copies (dst, src) and its decode steps (codec, staged bytes, dense view)."""
        views = []
        for e in self.entries:
            v = typed(slot.dense, e.offset, e.numel, e.dtype, e.shape)
            views.append(nn.Parameter(v, requires_grad=False) if e.is_param else v)
        self._views[slot.index] = views
        plain = self.plain_bytes
        copies = [(slot.dense[:plain], self.host[:plain])] if plain else []
        steps = []
        if self.staged:
            copies.append((slot.staging[: self.host_bytes - plain], self.host[plain:]))
            for e, v in zip(self.entries, views):
                if e.codec is not None:
                    start = e.host_offset - plain
                    steps.append((e.codec, slot.staging[start : start + e.host_nbytes], v.data))
        self._loads[slot.index] = (copies, steps)

    def load(self, slot: Slot, non_blocking: bool = False) -> None:
        """Copy the host bytes into `slot` and decode them there."""
        self.copy(slot, non_blocking)
        self.decode(slot)

    def copy(self, slot: Slot, non_blocking: bool = False) -> None:
        """The host bytes into `slot`: the plain prefix into its dense bytes, the encoded rest (if any)
        into its staging area; one or two host-to-device copies."""
        for dst, src in self._loads[slot.index][0]:
            dst.copy_(src, non_blocking=non_blocking)

    def decode(self, slot: Slot) -> None:
        """The staged encoded bytes into the dense layout of `slot`, one decode per encoded tensor."""
        for codec, src, out in self._loads[slot.index][1]:
            codec.decode_into(src, out)

    def bind(self, slot: Slot) -> None:
        """Point the layer's parameters and buffers at views of `slot` (metadata only)."""
        for entry, view in zip(self.entries, self._views[slot.index]):
            _assign(entry, view)

    def unbind(self) -> None:
        """Point the layer back at meta placeholders."""
        for entry, idle in zip(self.entries, self._idle):
            _assign(entry, idle)

    def decoded(self, entry: Entry, device: torch.device) -> torch.Tensor:
        """A new tensor on `device` holding `entry` as the layer computes with it (decoded if encoded)."""
        region = self.host[entry.host_offset : entry.host_offset + entry.host_nbytes].to(device)
        if not entry.codec:
            return typed(region, 0, entry.numel, entry.dtype, entry.shape).clone()
        out = torch.empty(entry.shape, dtype=entry.dtype, device=device)
        entry.codec.decode_into(region, out)
        return out

    def restore(self, device: torch.device) -> None:
        """Give the layer real tensors again on `device` (codec-encoded weights come back decoded)."""
        for e in self.entries:
            if e.codec:
                t = torch.empty(e.shape, dtype=e.dtype)
                e.codec.decode_into(self.host[e.host_offset : e.host_offset + e.host_nbytes], t)
            else:
                t = typed(self.host, e.host_offset, e.numel, e.dtype, e.shape).clone()
            t = t.to(device)
            _assign(e, nn.Parameter(t, requires_grad=e.requires_grad) if e.is_param else t)
        self._views.clear()
        self._loads.clear()
        unpin(self)


def make_slots(packs: list[LayerPack], ring: int, device: torch.device) -> list[Slot]:
    """`ring` device slots big enough for every pack, each pack's views attached to each slot."""
    if not packs:
        return []
    dense = max(p.dense_bytes for p in packs)
    staging = max(p.staged_bytes for p in packs)
    slots = [Slot(i, torch.empty(dense, dtype=torch.uint8, device=device),
                  torch.empty(staging, dtype=torch.uint8, device=device) if staging else None)
             for i in range(ring)]
    for pack in packs:
        for slot in slots:
            pack.attach(slot)
    return slots


def fits(pack: LayerPack, slot: Slot) -> bool:
    """Whether `pack` can load into `slot` (dense bytes, and staging for its encoded bytes)."""
    staged = not pack.staged or (slot.staging is not None and slot.staging.numel() >= pack.staged_bytes)
    return pack.dense_bytes <= slot.dense.numel() and staged
