"""The CUDA transport's decode runs off the critical path, checked on a CPU with fake CUDA streams that
keep happens-before sets: each operation (a layer's copy, its decode, its compute) records every
operation it is ordered after, through its stream's program order and the events streams wait on.

For every streamed use k (ring R): the decode follows its copy and precedes its compute; it runs on
its own stream; the next layer's copy does not wait for it, nor does the next layer's decode wait for
this layer's compute; the copy that reuses the slot (k + R) follows this layer's compute. Outputs are
the same bits as the CPU transport's, for plain, int8, nf4 and GGUF-block layers, and a layer crosses
the link in at most two copies (its plain tensors, its encoded regions)."""
from __future__ import annotations

import contextlib
import copy
import itertools

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from edgespec.offload import api, offload_layers, transport
from edgespec.offload.codecs import GGUFRaw, Int8Rows
from edgespec.offload.layout import Encoded, LayerPack
from tests.test_offload import IDS, make, run_steps


class Order:
    """Happens-before bookkeeping shared by the fake streams and events of one run."""

    def __init__(self):
        self.streams, self.ops, self.ids = [], {"copy": [], "decode": [], "compute": []}, itertools.count()
        self.compute = FakeStream(self, "compute")
        self.current = self.compute

    def op(self, kind: str) -> None:
        """An operation issued on the current stream: it follows everything that stream follows."""
        stream, op = self.current, next(self.ids)
        self.ops[kind].append((op, stream.name, stream.after))
        stream.after = stream.after | {op}

    def before(self, a: tuple, b: tuple) -> bool:
        """Whether operation `a` is ordered before operation `b`."""
        return a[0] in b[2]


class FakeStream:
    def __init__(self, order: Order, name: str):
        self.order, self.name, self.after = order, name, frozenset()

    def wait_event(self, event) -> None:
        assert event.after is not None, "waiting on an event never recorded"
        self.after = self.after | event.after

    def synchronize(self) -> None:
        pass


def fake_cuda(monkeypatch) -> Order:
    order = Order()
    names = iter(["copy", "decode"])  # the order CudaTransport makes its streams in

    class Event:
        def __init__(self, enable_timing=False):
            self.after, self.t = None, None

        def record(self, stream=None):
            self.after, self.t = (stream or order.current).after, next(order.ids)

        def synchronize(self):
            assert self.after is not None

        def elapsed_time(self, other):
            return float(other.t - self.t)

    @contextlib.contextmanager
    def on(stream):
        before, order.current = order.current, stream
        try:
            yield
        finally:
            order.current = before

    def traced(kind, method):
        def run(pack, slot, *args, **kw):
            order.op(kind)
            return method(pack, slot, *args, **kw)
        return run

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream(order, next(names)))
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: order.current)
    monkeypatch.setattr(api, "make_transport", lambda device, delay: transport.CudaTransport(device, delay))
    monkeypatch.setattr(LayerPack, "copy", traced("copy", LayerPack.copy))
    monkeypatch.setattr(LayerPack, "decode", traced("decode", LayerPack.decode))
    return order


class Q8Layers:
    """A layer source handing every streamed 2-D weight over as GGUF Q8_0 blocks of its own values."""

    encodes = True

    def fill(self, i, layer, streamed: bool) -> dict:
        if not streamed:
            return {}
        out = {}
        for name, t in layer.state_dict().items():
            if t.dim() == 2 and t.shape[1] % 32 == 0:
                raw = np.ascontiguousarray(quantize(t.float().numpy(), Q.Q8_0)).view(np.uint8).reshape(-1)
                write = lambda region, raw=raw: region.copy_(torch.from_numpy(raw))  # noqa: E731
                out[name] = Encoded(GGUFRaw("Q8_0"), raw.nbytes, write)
        return out


def offloaded(quantize_, ring: int, gguf: bool):
    model = make("llama", layers=4)
    handle = offload_layers(model, "cpu", resident_layers=1, ring=ring, progress=False, quantize=quantize_,
                            source=Q8Layers() if gguf else None)
    return model, handle


CASES = [(None, 2, False), ("int8", 2, False), ("nf4", 3, False), (None, 2, True)]


@pytest.mark.parametrize("quantize_,ring,gguf", CASES, ids=["plain", "int8", "nf4-ring3", "gguf-q8_0"])
def test_decode_overlaps_the_next_copy_and_the_previous_compute(monkeypatch, quantize_, ring, gguf):
    reference, handle = offloaded(quantize_, ring, gguf)
    want = run_steps(reference, IDS)  # the CPU transport: the reference bits
    handle.remove()  # its copy thread stopped before the fakes go in
    order = fake_cuda(monkeypatch)
    model, handle = offloaded(quantize_, ring, gguf)
    for layer in model.model.layers[1:]:
        layer.register_forward_pre_hook(lambda module, args: order.op("compute"))  # after the ring's own hook
    got = run_steps(model, IDS)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    copies, decodes, computes = (order.ops[k] for k in ("copy", "decode", "compute"))
    staged = quantize_ is not None or gguf
    assert len(computes) == 5 * 3 and len(copies) == len(computes) + ring  # prefetched ahead
    assert len(decodes) == (len(copies) if staged else 0)
    assert {c[1] for c in copies} == {"copy"} and {c[1] for c in computes} == {"compute"}
    for k, compute in enumerate(computes):
        ready = decodes[k] if staged else copies[k]
        assert order.before(copies[k], compute) and order.before(ready, compute)
        if k + ring < len(copies):
            assert order.before(compute, copies[k + ring])  # the slot is reused after its compute
        if staged:
            assert decodes[k][1] == "decode" and order.before(copies[k], decodes[k])
            assert not order.before(decodes[k], copies[k + 1])  # the link never waits for a decode
            assert not order.before(compute, decodes[k + 1])  # the next decode overlaps this compute
    for pack in handle.packs:
        for copies_, _ in pack._loads.values():
            assert 1 <= len(copies_) <= 2 and all(src.data_ptr() >= pack.host.data_ptr() for _, src in copies_)
            assert sum(src.numel() for _, src in copies_) == pack.host_bytes  # the whole pack, once
    handle.remove()


def test_a_layer_with_plain_and_encoded_tensors_crosses_in_two_copies():
    layer = copy.deepcopy(make("llama", layers=1).model.layers[0])
    pack = LayerPack.pack(0, layer, codec=Int8Rows())
    plain = [e for e in pack.entries if e.codec is None]
    assert plain and all(e.offset == e.host_offset < pack.plain_bytes for e in plain)  # same place in both
    assert pack.entries[: len(plain)] == plain and pack.staged_bytes == pack.host_bytes - pack.plain_bytes
