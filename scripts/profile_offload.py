#!/usr/bin/env python
"""Profile layer streaming: one offloaded forward per tree size against the link's bandwidth bound.

    python scripts/profile_offload.py --shape llama-8b --dtype bf16 --vram-gb 24 --compare-accelerate
    python scripts/profile_offload.py --shape tiny --device cpu          # seconds, on any machine
    python scripts/profile_offload.py --shape llama-8b --gguf-blocks Q4_K --vram-gb 24   # GGUF blocks streamed raw
    python scripts/profile_offload.py --shape llama-8b --quantize nf4 --vram-gb 24 [--no-bnb-kernel]

For each tree size T it runs an offloaded forward of T tokens on top of a `--prefix`-token KV cache
with a random tree-style 4-D mask (what a speculative verification pass does) and reports the pass
time, the bytes streamed, the link bound (streamed bytes / measured bandwidth), pass / bound, and the
transfer / compute / wait / decode / overlap figures of the streamer. A ratio near 1 means the pass
runs at link speed: compute (and decoding) is hidden behind the transfers. `--gguf-blocks Q4_K` streams
every 2-D weight of the streamed layers as random valid GGUF blocks of that type (what a GGUF target's
layers are: bytes as in the file, decoded on the device after each copy); `--no-bnb-kernel` makes
`--quantize nf4` decode with edgespec's torch code on CUDA instead of bitsandbytes' kernel.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgespec.scheduler.timing import time_passes  # noqa: E402
from edgespec.offload import offload_layers  # noqa: E402
from edgespec.offload.bandwidth import measure_bandwidth  # noqa: E402
from edgespec.base.device import hold_beyond, param_bytes  # noqa: E402
from edgespec.offload.shapes import DTYPES, SHAPES, build_random_model  # noqa: E402

MB = 1e6


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny")
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resident", default="0", help="leading layers kept on the device: N or 'auto'")
    ap.add_argument("--ring", type=int, default=2)
    ap.add_argument("--quantize", choices=["int8", "nf4"], default=None)
    ap.add_argument("--gguf-blocks", default=None, help="stream 2-D weights as random valid GGUF blocks (e.g. Q4_K)")
    ap.add_argument("--no-bnb-kernel", action="store_true", help="nf4 on CUDA: torch decode, not bitsandbytes'")
    ap.add_argument("--vram-gb", type=float, default=None,
                    help="CUDA: act like a card of this size (the rest is taken by a dummy tensor)")
    ap.add_argument("--tree-sizes", default="1,16,64,256,1024,2048")
    ap.add_argument("--prefix", type=int, default=128, help="KV-cache tokens before each tree")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--link-delay", type=float, default=0.0, help="emulated extra seconds per streamed layer")
    ap.add_argument("--compare-accelerate", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def summarize(rows: list[dict], bandwidth: float) -> list[dict]:
    out = []
    for row in rows:
        st = [s for s in row["stats"] if s is not None]
        mean = lambda name: statistics.fmean(getattr(s, name) for s in st) if st else 0.0  # noqa: E731
        nbytes = int(mean("bytes"))
        bound = nbytes / bandwidth if bandwidth else 0.0
        out.append({
            "tokens": row["tokens"], "pass_ms": row["pass_s"] * 1e3, "streamed_mb": nbytes / MB,
            "bound_ms": bound * 1e3, "pass_over_bound": row["pass_s"] / bound if bound else None,
            "transfer_ms": mean("transfer_time") * 1e3, "compute_ms": mean("compute_time") * 1e3,
            "wait_ms": mean("wait_time") * 1e3, "decode_ms": mean("decode_time") * 1e3,
            "overlap": statistics.fmean(s.overlap for s in st) if st else None,
        })
    return out


class RandomBlocks:
    """A layer source for `offload_layers`: streamed layers' 2-D weights given as random valid GGUF
    blocks of one type (random codes, finite fp16 scales), packed as they are and decoded per pass."""

    encodes = True

    def __init__(self, kind: str, seed: int = 0):
        from edgespec.offload.gguf_blocks import TYPES
        from edgespec.offload.codecs import GGUFRaw

        if kind not in TYPES or TYPES[kind].decode is None:
            raise SystemExit(f"--gguf-blocks {kind}: a quantized type edgespec decodes ({', '.join(TYPES)})")
        self.kind, self.codec, self.gen = kind, GGUFRaw(kind), torch.Generator().manual_seed(seed)
        self.scales = SCALE_BYTES[kind]

    def fill(self, i, layer, streamed: bool) -> dict:
        from edgespec.offload.layout import Encoded

        if not streamed:
            return {}
        from edgespec.offload.gguf_blocks import TYPES

        block = TYPES[self.kind].block  # rows of whole blocks only (others stream dense)
        return {name: Encoded(self.codec, self.codec.nbytes(t.shape), self._writer())
                for name, t in layer.state_dict().items() if t.dim() == 2 and t.shape[1] % block == 0}

    def _writer(self):
        from edgespec.offload.gguf_blocks import TYPES

        def write(region: torch.Tensor) -> None:
            blocks = region.view(-1, TYPES[self.kind].size)
            blocks.copy_(torch.randint(0, 256, blocks.shape, dtype=torch.uint8, generator=self.gen))
            for at in self.scales:  # finite fp16 scales of a trained model's size
                d = (torch.rand(blocks.shape[0], generator=self.gen) * 2e-3).half()
                blocks[:, at : at + 2].copy_(d.view(torch.uint8).view(-1, 2))
        return write


SCALE_BYTES = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
               "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0],
               "MXFP4": []}


def run_accelerate(args, device, sizes, resident: int) -> list[dict] | str:
    """Same weights through accelerate's dispatch_model with the streamed layers mapped to "cpu"."""
    try:
        from accelerate import dispatch_model
    except ImportError:
        return "accelerate is not installed (pip install accelerate): comparison skipped"
    model = build_random_model(args.shape, args.dtype, seed=args.seed)
    n = model.config.num_hidden_layers
    dev = str(device)
    device_map = {"model.embed_tokens": dev, "model.rotary_emb": dev, "model.norm": dev, "lm_head": dev}
    device_map.update({f"model.layers.{i}": dev if i < resident else "cpu" for i in range(n)})
    model = dispatch_model(model, device_map=device_map, main_device=device)
    rows = time_passes(model, device, sizes, args.prefix, args.repeats, model.config.vocab_size)
    del model
    gc.collect()
    return [{"tokens": r["tokens"], "pass_ms": r["pass_s"] * 1e3} for r in rows]


