"""How a packed layer reaches a device slot: the only device-specific part of the streamer.

Both transports offer the same small interface, used by the streamer from the compute side:

- `submit(pack, slot) -> Ticket`: start copying `pack` into `slot` once the slot's previous occupant
  has finished computing (`slot.free`), without blocking the caller.
- `wait(ticket)`: make the compute side wait until that copy is done.
- `release(slot)`: mark "the layer in `slot` has finished computing" (sets `slot.free`).
- `mark()` / `elapsed(a, b)`: timestamps on the compute side, and seconds between two of them.
- `transfer_time(ticket)`: seconds of one transfer (link delay included; on a CPU the decode too);
  `decode_time(ticket)`: seconds spent decoding its encoded bytes in the slot (0 when none).
- `drain()`: block the host until every submitted copy (and decode) is complete. `close()`: stop.

`CudaTransport` copies on a side CUDA stream and decodes on a third one, ordered by CUDA events (no
host synchronisation per layer): a layer's decode starts as soon as its bytes land, overlapping the
previous layer's compute and the next layer's copy, so the link never waits for a decode and only
compute does (see `CudaTransport`). `ThreadTransport` (CPU) copies, then decodes, in a background worker
thread ordered by threading events, so the emulated transfer overlaps compute as the DMA engine does.
"""
from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

from edgespec.base import reach


@dataclass
class Ticket:
    """One submitted transfer."""

    nbytes: int
    done: object = None  # threading.Event (CPU) or torch.cuda.Event (CUDA)
    start: object = None
    end: object = None
    copied: object = None  # marks around the decode of encoded bytes (None: nothing to decode)
    decoded: object = None
    error: BaseException | None = None


class ThreadTransport:
    """CPU: a worker thread memcpys the packed layer into the slot, then sleeps `link_delay`."""

    def __init__(self, link_delay: float = 0.0):
        self.set_link_delay(link_delay)
        self._jobs: queue.Queue = queue.Queue()
        stopping = threading.Event()
        worker = threading.Thread(target=_copy_worker, args=(self._jobs, weakref.ref(self), stopping),
                                  name="edgespec-offload-copy", daemon=True)
        worker.start()
        self._entry = (worker, self._jobs, stopping)
        _WORKERS.add(self._entry)
        weakref.finalize(self, _stop_worker, self._entry)  # collected: the worker stops now, not at its next poll

    def set_link_delay(self, seconds: float) -> None:
        self.link_delay = seconds  # read by the worker before each sleep

    def submit(self, pack, slot) -> Ticket:
        ticket = Ticket(pack.host_bytes, done=threading.Event())
        self._jobs.put((pack, slot, ticket))
        return ticket

    def wait(self, ticket: Ticket) -> None:
        ticket.done.wait()
        if ticket.error is not None:
            raise RuntimeError("edgespec offload: copying a layer to its slot failed") from ticket.error

    def release(self, slot) -> None:
        """CPU compute is synchronous: when the layer's forward returns, its slot is free."""

    def mark(self) -> float:
        return time.perf_counter()

    def elapsed(self, a: float, b: float) -> float:
        return b - a

    def transfer_time(self, ticket: Ticket) -> float:
        ticket.done.wait()
        return ticket.end - ticket.start

    def decode_time(self, ticket: Ticket) -> float:
        ticket.done.wait()
        return ticket.decoded - ticket.copied if ticket.copied is not None else 0.0

    def drain(self) -> None:
        marker = Ticket(0, done=threading.Event())
        self._jobs.put((_Noop(), None, marker))  # FIFO: done once every earlier job is done
        marker.done.wait()

    def close(self) -> None:
        self.drain()
        self.stop()

    def stop(self) -> None:
        """Stop the worker after the copy it is running (queued prefetches are dropped) and join it."""
        _stop_worker(self._entry)


_WORKERS: set = set()  # (thread, job queue, stop event) of every copy worker not yet stopped


def _stop_worker(entry) -> None:
    thread, jobs, stopping = entry
    stopping.set()
    jobs.put(None)
    if thread is not threading.current_thread():
        thread.join(timeout=5)
    _WORKERS.discard(entry)


@atexit.register
def _stop_workers() -> None:
    """Join every copy worker before the interpreter shuts down: a daemon thread that still holds or
    frees tensors while the interpreter finalizes aborts the process ("terminate called ...")."""
    for entry in list(_WORKERS):
        _stop_worker(entry)


