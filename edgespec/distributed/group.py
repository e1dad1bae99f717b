"""Who is in the pipeline: stage 0 (the coordinator) hosts a torch.distributed TCPStore; every other
stage connects to it, says hello (its edgespec, wire and torch versions, its model file's identity, its
free memory), gets the plan (its layer range) and, once loaded, a gloo process group of this
*generation*. Stages beat a heartbeat counter in the store; stage 0 watches the counters (and the
faults stages report) while it waits, so a dead or unreachable stage is named within `dead_after`
seconds. After a failure stage 0 opens a new generation: live stages leave the old group (keeping
their weights) and join the new one with the restarted stage; every cache starts empty again.

Nothing here authenticates anyone: the store's port and gloo's ports accept whoever connects. Bind to
loopback or a trusted LAN only; `check_address` refuses a public address unless asked explicitly.
The store carries only short JSON strings (hellos, plans, faults) and counters, never pickle.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from edgespec.base import VERSION, reach
from edgespec.base.errors import InvalidArgumentError, StageFailedError
from edgespec.distributed.wire import WIRE_VERSION
from edgespec.loading.resolve import resolve

HEADER_BYTES = 8 << 20  # a GGUF's identity: its size, the hash of its first 8 MiB (header, metadata, table)...
SAMPLE_BYTES = 1 << 20  # ... and of the MiB after the header and the last MiB (weights)


@dataclass(frozen=True)
class Timeouts:
    """Seconds: `op` one message of a pass at most; `dead_after` heartbeat silence that names a stage
    dead; `join` for stages to say hello (and to rejoin after a failure); `load` for them to load their
    layers; `beat` between heartbeats."""

    op: float = 300.0
    dead_after: float = 5.0
    join: float = 120.0
    load: float = 3600.0
    beat: float = 0.25


def check_address(address: str, allow_public: bool = False) -> None:
    """Refuse to bind to an address reachable from the internet (or to every interface) unless
    `allow_public`: the collective's ports have no authentication."""
    try:
        ips = {ipaddress.ip_address(info[4][0]) for info in socket.getaddrinfo(address, None)}
    except (socket.gaierror, ValueError) as err:
        raise InvalidArgumentError(f"cannot resolve the stage address {address!r}: {err}") from None
    public = [ip for ip in ips if ip.is_unspecified or not (ip.is_loopback or ip.is_private or ip.is_link_local)]
    if public and not allow_public:
        raise InvalidArgumentError(
            f"refusing to bind a stage to {address} ({public[0]}): it is not a loopback or private LAN address, and the "
            "stage's ports have no authentication (anyone who reaches them can drive the pipeline). Use a "
            "trusted LAN address, or pass --allow-public if the network is yours and firewalled.")


def identity(spec: str | None) -> dict:
    """What must match on every stage: edgespec, the wire format, torch's minor version, the model file."""
    folder, gguf = resolve(spec)
    files = [Path(folder) / gguf] if gguf else sorted(Path(folder).glob("*.safetensors")) + [Path(folder) / "config.json"]
    digest, size = hashlib.sha256(), 0
    for path in files:
        if not path.is_file():
            continue
        size += path.stat().st_size
        digest.update(path.name.encode() + _head(path))
    return {"edgespec": VERSION, "wire": WIRE_VERSION, "torch": ".".join(torch.__version__.split(".")[:2]),
            "model": {"size": size, "hash": digest.hexdigest()[:16]}}


