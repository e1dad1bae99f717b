"""A stage process (`edgespec stage`, or `python -m edgespec.distributed.stage`): joins stage 0, loads
its layer range from its own copy of the model file, then serves passes until stage 0 stops it. A
failure of its neighbours is reported to stage 0 through the store; the stage then waits for the next
generation and joins it with the weights it has (its cache starts empty).

    edgespec stage --coordinator 192.168.1.10:29500 --rank 1 --model model.gguf --bind 192.168.1.11
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from edgespec.base import memory
from edgespec.base.errors import EdgespecError, StageFailedError
from edgespec.core.kv import cache_len, new_cache
from edgespec.core.tree import Tree
from edgespec.core.verify import pass_inputs, walk
from edgespec.distributed import wire
from edgespec.distributed.hops import Net
from edgespec.distributed.group import Member, Timeouts, identity, release
from edgespec.distributed.layers import Range, StageModel, load_range
from edgespec.distributed.wire import CROP, FORWARD, KEEP, PING, STOP, VERDICT, Header, Link


class NewGeneration(Exception):
    """Stage 0 opened a new generation: leave this one."""


def serve(member: Member, spec: str | None, world: int, device: torch.device, *, link_delay: float = 0.0,
          stream_quant: str | None = None, progress: bool = True, emulate=None) -> int:
    """Join, load, serve; again after each failure. Returns 0 when stage 0 stopped the pipeline."""
    ident, gen, stage = identity(spec), 0, None
    while member.alive:
        hello = {"identity": ident, "host": member.bind, "pid": os.getpid(), "device": str(device),
                 "free": memory.free_memory(device),
                 "emulate": [emulate.latency, emulate.bytes_per_s] if emulate is not None else None}
        gen, plan = member.join(hello, gen)
        rng = Range.of(plan, member.rank)
        try:
            if stage is None or stage.range != rng:
                stage = None
                stage = load_range(spec, rng, device, link_delay=link_delay, stream_quant=stream_quant,
                                   progress=progress)
        except EdgespecError as err:
            member.fault(gen, f"could not load its layers: {err}")
            raise
        group = member.loaded(gen, world)
        names = [f"stage {r}" for r in range(world)]
        link = Link(group, member.rank, names, member.timeouts.op, _watch(member, gen), emulate=emulate)
        try:
            if run(stage, link, member.rank, world):
                return 0
        except NewGeneration:
            pass
        except StageFailedError as err:
            member.fault(gen, str(err))
        finally:
            release(group)
    return 1


def _watch(member: Member, gen: int):
    def watch():
        if not member.alive:
            raise SystemExit("edgespec stage: stage 0 is gone")
        if member.current() != gen:
            raise NewGeneration()
    return watch


@torch.no_grad()
def run(stage: StageModel, link: Link, rank: int, world: int) -> bool:
    """Serve messages from the previous stage until STOP (True)."""
    cache, prev, last = new_cache(None), rank - 1, rank == world - 1
    while True:
        head = link.recv_header(prev, idle=True)
        if head.op in (FORWARD, PING):
            _forward(stage, cache, link, head, rank, last)
            continue
        keep = link.recv(prev, (head.count,)) if head.op == KEEP else None
        if head.op == KEEP:
            cache.keep(keep)
        elif head.op == CROP:
            cache.crop_to(head.count)
        elif head.op != STOP:
            raise StageFailedError(f"stage {rank} got an unknown op {head.op} from stage {prev}", rank)
        if not last:
            link.send(rank + 1, [head.tensor()] + ([keep] if keep is not None else []))
        if head.op == STOP:
            return True


def _forward(stage: StageModel, cache, link: Link, head: Header, rank: int, last: bool) -> None:
    prev = rank - 1
    specs = [((2, head.nodes), torch.long), ((len(wire.SAMPLER),), torch.float64)]
    specs += [((head.history,), torch.long)] if head.history else []
    parts = link.recv_many(prev, specs + [((head.queries, head.hidden), wire.DTYPES[head.dtype])])
    tree_t, sampler_t, hidden = parts[0], parts[1], parts[-1]
    history = parts[2] if head.history else None
    if cache_len(cache) != head.past:
        raise StageFailedError(f"stage {rank}'s cache holds {cache_len(cache)} entries, stage 0's {head.past}", rank)
    if head.op == PING:  # the same messages, no compute: what the transport alone costs
        _relay_or_answer(link, head, rank, last, [tree_t, sampler_t, hidden], torch.zeros(1, dtype=torch.long))
        return
    tokens, parents = tree_t[0], tree_t[1]
    s = head.stem
    positions_root = head.past + s - 1
    tree = Tree(tokens, parents, _depths(parents), torch.zeros(head.nodes), torch.full((head.nodes,), -1))
    positions, allowed = pass_inputs(head.past, s, tree)
    out = stage.run(cache, positions, allowed, hidden=hidden)
    if not last:
        _relay_or_answer(link, head, rank, last, [tree_t, sampler_t] + ([history] if history is not None else [])
                         + [out.cpu()], None)
        return
    sampler = wire.sampler_from(sampler_t, head.key)
    verdict = walk(tree, lambda i: stage.logits(out[s - 1 + i]), sampler, positions_root,
                   history.tolist() if history is not None else None)
    body = torch.tensor(verdict.path + verdict.tokens, dtype=torch.long)
    link.send(0, [Header(VERDICT, head.seq, count=len(verdict.path)).tensor(), body])


def _relay_or_answer(link: Link, head: Header, rank: int, last: bool, parts: list, answer) -> None:
    """Pass the message on to the next stage, or (the last stage) answer stage 0 with `answer`."""
    if not last:
        link.send(rank + 1, [head.tensor()] + parts)
    else:
        link.send(0, [Header(VERDICT, head.seq, count=0).tensor(), answer])


def _depths(parents: torch.Tensor) -> torch.Tensor:
    depths = torch.zeros_like(parents)
    for i, p in enumerate(parents.tolist()):  # topological order: a parent comes before its children
        if p >= 0:
            depths[i] = depths[p] + 1
    return depths


def emulated(latency: float | None, gbps: float | None):
    """The emulated network of `--hop-latency` / `--hop-gbps` (None: the real one)."""
    if latency is None and gbps is None:
        return None
    return Net("emulated", (gbps or 1e6) * 1e9 / 8, latency or 0.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgespec stage", description="Serve a layer range of a target split across "
                                "machines. Loopback or a trusted LAN only: the ports have no authentication.")
    p.add_argument("--coordinator", required=True, help="HOST:PORT of stage 0 (its --bind and --port)")
    p.add_argument("--rank", type=int, required=True, help="this stage's number, 1.. in pipeline order")
    p.add_argument("--world", type=int, required=True, help="how many stages, stage 0 included")
    p.add_argument("--model", default=None, help="this machine's copy of the target (default: the embedded one)")
    p.add_argument("--bind", default="127.0.0.1", help="this machine's address the other stages reach it at")
    p.add_argument("--allow-public", action="store_true", help="allow binding to a non-private address")
    p.add_argument("--device", default="auto")
    p.add_argument("--link-delay", type=float, default=0.0, help="emulated seconds per streamed layer")
    p.add_argument("--stream-quant", default=None)
    p.add_argument("--op-timeout", type=float, default=Timeouts.op)
    p.add_argument("--hop-latency", type=float, default=None, help="emulate a network: seconds per message sent")
    p.add_argument("--hop-gbps", type=float, default=None, help="emulate a network: gigabits per second")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    from edgespec.loading.models import pick_device

    host, _, port = a.coordinator.rpartition(":")
    try:
        member = Member(host, int(port), a.rank, a.bind, Timeouts(op=a.op_timeout), a.allow_public)
        return serve(member, a.model, a.world, pick_device(a.device), link_delay=a.link_delay,
                     stream_quant=a.stream_quant, progress=not a.quiet, emulate=emulated(a.hop_latency, a.hop_gbps))
    except EdgespecError as err:
        print(f"edgespec stage {a.rank}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