def _copy_worker(jobs: queue.Queue, transport_ref, stopping: threading.Event) -> None:
    """Run copy jobs in order; exit on None or `stopping`, or once the transport has been garbage-collected."""
    while True:
        try:
            job = jobs.get(timeout=1.0)
        except queue.Empty:
            if transport_ref() is None:
                return
            continue
        if job is None or stopping.is_set():
            return
        pack, slot, ticket = job
        ticket.start = time.perf_counter()
        try:
            with torch.no_grad():
                pack.copy(slot)
                if pack.staged:
                    ticket.copied = time.perf_counter()
                    pack.decode(slot)
                    ticket.decoded = time.perf_counter()
            delay = getattr(transport_ref(), "link_delay", 0.0)  # no strong reference kept
            if delay > 0 and ticket.nbytes:
                time.sleep(delay)
        except BaseException as err:  # surfaced to the compute side by wait()
            ticket.error = err
        ticket.end = time.perf_counter()
        ticket.done.set()
        del job, pack, slot, ticket  # hold no tensors while waiting for the next job


class _Noop:
    """A job that copies nothing: its completion means every earlier job is complete."""

    host_bytes = 0
    staged = False

    def copy(self, slot) -> None:
        pass


@dataclass
class CudaTransport:
    """CUDA: three streams that meet only at events.

    - copy stream: waits until the slot's previous occupant has finished computing (`slot.free`),
      then issues the layer's one or two host-to-device copies (`ticket.end`: its bytes have landed);
    - decode stream: waits for `ticket.end`, decodes the staged bytes into the slot's dense layout
      (`ticket.decoded`); the copy stream never waits for it, so the next layer's copy runs meanwhile;
    - compute stream (the current one): waits for `ticket.done` (decoded, or landed when nothing is
      encoded) before the layer runs.
    A slot's staging bytes are overwritten only by its next copy, which waits for `slot.free`, after
    the compute that waited for their decode.

    `link_delay` is emulated on the copy stream with `torch.cuda._sleep` (a GPU spin of the right
    number of cycles, calibrated once), so a slow link delays the layer's arrival, not the host.
    """

    device: torch.device
    link_delay: float = 0.0
    stream: torch.cuda.Stream = field(init=False)
    decoder: torch.cuda.Stream = field(init=False)
    _cycles_per_s: float | None = field(default=None, init=False)

    def __post_init__(self):
        self.stream = torch.cuda.Stream(self.device)
        self.decoder = torch.cuda.Stream(self.device)
        self.set_link_delay(self.link_delay)

    def set_link_delay(self, seconds: float) -> None:
        if seconds > 0 and self._cycles_per_s is None:
            self._cycles_per_s = self._measure_cycles()
        self.link_delay = seconds

    def _compute_stream(self):
        return torch.cuda.current_stream(self.device)

    def submit(self, pack, slot) -> Ticket:
        ticket = Ticket(pack.host_bytes)
        with torch.cuda.stream(self.stream):
            if slot.free is not None:
                self.stream.wait_event(slot.free)
            ticket.start = _timed_event(self.stream)
            pack.copy(slot, non_blocking=True)
            if self.link_delay > 0:
                reach.gpu_sleep(int(self.link_delay * self._cycles_per_s))
            ticket.end = ticket.done = _timed_event(self.stream)
        if pack.staged:
            with torch.cuda.stream(self.decoder):
                self.decoder.wait_event(ticket.end)
                ticket.copied = _timed_event(self.decoder)
                pack.decode(slot)
                ticket.decoded = ticket.done = _timed_event(self.decoder)
        return ticket

    def wait(self, ticket: Ticket) -> None:
        self._compute_stream().wait_event(ticket.done)

    def release(self, slot) -> None:
        event = torch.cuda.Event()
        event.record(self._compute_stream())
        slot.free = event

    def mark(self):
        return _timed_event(self._compute_stream())

    def elapsed(self, a, b) -> float:
        b.synchronize()
        return a.elapsed_time(b) / 1e3

    def transfer_time(self, ticket: Ticket) -> float:
        return self.elapsed(ticket.start, ticket.end)

    def decode_time(self, ticket: Ticket) -> float:
        return self.elapsed(ticket.copied, ticket.decoded) if ticket.copied is not None else 0.0

    def drain(self) -> None:
        self.stream.synchronize()
        self.decoder.synchronize()

    def close(self) -> None:
        self.drain()

    def _measure_cycles(self) -> float:
        """GPU clock cycles per second as seen by torch.cuda._sleep."""
        spin = 20_000_000
        a = _timed_event(self.stream)
        with torch.cuda.stream(self.stream):
            reach.gpu_sleep(spin)
        b = _timed_event(self.stream)
        return spin / self.elapsed(a, b)


def _timed_event(stream) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def make_transport(device: torch.device, link_delay: float):
    return CudaTransport(device, link_delay) if device.type == "cuda" else ThreadTransport(link_delay)