def print_table(rows: list[dict], accel) -> None:
    head = (f"{'tokens':>6} {'pass ms':>9} {'MB':>9} {'bound ms':>9} {'pass/bnd':>8} {'xfer ms':>9} "
            f"{'comp ms':>9} {'wait ms':>9} {'dec ms':>8} {'overlap':>7}")
    accel_ms = {a["tokens"]: a["pass_ms"] for a in accel} if isinstance(accel, list) else {}
    print(head + (f" {'accel ms':>9} {'speedup':>7}" if accel_ms else ""))
    for r in rows:
        ratio = f"{r['pass_over_bound']:.2f}" if r["pass_over_bound"] is not None else "-"
        overlap = f"{r['overlap']:.2f}" if r["overlap"] is not None else "-"
        line = (f"{r['tokens']:>6} {r['pass_ms']:>9.2f} {r['streamed_mb']:>9.1f} {r['bound_ms']:>9.2f} {ratio:>8} "
                f"{r['transfer_ms']:>9.2f} {r['compute_ms']:>9.2f} {r['wait_ms']:>9.2f} {r['decode_ms']:>8.2f} "
                f"{overlap:>7}")
        if r["tokens"] in accel_ms:
            line += f" {accel_ms[r['tokens']]:>9.2f} {accel_ms[r['tokens']] / r['pass_ms']:>6.2f}x"
        print(line)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.dtype == "auto":
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    sizes = [int(s) for s in args.tree_sizes.split(",") if s.strip()]
    dummy = hold_beyond(device, args.vram_gb)
    bandwidth = measure_bandwidth(device)
    link = "pinned host->device" if device.type == "cuda" else "host memcpy"
    print(f"link bandwidth ({link}): {bandwidth / 1e9:.2f} GB/s")

    t0 = time.perf_counter()
    model = build_random_model(args.shape, args.dtype, seed=args.seed)
    built = time.perf_counter() - t0
    print(f"model {args.shape} {args.dtype}: {param_bytes(model) / 1e9:.2f} GB, built in {built:.1f}s")
    resident = None if args.resident == "auto" else int(args.resident)
    source = RandomBlocks(args.gguf_blocks, args.seed) if args.gguf_blocks else None
    handle = offload_layers(model, device, resident_layers=resident, ring=args.ring, link_delay=args.link_delay,
                            quantize=args.quantize, source=source)
    if args.no_bnb_kernel and handle.codec is not None and hasattr(handle.codec, "_kernel"):
        handle.codec._kernel = None
    kernel = getattr(handle.codec, "_kernel", None) is not None
    print("streamed as: " + ", ".join(f"{c['type']} {c['codec']}" for c in handle.codecs())
          + (" (bitsandbytes kernel)" if kernel else ""))
    print(f"{handle.resident_layers} resident, {handle.streamed_layers} streamed layers, ring {handle.ring}: "
          f"{handle.pinned_bytes / 1e9:.2f} GB host, {handle.ring * handle.slot_bytes / 1e9:.2f} GB of slots")
    rows = summarize(time_passes(model, device, sizes, args.prefix, args.repeats, model.config.vocab_size, handle),
                     bandwidth)
    resident_layers = handle.resident_layers
    handle.remove()
    del model, handle
    gc.collect()

    accel = run_accelerate(args, device, sizes, resident_layers) if args.compare_accelerate else None
    if isinstance(accel, str):
        print(accel)
    elif accel is not None and device.type == "cpu":
        print("accelerate on CPU keeps every weight in place (nothing streams): its column is a plain forward")
    print_table(rows, accel)
    note = None
    if device.type == "cpu":
        note = "CPU run: the 'link' is a host memcpy on a copy thread; pass/bound ratios are not meaningful"
        print(note)
    del dummy
    result = {"shape": args.shape, "dtype": args.dtype, "device": str(device), "bandwidth": bandwidth,
              "resident": resident_layers, "ring": args.ring, "quantize": args.quantize, "prefix": args.prefix,
              "gguf_blocks": args.gguf_blocks, "bnb_kernel": kernel,
              "link_delay": args.link_delay, "vram_gb": args.vram_gb, "rows": rows, "accelerate": accel, "note": note}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