def _head(path: Path) -> bytes:
    """The file's header (a safetensors' JSON header, a GGUF's first 8 MiB), the MiB after it and its
    last MiB: same-shaped models with other weights differ there."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") + 8 if path.suffix == ".safetensors" else HEADER_BYTES
        f.seek(0)
        head = f.read(min(n, HEADER_BYTES) + SAMPLE_BYTES)
        f.seek(max(0, path.stat().st_size - SAMPLE_BYTES))
        return head + f.read()


def mismatch(mine: dict, theirs: dict) -> str | None:
    """What differs between two identities, in words (None: nothing)."""
    for key in ("edgespec", "wire", "torch"):
        if mine.get(key) != theirs.get(key):
            return f"{key} {theirs.get(key)} there, {mine.get(key)} here"
    if mine["model"] != theirs.get("model"):
        return (f"a different model file ({theirs.get('model')} there, {mine['model']} here: size in bytes and hash "
                "of its header)")
    return None


def make_group(store, gen: int, rank: int, world: int, bind: str, timeout: float):
    """The gloo process group of generation `gen`, its sockets bound to `bind`."""
    opts = reach.gloo_options(timedelta(seconds=timeout), dist.ProcessGroupGloo.create_device(hostname=bind))
    return dist.ProcessGroupGloo(dist.PrefixStore(f"edgespec/pg{gen}", store), rank, world, opts)


def release(group) -> None:
    """Leave a generation's group: abort its pending work so peers waiting on it fail at once."""
    if group is not None:
        try:
            group.abort()
        except Exception:  # noqa: BLE001 — an already broken group
            pass


def _get(store, key: str) -> str | None:
    return store.get(key).decode() if store.check([key]) else None


class Coordinator:
    """Stage 0's side: the store, the generations, the watch over the other stages."""

    def __init__(self, bind: str, port: int, world: int, ident: dict, timeouts: Timeouts = Timeouts(),
                 allow_public: bool = False):
        check_address(bind, allow_public)
        self.store = dist.TCPStore(bind, port, None, True, timedelta(seconds=timeouts.join), wait_for_workers=False)
        self.bind, self.world, self.ident, self.timeouts = bind, world, ident, timeouts
        self.port, self.gen, self.group, self.hellos = self.store.port, 0, None, {}
        self._beats: dict[int, tuple[int, float]] = {}
        self._checked = 0.0

    def name(self, rank: int) -> str:
        host = self.hellos.get(rank, {}).get("host", "?")
        return "stage 0 (here)" if rank == 0 else f"stage {rank} ({host})"

    def open(self, plan_for) -> tuple[object, dict]:
        """A new generation: every stage says hello, is checked, gets `plan_for(hellos)` (a JSON-ready
        dict with "ranges"), loads, and the group is made. Returns (group, plan)."""
        release(self.group)
        self.group = None
        self.gen = self.store.add("gen", 1)
        self.hellos = self._hellos()
        plan = plan_for(self.hellos)
        self.store.set(f"plan/{self.gen}", json.dumps(plan))
        self._beats = {}
        self._await("loaded", self.timeouts.load, "load its layers")
        self.group = make_group(self.store, self.gen, 0, self.world, self.bind, self.timeouts.op)
        return self.group, plan

    def _hellos(self) -> dict[int, dict]:
        keys = {r: f"hello/{self.gen}/{r}" for r in range(1, self.world)}
        self._await_keys(keys, self.timeouts.join, "join", watch=False)
        hellos = {r: json.loads(self.store.get(k).decode()) for r, k in keys.items()}
        for r, hello in hellos.items():
            why = mismatch(self.ident, hello["identity"])
            if why is not None:
                self.store.set(f"refused/{self.gen}/{r}", why)
                raise StageFailedError(f"stage {r} ({hello.get('host')}) refused: {why}. Every stage must run the same "
                                       "edgespec and torch with the same model file.", r)
        return hellos

    def _await(self, what: str, deadline: float, doing: str) -> None:
        self._await_keys({r: f"{what}/{self.gen}/{r}" for r in range(1, self.world)}, deadline, doing)

    def _await_keys(self, keys: dict[int, str], deadline: float, doing: str, watch: bool = True) -> None:
        start = time.monotonic()
        while True:
            missing = [r for r, k in keys.items() if not self.store.check([k])]
            if not missing:
                return
            if watch:
                self.watch(force=True)
            if time.monotonic() - start > deadline:
                r = missing[0]
                raise StageFailedError(f"stage {r} did not {doing} within {deadline:g} s: start (or restart) it with "
                                       f"`edgespec stage --rank {r} --coordinator {self.bind}:{self.port} ...`", r)
            time.sleep(0.02)

    def watch(self, force: bool = False) -> None:
        """Raise StageFailedError for a stage that reported a fault or whose heartbeat stopped."""
        now = time.monotonic()
        if not force and now - self._checked < 0.1:
            return
        self._checked = now
        silent = self._silent(now)
        if silent is not None:
            raise StageFailedError(f"{self.name(silent)} stopped answering: no heartbeat for "
                                   f"{self.timeouts.dead_after:g} s", silent)
        for r in range(1, self.world):
            fault = _get(self.store, f"fault/{self.gen}/{r}")
            if fault is not None:
                raise StageFailedError(f"{self.name(r)} failed: {fault}", r)

    def _silent(self, now: float) -> int | None:
        """The first stage whose heartbeat counter has not moved for `dead_after` seconds."""
        for r in range(1, self.world):
            count = int(self.store.add(f"beat/{r}", 0))
            last = self._beats.get(r)
            if last is None or last[0] != count:
                self._beats[r] = (count, now)
            elif now - last[1] > self.timeouts.dead_after:
                return r
        return None

    def stale(self, wait: float) -> int | None:
        """The first stage whose heartbeat stays silent for `wait` seconds from now (None: all beat)."""
        start = time.monotonic()
        while time.monotonic() - start < wait:
            silent = self._silent(time.monotonic())
            if silent is not None:
                return silent
            time.sleep(0.05)
        return None


