"""The ring: streamed layers take turns in `ring` device slots, prefetched while earlier layers compute.

Streamed-layer *uses* are numbered k = 0, 1, 2, ... across passes; use k runs streamed layer k % S
from slot k % R (S streamed layers, R slots). When use k finishes computing, its slot is released
and use k + R is submitted into it, so R - 1 layers are always in flight ahead of compute, and after
the last layer of a pass the first layers of the next pass are already loading (wrap-around).

Forward pre/post hooks on every decoder layer drive it, so the model's own forward (and generate,
KV caches, custom 4-D masks) runs unchanged. If a pass is cut short (an exception mid-forward), the
next layer to run is not the one expected: the ring drains and restarts at that layer.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from edgespec.base.errors import InvalidArgumentError
from edgespec.offload.layout import LayerPack, Slot, fits, make_slots
from edgespec.offload.placement import move_outside
from edgespec.offload.trace import LayerTrace, OffloadStats, PassTrace


# streamed layer → its handle (weakly both ways: the layer's hooks keep the handle alive, nothing here does)
_STREAMING: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def find_handle(model: nn.Module) -> "OffloadHandle | None":
    """The handle streaming `model`'s decoder layers (None when the model is not offloaded)."""
    for module in model.modules():
        ref = _STREAMING.get(module)
        if ref is not None and ref() is not None:
            return ref()
    return None


