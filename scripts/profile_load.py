#!/usr/bin/env python
"""Peak host RAM and time to load an offloaded target: whole-model load vs layer by layer.

    python scripts/profile_load.py --shape llama-1b --dtype bf16 --quantize none,int8,nf4
    python scripts/profile_load.py --shape tiny                    # seconds, on any machine

Saves a random-weight model of `--shape` once as a sharded safetensors checkpoint (like a hub
model), then loads it in a fresh process per configuration, offloaded to `--device` with its streamed
layers kept as `--quantize`, two ways: `whole` (transformers loads the whole model, then its layers
are packed: the path every load took before) and `layerwise` (edgespec/loading/loader.py: each
layer read, placed and released in turn). It prints the peak resident set of each process during
the load, the load time, the host bytes the streamed layers keep, and checks that both ways give the
same logits (one forward after the load).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgespec.offload import find_handle  # noqa: E402
from edgespec.offload.shapes import DTYPES, SHAPES, build_random_model  # noqa: E402
from edgespec.front.profile import peak_rss, rss  # noqa: E402

GB = 1e9


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="the checkpoint's and the target's dtype")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quantize", default="none,int8,nf4", help="streamed-layer codecs to try (none, int8, nf4)")
    ap.add_argument("--ways", default="whole,layerwise", help="whole, layerwise or both (whole needs ~2x the model)")
    ap.add_argument("--gguf", default=None, help="instead: de-quantize this GGUF whole (transformers) and layer by "
                    "layer (edgespec/loading/convert.py)")
    ap.add_argument("--folder", default=None, help="checkpoint folder (made here if missing; default: a temp dir)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--save", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=3, metavar=("FOLDER", "WAY", "QUANT"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def save_checkpoint(args, folder: Path) -> None:
    """Made in a child process too, so this process stays small (its children start from it)."""
    if (folder / "config.json").is_file():
        return
    print(f"saving a random {args.shape} checkpoint to {folder} ...", flush=True)
    cmd = [sys.executable, __file__, "--shape", args.shape, "--dtype", args.dtype, "--save", str(folder)]
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"could not save the checkpoint to {folder}")


def child(folder: str, way: str, quant: str, dtype: torch.dtype, device: str) -> dict:
    """One load in this (fresh) process; peak RSS counts everything the load touched."""
    from edgespec.loading.models import load_model
    from edgespec.offload import offload_layers
    from edgespec.loading.loader import load_offloaded

    q = None if quant == "none" else quant
    dev = torch.device(device)
    if way.startswith("gguf-"):
        return convert_child(folder, way)
    base = rss()
    start = time.perf_counter()
    if way == "whole":
        model = load_model(folder, device="cpu", dtype=dtype, progress=False)
        offload_layers(model, dev, resident_layers=0, quantize=q, progress=False)
    else:
        model = load_offloaded(folder, dev, dtype, progress=False, resident_layers=0, quantize=q)
    seconds = time.perf_counter() - start
    peak = peak_rss()  # before any forward: a CPU bf16 forward may upcast the head for a while
    handle = find_handle(model)
    with torch.no_grad():
        logits = model(torch.arange(16, device=dev)[None]).logits.float()
    return {"way": way, "quant": quant, "load_s": round(seconds, 2),
            "base_rss_gb": round(base / GB, 3),
            "peak_rss_gb": round(peak / GB, 3),
            "streamed_host_bytes": sum(p.host_bytes for p in handle.packs),
            "logits_sum": float(logits.double().sum()), "logits_absmax": float(logits.abs().max())}


def convert_child(gguf: str, way: str) -> dict:
    """De-quantize a GGUF into a safetensors folder: transformers' whole-model way, or edgespec's."""
    from edgespec.loading.convert import convert_gguf, convert_whole
    from edgespec.loading.models import load_model

    src = Path(gguf)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        base = rss()
        start = time.perf_counter()
        if way == "gguf-whole":
            convert_whole(str(src.parent), src.name, out)
        else:
            convert_gguf(str(src.parent), src.name, out, progress=False)
        seconds, peak = time.perf_counter() - start, peak_rss()
        model = load_model(str(out), progress=False)
        with torch.no_grad():
            logits = model(torch.arange(16)[None]).logits.float()
    return {"way": way, "quant": "gguf", "load_s": round(seconds, 2), "base_rss_gb": round(base / GB, 3),
            "peak_rss_gb": round(peak / GB, 3), "streamed_host_bytes": 0,
            "logits_sum": float(logits.double().sum()), "logits_absmax": float(logits.abs().max())}


def run_child(args, folder: Path, way: str, quant: str) -> dict:
    cmd = [sys.executable, __file__, "--dtype", args.dtype, "--device", args.device, "--child", str(folder), way, quant]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{way}/{quant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    if args.child:
        print(json.dumps(child(*args.child, dtype, args.device)))
        return []
    if args.save:
        build_random_model(args.shape, dtype).save_pretrained(args.save, max_shard_size="2GB")
        return []
    if args.gguf:
        return gguf_rows(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder or Path(tmp) / args.shape)
        save_checkpoint(args, folder)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / GB
        print(f"checkpoint: {args.shape} {args.dtype}, {size:.2f} GB; device {args.device}; "
              f"torch {torch.__version__}", flush=True)
        rows = []
        for quant in args.quantize.split(","):
            for way in args.ways.split(","):
                rows.append(run_child(args, folder, way, quant))
                print(f"  {way:9s} {quant:4s} peak RSS {rows[-1]['peak_rss_gb']:.2f} GB, {rows[-1]['load_s']:.1f} s",
                      flush=True)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def gguf_rows(args) -> list[dict]:
    size = Path(args.gguf).stat().st_size / GB
    print(f"GGUF: {args.gguf}, {size:.2f} GB; torch {torch.__version__}", flush=True)
    rows = [run_child(args, Path(args.gguf), way, "gguf") for way in ("gguf-whole", "gguf-layerwise")]
    print("\n| de-quantize the GGUF | peak RSS GB | peak above start GB | seconds | same logits |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        same = "yes" if _logits(r) == _logits(rows[0]) else "NO"
        print(f"| {r['way'][5:]} | {r['peak_rss_gb']:.2f} | {r['peak_rss_gb'] - r['base_rss_gb']:.2f} | "
              f"{r['load_s']:.1f} | {same} |")
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| streamed as | load | peak RSS GB | peak above start GB | streamed layers in host RAM GB | load s "
          "| same logits |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        twin = next((o for o in rows if o["quant"] == r["quant"] and o["way"] == "whole"), None)
        same = "n/a" if twin is None else "yes" if _logits(r) == _logits(twin) else "NO"
        print(f"| {r['quant']} | {r['way']} | {r['peak_rss_gb']:.2f} | {r['peak_rss_gb'] - r['base_rss_gb']:.2f} | "
              f"{r['streamed_host_bytes'] / GB:.2f} | {r['load_s']:.1f} | {same} |")


def _logits(row: dict) -> tuple[float, float]:
    return row["logits_sum"], row["logits_absmax"]


if __name__ == "__main__":
    main()