class Member:
    """A stage's side: its connection to the store, its heartbeat, its joins."""

    def __init__(self, host: str, port: int, rank: int, bind: str, timeouts: Timeouts = Timeouts(),
                 allow_public: bool = False):
        check_address(bind, allow_public)
        self.rank, self.bind, self.timeouts = rank, bind, timeouts
        self.store = dist.TCPStore(host, port, None, False, timedelta(seconds=timeouts.join))
        beat_store = dist.TCPStore(host, port, None, False, timedelta(seconds=timeouts.join))
        self.alive = True
        threading.Thread(target=self._beat, args=(beat_store,), daemon=True, name="edgespec-beat").start()

    def _beat(self, store) -> None:
        while self.alive:
            try:
                store.add(f"beat/{self.rank}", 1)
            except Exception:  # noqa: BLE001 — the coordinator is gone
                self.alive = False
                return
            time.sleep(self.timeouts.beat)

    def current(self) -> int:
        """The generation stage 0 is at; exits (status 0) when stage 0 is gone: the pipeline is over."""
        try:
            return int(self.store.add("gen", 0))
        except dist.DistError:
            self.alive = False
            raise SystemExit("edgespec stage: stage 0 is gone (its answer is over or it stopped); exiting") from None

    def join(self, hello: dict, last: int) -> tuple[int, dict]:
        """Wait for a generation after `last` that is still gathering hellos, say hello, return (gen, plan)."""
        while True:
            gen = self.current()
            if gen > last and not self.store.check([f"plan/{gen}"]):
                self.store.set(f"hello/{gen}/{self.rank}", json.dumps(hello))
                plan = self._plan(gen)
                if plan is not None:
                    return gen, plan
            time.sleep(0.05)

    def _plan(self, gen: int) -> dict | None:
        while self.current() == gen:
            refused = _get(self.store, f"refused/{gen}/{self.rank}")
            if refused is not None:
                raise StageFailedError(f"stage 0 refused this stage: {refused}", self.rank)
            plan = _get(self.store, f"plan/{gen}")
            if plan is not None:
                return json.loads(plan)
            time.sleep(0.05)
        return None

    def loaded(self, gen: int, world: int):
        """Say the layers are loaded; the generation's group once every stage is."""
        self.store.set(f"loaded/{gen}/{self.rank}", "1")
        return make_group(self.store, gen, self.rank, world, self.bind, self.timeouts.op)

    def fault(self, gen: int, message: str) -> None:
        try:
            self.store.set(f"fault/{gen}/{self.rank}", message[:500])
        except Exception:  # noqa: BLE001 — the coordinator is gone too
            self.alive = False