class OffloadHandle:
    """Returned by `offload_layers`: stats, knobs, and `remove()` to undo the offloading."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, device: torch.device, packs: list[LayerPack],
                 slots: list[Slot], transport, quantize: str | None, codec=None, ring_size: int | None = None):
        self.model, self.layers, self.device = model, layers, device
        self.packs, self.slots, self.transport, self.quantize = packs, slots, transport, quantize
        self.codec, self.ring_size = codec, ring_size or max(1, len(slots))
        self._slot_of = {p.index: i for i, p in enumerate(packs)}  # layer index -> streamed position
        self._next = 0  # next streamed use to run
        self._issued = 0  # uses submitted so far
        self._tickets: dict[int, object] = {}
        self._running: tuple[int, object] | None = None  # (use, ticket) of the layer computing now
        self._torn = False  # a hook is running, or was cut short (Ctrl-C, an error) if it still is
        self._stale = False  # the ring's bookkeeping may be torn: restart it at the next streamed layer
        self._trace: PassTrace | None = None
        self._layer: LayerTrace | None = None
        self._pending: list[PassTrace] = []
        self._stats = OffloadStats()
        self._removed = False
        self.on_demote: list = []  # callables told the layer indices `demote` moved to streaming
        self._hooks = []
        for i, layer in enumerate(layers):
            self._hooks.append(layer.register_forward_pre_hook(self._pre_hook(i)))
            self._hooks.append(layer.register_forward_hook(self._post_hook(i)))
            _STREAMING[layer] = weakref.ref(self)  # how find_handle() knows the layer is streamed, and by whom
        if packs:
            self._issue_until(len(slots))

    # ---- sizes ------------------------------------------------------------------------------
    @property
    def resident_layers(self) -> int:
        return len(self.layers) - len(self.packs)

    @property
    def streamed_layers(self) -> int:
        return len(self.packs)

    @property
    def ring(self) -> int:
        return len(self.slots)

    @property
    def pinned_bytes(self) -> int:
        """Host bytes holding the streamed layers (pinned on CUDA); also the bytes one pass streams."""
        return sum(p.host_bytes for p in self.packs)

    @property
    def layer_bytes(self) -> int:
        """Bytes one streamed layer sends over the link (the largest, if they differ)."""
        return max((p.host_bytes for p in self.packs), default=0)

    def codecs(self) -> list[dict]:
        """How the streamed tensors cross the link, per tensor type (a GGUF type such as "Q4_K", or the
        dtype of a dense tensor) and codec ("gguf:Q4_K", "int8", "nf4", or "copy"): tensors, bytes per pass."""
        rows: dict[tuple[str, str], dict] = {}
        for pack in self.packs:
            for e in pack.entries:
                kind = getattr(e.codec, "kind", None) or str(e.dtype).removeprefix("torch.")
                name = e.codec.name if e.codec is not None else "copy"
                row = rows.setdefault((kind, name), {"type": kind, "codec": name, "tensors": 0, "bytes": 0})
                row["tensors"] += 1
                row["bytes"] += e.host_nbytes
        return sorted(rows.values(), key=lambda r: -r["bytes"])

    def describe(self) -> dict:
        """What one pass streams: bytes, layers, the codec of each tensor type, and the last pass's
        stats (decode time included); for `generate --json` and `edgespec profile`."""
        return {"streamed_layers": self.streamed_layers, "resident_layers": self.resident_layers,
                "bytes_per_pass": self.pinned_bytes, "codecs": self.codecs(), **self.stats.as_dict()}

    @property
    def slot_bytes(self) -> int:
        """Device bytes of one slot (dense layer plus codec staging); the ring holds `ring` of them."""
        return self.slots[0].nbytes if self.slots else 0

    # ---- stats ------------------------------------------------------------------------------
    @property
    def stats(self) -> OffloadStats:
        self._resolve()
        return self._stats

    @property
    def last_pass(self):
        return self.stats.last

    def reset_stats(self) -> None:
        self._resolve()
        self._stats = OffloadStats()

    def set_link_delay(self, seconds: float) -> None:
        """Emulated per-layer link latency (seconds) added to every transfer from now on."""
        if seconds < 0:
            raise InvalidArgumentError(f"link_delay must be >= 0 seconds, got {seconds}.")
        self.transport.set_link_delay(float(seconds))

    def _resolve(self) -> None:
        while self._pending:
            self._stats.record(self._pending.pop(0).resolve(self.transport))

    # ---- the ring ---------------------------------------------------------------------------
    def _issue_until(self, end: int) -> None:
        """Submit uses [issued, end) into their slots."""
        while self._issued < end:
            k = self._issued
            self._tickets[k] = self.transport.submit(self.packs[k % len(self.packs)], self.slots[k % len(self.slots)])
            self._issued += 1

    def _acquire(self, pos: int):
        """Wait for streamed layer `pos`'s copy and bind it to its slot; returns its ticket."""
        if self._stale or self._running is not None or self._next % len(self.packs) != pos \
                or self._next not in self._tickets:
            self._restart(pos)
        k = self._next
        ticket = self._tickets.pop(k)
        self.transport.wait(ticket)
        self.packs[pos].bind(self.slots[k % len(self.slots)])
        self._running = (k, ticket)
        return ticket

    def _release(self, pos: int) -> None:
        """The layer finished computing: unbind it, free its slot, submit the use R steps ahead."""
        k, _ = self._running
        self._running = None
        self.packs[pos].unbind()
        self.transport.release(self.slots[k % len(self.slots)])
        self._next = k + 1
        self._issue_until(k + 1 + len(self.slots))

    def _restart(self, pos: int) -> None:
        """Out of step (an interrupted pass): drain, unbind everything, restart the ring at `pos`."""
        self._stop()
        n = len(self.packs)
        self._next = self._issued + (pos - self._issued) % n
        self._issued = self._next
        self._issue_until(self._next + len(self.slots))
        self._stale = False

    def _stop(self) -> None:
        """Let every copy in flight finish and unbind every streamed layer."""
        for slot in self.slots:
            self.transport.release(slot)  # after whatever the last (maybe interrupted) pass launched
        self.transport.drain()
        for pack in self.packs:
            pack.unbind()
        self._running, self._tickets = None, {}

    # ---- back-off ---------------------------------------------------------------------------
    def demote(self, count: int = 1) -> int:
        """Stream the last `count` resident layers from now on, freeing their device memory (the
        out-of-memory back-off). Call between passes. Returns how many layers moved."""
        count = min(int(count), self.resident_layers)
        if count <= 0 or self._removed:
            return 0
        self._resolve()
        self._stop()
        first = self.resident_layers - count
        with torch.no_grad():
            new = [LayerPack.pack(i, self.layers[i], self.codec, self.device.type == "cuda")
                   for i in range(first, first + count)]
        self.packs = new + self.packs
        if self.slots and all(fits(p, self.slots[0]) for p in new):
            for pack in new:
                for slot in self.slots:
                    pack.attach(slot)
        else:
            self.slots = []
            self.slots = make_slots(self.packs, min(self.ring_size, len(self.packs)), self.device)
        self._slot_of = {p.index: i for i, p in enumerate(self.packs)}
        self._next = self._issued = 0
        self._issue_until(len(self.slots))
        for listener in self.on_demote:  # e.g. a self-drafter replacing the layers it ran as the target's
            listener(list(range(first, first + count)))
        return count

    # ---- hooks ------------------------------------------------------------------------------
    def _pre_hook(self, index: int):
        def hook(module, args):
            self._enter()
            if index == 0:
                self._resolve()
                self._trace = PassTrace(self.transport.mark())
            start = self.transport.mark()
            pos = self._slot_of.get(index)
            ticket = self._acquire(pos) if pos is not None else None
            self._layer = LayerTrace(start, self.transport.mark() if ticket is not None else start,
                                     ticket=ticket)
            self._torn = False

        return hook

    def _post_hook(self, index: int):
        def hook(module, args, output):
            self._enter()
            end = self.transport.mark()
            pos = self._slot_of.get(index)
            if pos is not None:
                self._release(pos)
            if self._trace is not None and self._layer is not None:
                self._layer.compute_end = end
                self._trace.layers.append(self._layer)
                if index == len(self.layers) - 1:
                    self._trace.end = end
                    self._pending.append(self._trace)
                    self._trace = None
            self._layer = None
            self._torn = False

        return hook

    def _enter(self) -> None:
        """A hook starts: if the last one never ended, the ring restarts at the next streamed layer."""
        self._stale = self._stale or self._torn
        self._torn = True

    # ---- undo -------------------------------------------------------------------------------
    def remove(self, device: str | torch.device = "cpu") -> nn.Module:
        """Stop streaming and give every layer real weights again; the whole model ends up on `device`
        (default the host). Codec-encoded (int8/nf4) layers come back dequantized. Returns the model."""
        if self._removed:
            return self.model
        self._removed = True
        device = torch.device(device)
        self._resolve()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for layer in self.layers:
            _STREAMING.pop(layer, None)
        self.transport.close()
        for pack in self.packs:
            pack.restore(device)
        streamed = [self.layers[p.index] for p in self.packs]
        move_outside(self.model, streamed, device)
        self.packs, self.slots, self._tickets = [], [], {}
        return self.model

    def __repr__(self) -> str:
        return (f"OffloadHandle(device={self.device}, resident={self.resident_layers}, "
                f"streamed={self.streamed_layers}, ring={self.ring}, quantize={self.quantize}, "
                f"pinned_bytes={self.pinned_bytes}, slot_bytes={self.slot_bytes})")
