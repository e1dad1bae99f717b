#!/usr/bin/env python
"""Profile layer streaming: one offloaded forward per tree size against the link's bandwidth bound.

    python scripts/profile_offload.py --shape llama-8b --dtype bf16 --vram-gb 24 --compare-accelerate
    python scripts/profile_offload.py --shape tiny --device cpu          # seconds, on any machine
    python scripts/profile_offload.py --shape llama-8b --gguf-blocks Q4_K --vram-gb 24   # GGUF blocks streamed raw
    python scripts/profile_offload.py --shape llama-8b --quantize nf4 --vram-gb 24 [--no-bnb-kernel]
    python scripts/profile_offload.py --shape llama-8b --vram-gb 24 --codecs Q4_K,Q6_K,Q8_0,nf4,int8 \
        --tree-sizes 1,64,256,1024 --markdown offload_codecs.md      # one row per codec and tree size

For each tree size T it runs an offloaded forward of T tokens on top of a `--prefix`-token KV cache
with a random tree-style 4-D mask (what a speculative verification pass does) and reports the pass
time, the bytes streamed, the link bound (streamed bytes / measured bandwidth), pass / bound, and the
transfer / compute / wait / decode / overlap figures of the streamer. A ratio near 1 means the pass
runs at link speed: compute (and decoding) is hidden behind the transfers.

`--codecs` runs each way of streaming in turn on the same shape: "dense" (the run dtype, no codec),
"int8" / "nf4" (`--stream-quant`), or a GGUF type such as "Q4_K" (every 2-D weight of the streamed
layers as random valid blocks of that type, as a GGUF target's layers are: bytes as in the file,
decoded on the device after each copy). The decoder row says what decoded: the fused Triton kernels
(edgespec/offload/kernels/), bitsandbytes' kernel (nf4, when installed) or the torch decode (a CPU;
`--no-fused`; `--no-bnb-kernel` for nf4). Layers are made with random weights on the device (`--build-on`)
one at a time as they are placed, and encoded there. `--quantize` / `--gguf-blocks` are one-codec
spellings of `--codecs`.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgespec.scheduler.timing import time_passes  # noqa: E402
from edgespec.offload import gguf_blocks, kernels, offload_layers  # noqa: E402
from edgespec.offload.bandwidth import measure_bandwidth  # noqa: E402
from edgespec.base.device import hold_beyond  # noqa: E402
from edgespec.offload.shapes import DTYPES, SHAPES, RandomLayers, build_random_model, random_skeleton  # noqa: E402

MB = 1e6
STREAM_QUANTS = ("int8", "nf4")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny")
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resident", default="0", help="leading layers kept on the device: N or 'auto'")
    ap.add_argument("--ring", type=int, default=2)
    ap.add_argument("--codecs", default=None, help="comma list of dense, int8, nf4 and GGUF types (e.g. Q4_K)")
    ap.add_argument("--quantize", choices=list(STREAM_QUANTS), default=None, help="= --codecs int8 or nf4")
    ap.add_argument("--gguf-blocks", default=None, help="= --codecs with one GGUF type (e.g. Q4_K)")
    ap.add_argument("--no-bnb-kernel", action="store_true", help="nf4 on CUDA: not bitsandbytes' kernel")
    ap.add_argument("--no-fused", action="store_true", help="CUDA: the torch decode, not the fused kernels")
    ap.add_argument("--build-on", default=None, help="device the layers are made and encoded on (default --device)")
    ap.add_argument("--vram-gb", type=float, default=None,
                    help="CUDA: act like a card of this size (the rest is taken by a dummy tensor)")
    ap.add_argument("--tree-sizes", default="1,16,64,256,1024,2048")
    ap.add_argument("--prefix", type=int, default=128, help="KV-cache tokens before each tree")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--link-delay", type=float, default=0.0, help="emulated extra seconds per streamed layer")
    ap.add_argument("--compare-accelerate", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--markdown", default=None, help="write one table row per codec and tree size here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.codecs = codec_list(args)
    return args


def codec_list(args) -> list[str]:
    if args.codecs:
        names = [c.strip() for c in args.codecs.split(",") if c.strip()]
    else:
        names = [args.quantize or args.gguf_blocks or "dense"]
    for name in names:
        quantized = name in gguf_blocks.TYPES and gguf_blocks.TYPES[name].decode is not None
        if name not in ("dense", *STREAM_QUANTS) and not quantized:
            raise SystemExit(f"codec {name!r}: choose dense, int8, nf4 or a quantized GGUF type edgespec decodes "
                             f"({', '.join(k for k, t in gguf_blocks.TYPES.items() if t.decode)})")
    return names


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


def decoder_of(handle) -> str:
    """What decodes the streamed encoded bytes on this device."""
    names = {e.codec.name for p in handle.packs for e in p.entries if e.codec is not None}
    if not names:
        return "-"
    if handle.device.type != "cuda":
        return "torch decode"
    if names == {"nf4"} and getattr(handle.codec, "_kernel", None) is not None:
        return "bitsandbytes kernel"
    return "fused kernels" if kernels.available() else "torch decode"


def run_codec(args, codec: str, device, sizes, bandwidth) -> dict:
    """Offload a fresh random model of the shape streamed as `codec`, time its passes, release it."""
    t0 = time.perf_counter()
    model = random_skeleton(args.shape, args.dtype, seed=args.seed)
    gguf = codec if codec not in ("dense", *STREAM_QUANTS) else None
    source = RandomLayers(args.build_on or device, gguf=gguf, seed=args.seed)
    resident = None if args.resident == "auto" else int(args.resident)
    handle = offload_layers(model, device, resident_layers=resident, ring=args.ring, link_delay=args.link_delay,
                            quantize=codec if codec in STREAM_QUANTS else None, source=source, progress=False)
    if args.no_bnb_kernel and hasattr(handle.codec, "_kernel"):
        handle.codec._kernel = None
    built = time.perf_counter() - t0
    print(f"\n== {codec}: streamed as " + ", ".join(f"{c['type']} {c['codec']}" for c in handle.codecs()))
    print(f"{handle.resident_layers} resident, {handle.streamed_layers} streamed layers, ring {handle.ring}: "
          f"{handle.pinned_bytes / 1e9:.2f} GB host, {handle.ring * handle.slot_bytes / 1e9:.2f} GB of slots "
          f"(built and packed in {built:.1f}s)")
    rows = summarize(time_passes(model, device, sizes, args.prefix, args.repeats, model.config.vocab_size, handle),
                     bandwidth)
    run = {"codec": codec, "decoder": decoder_of(handle), "bytes": handle.pinned_bytes,
           "resident": handle.resident_layers, "rows": rows}
    print(f"decoded by: {run['decoder']}")
    print_table(rows, None)
    handle.transport.close()
    del model, handle, source
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return run


def summary(runs: list[dict]) -> list[str]:
    """One line per codec: pass / bound at each tree size and decode ms per pass."""
    lines = [f"{'codec':>7} {'decoder':>19} {'MB/pass':>9} {'bound ms':>9}  pass ms (pass/bound) by tree size; "
             "decode ms per pass"]
    for run in runs:
        cells = " ".join(f"{r['tokens']}: {r['pass_ms']:.1f} ({r['pass_over_bound'] or 0:.2f})" for r in run["rows"])
        first = run["rows"][0]
        lines.append(f"{run['codec']:>7} {run['decoder']:>19} {first['streamed_mb']:>9.1f} {first['bound_ms']:>9.2f}  "
                     f"{cells}; decode {statistics.fmean(r['decode_ms'] for r in run['rows']):.2f}")
    return lines


def markdown(args, runs: list[dict], bandwidth: float, device) -> str:
    """The runs as a benchmarks/*.md section: command, date, machine, one row per codec and tree size."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    out = [f"- command: `python scripts/profile_offload.py {' '.join(sys.argv[1:])}`",
           f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; machine: {gpu}, "
           f"{bandwidth / 1e9:.2f} GB/s measured host->device; torch {torch.__version__}",
           f"- shape {args.shape} ({args.dtype}), {runs[0]['resident']} resident layers, ring {args.ring}, "
           f"prefix {args.prefix} tokens, median of {args.repeats}",
           "", "| streamed as | decoded by | tree tokens | pass ms | streamed MB | bound ms | pass / bound | "
           "decode ms per pass | transfer ms | compute ms |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        for r in run["rows"]:
            out.append(f"| {run['codec']} | {run['decoder']} | {r['tokens']} | {r['pass_ms']:.1f} | "
                       f"{r['streamed_mb']:.0f} | {r['bound_ms']:.1f} | {r['pass_over_bound'] or 0:.2f} | "
                       f"{r['decode_ms']:.1f} | {r['transfer_ms']:.1f} | {r['compute_ms']:.1f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.dtype == "auto":
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    if args.no_fused:
        kernels.disable("--no-fused")
    sizes = [int(s) for s in args.tree_sizes.split(",") if s.strip()]
    dummy = hold_beyond(device, args.vram_gb)
    bandwidth = measure_bandwidth(device)
    link = "pinned host->device" if device.type == "cuda" else "host memcpy"
    print(f"link bandwidth ({link}): {bandwidth / 1e9:.2f} GB/s")
    runs = [run_codec(args, codec, device, sizes, bandwidth) for codec in args.codecs]
    accel = None
    if args.compare_accelerate:
        accel = run_accelerate(args, device, sizes, runs[0]["resident"])
        if isinstance(accel, str):
            print(accel)
        else:
            if device.type == "cpu":
                print("accelerate on CPU keeps every weight in place (nothing streams): its column is a plain forward")
            print_table(runs[0]["rows"], accel)
    print("\n" + "\n".join(summary(runs)))
    note = None
    if device.type == "cpu":
        note = "CPU run: the 'link' is a host memcpy on a copy thread; pass/bound ratios are not meaningful"
        print(note)
    del dummy
    result = {"shape": args.shape, "dtype": args.dtype, "device": str(device), "bandwidth": bandwidth,
              "resident": runs[0]["resident"], "ring": args.ring, "prefix": args.prefix, "codecs": args.codecs,
              "link_delay": args.link_delay, "vram_gb": args.vram_gb, "runs": runs,
              "rows": runs[0]["rows"],  # the first codec's (the only one unless --codecs lists several)
              "accelerate": accel, "note": note}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(markdown(args, runs, bandwidth, device))
    return result


if __name__ == "__main__":
    main()
