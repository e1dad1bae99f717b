"""What a verification pass costs across stages, on paper: the sum of the stages' passes (each streams
what its device cannot hold over its own host link, and computes) plus the hops between them (the
tree's hidden states forward, the verdict back). The scheduler's pass curve sees the same thing in
its measurements (a pipeline's verify time includes the hops); `pass_seconds` is that curve predicted,
for the figures in benchmarks/pipeline_hops.md (scripts/pipeline_figures.py) and for the emulated
runs (scripts/pipeline_bench.py) to be checked against.
"""
from __future__ import annotations

from dataclasses import dataclass

HEADER_BYTES = 16 * 8 + 6 * 8  # the int64 header and the sampler's float64 settings


@dataclass(frozen=True)
class Net:
    """A network between two stages: usable bytes per second, seconds of latency per message."""

    name: str
    bytes_per_s: float
    latency: float

    def seconds(self, nbytes: int, messages: int = 1) -> float:
        return messages * self.latency + nbytes / self.bytes_per_s


# payload rate ~94 % of the line rate (TCP/IP framing); one-way latency of a switched LAN
NETS = {"1GbE": Net("1GbE", 0.94 * 125e6, 100e-6), "10GbE": Net("10GbE", 0.94 * 1.25e9, 50e-6),
        "25GbE": Net("25GbE", 0.94 * 3.125e9, 30e-6)}
# host → device links, usable bytes per second (pinned copies): PCIe 4.0 / 5.0 x16
LINKS = {"gen4": 25e9, "gen5": 50e9}


@dataclass(frozen=True)
class Shape:
    """A target as the pass sees it: layers, hidden size, bytes per layer as stored (e.g. Q4_K_M),
    parameters per layer (for compute)."""

    name: str
    layers: int
    hidden: int
    layer_bytes: float
    layer_params: float


SHAPES = {  # Q4_K_M files: Llama-3.1-70B 42.5 GB, Llama-3.1-405B 243 GB
    "70B": Shape("70B", 80, 8192, 42.5e9 / 80, 70.6e9 / 80),
    "405B": Shape("405B", 126, 16384, 243e9 / 126, 405.8e9 / 126),
}


def hop_bytes(tokens: int, nodes: int, hidden: int, dtype_bytes: int = 2) -> int:
    """One forward hop: header, tree (tokens and parents), sampler, hidden states of every pass token."""
    return HEADER_BYTES + 16 * nodes + tokens * hidden * dtype_bytes


def hops_seconds(stages: int, tokens: int, hidden: int, net: Net, dtype_bytes: int = 2) -> float:
    """The hops of one pass over `stages` stages: stages - 1 forward hops of the hidden states and
    the verdict back from the last stage (a few hundred bytes)."""
    if stages < 2:
        return 0.0
    forward = hop_bytes(tokens, tokens, hidden, dtype_bytes)
    return (stages - 1) * net.seconds(forward, 5) + net.seconds(HEADER_BYTES + 8 * 64, 2)


def emulated_seconds(nets: list, sent: tuple[int, int], back: tuple[int, int]) -> float:
    """What a run's hops cost on emulated networks (`nets[r]`: stage r's, None for a real one): every
    stage but the last relays what stage 0 sent (`sent`: messages, bytes) to the next, and the last
    sends the verdicts back (`back`: messages, bytes). Exactly the sleeps wire.Link adds."""
    down = sum(net.seconds(sent[1], sent[0]) for net in nets[:-1] if net is not None)
    return down + (nets[-1].seconds(back[1], back[0]) if nets[-1] is not None else 0.0)


def stage_seconds(shape: Shape, layers: int, tokens: int, vram_bytes: float, link: float, flops: float) -> float:
    """One stage's pass: its layers that do not fit in `vram_bytes` stream over `link` (bytes/s) while
    all of them compute (2 flops per parameter per token at `flops` per second); the longer wins
    (the streamer overlaps the two)."""
    resident = min(layers, int(vram_bytes // shape.layer_bytes))
    stream = (layers - resident) * shape.layer_bytes / link
    compute = 2 * shape.layer_params * layers * tokens / flops
    return max(stream, compute)


def pass_seconds(shape: Shape, stages: int, tokens: int, net: Net, link: float, vram_bytes: float = 20e9,
                 flops: float = 100e12) -> float:
    """A pass over `tokens` (stem + tree) with the layers split evenly over `stages` machines, each with
    `vram_bytes` of device memory for layers: the stages' passes one after another, plus the hops."""
    split = [shape.layers // stages + (1 if r < shape.layers % stages else 0) for r in range(stages)]
    local = sum(stage_seconds(shape, n, tokens, vram_bytes, link, flops) for n in split)
    return local + hops_seconds(stages, tokens, shape.hidden, net)
