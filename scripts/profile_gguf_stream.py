#!/usr/bin/env python
"""An offloaded GGUF target two ways: its blocks streamed raw (decoded on the device after each copy)
vs its de-quantized copy streamed (the path before). Host RAM, pass time, same tokens.

    python scripts/profile_gguf_stream.py --gguf embedded,/work/models/qwen.gguf
    python scripts/profile_gguf_stream.py --gguf embedded --tokens 8 --prompts 1 --sizes 1 --repeats 1   # quick

Each load runs in a fresh process (its peak resident set, VmHWM, counts only that load), every layer
streamed (`--resident-layers`, default 0). Per GGUF and way it prints: peak RSS while loading, RSS after
the load and peak RSS to the end of the run (all above the process's start; a de-quantized copy's
tensors outside the layers are memory-mapped and only count once a forward touches them), the host
bytes the streamed layers keep (= the bytes one pass streams), the target pass time per tree size
with the decode time inside it, and whether the greedy
tokens of `--prompts` MT-Bench first turns (`--tokens` each, chat template) are the same both ways.
The de-quantized copy, the GGUF's parsed index and its tokenizer are made first, in a process of their
own, so no measured load pays for them.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgespec.offload import find_handle  # noqa: E402
from edgespec.front.profile import peak_rss, rss  # noqa: E402

GB = 1e9
WAYS = ("raw", "copy")
QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench_questions.jsonl"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default="embedded", help="comma-separated GGUF files ('embedded': the default model)")
    ap.add_argument("--ways", default=",".join(WAYS), help="raw (blocks streamed as in the file), copy (de-quantized)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resident-layers", type=int, default=0)
    ap.add_argument("--sizes", default="1,16,64", help="tree sizes of the timed target passes")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per size (median; after one warm-up)")
    ap.add_argument("--prompts", type=int, default=3, help="MT-Bench first turns whose greedy tokens are compared")
    ap.add_argument("--tokens", type=int, default=24, help="greedy tokens per prompt")
    ap.add_argument("--questions", default=str(QUESTIONS))
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--child", nargs=2, metavar=("GGUF", "WAY"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def spec_of(name: str) -> str | None:
    return None if name == "embedded" else name


def prompts(args) -> list[str]:
    path = Path(args.questions)
    if not path.is_file():
        path = Path(__file__).resolve().parents[1] / "tests" / "data" / "mt_bench_first5.jsonl"
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [json.loads(line)["turns"][0] for line in lines[: args.prompts]]


def prepare(name: str, args) -> None:
    """The de-quantized copy (for `copy`), the parsed index (for `raw`) and the tokenizer, made once."""
    from edgespec.loading.convert import dequantized_copy, gguf_index, tokenizer_copy
    from edgespec.base.device import run_dtype
    from edgespec.loading.resolve import resolve

    folder, gguf = resolve(spec_of(name))
    gguf_index(folder, gguf)
    tokenizer_copy(folder, gguf)
    if "copy" in args.ways.split(","):
        dequantized_copy(folder, gguf, True, run_dtype(torch.device(args.device)))


def child(name: str, way: str, args) -> dict:
    """One load, timed passes and greedy tokens, in this fresh process."""
    from edgespec.base.device import run_dtype
    from edgespec.loading.loader import load_offloaded
    from edgespec.scheduler.timing import time_passes
    from edgespec.loading.models import load_tokenizer

    dev = torch.device(args.device)
    base, start = rss(), time.perf_counter()
    model = load_offloaded(spec_of(name), dev, run_dtype(dev), progress=False, gguf_copy=way == "copy",
                           resident_layers=args.resident_layers)
    load_s, peak, after = time.perf_counter() - start, peak_rss(), rss()
    handle = find_handle(model)
    sizes = [int(s) for s in args.sizes.split(",")]
    passes = time_passes(model, dev, sizes, past=64, repeats=args.repeats, handle=handle)
    tok = load_tokenizer(spec_of(name), progress=False)
    tokens = [greedy(model, tok, text, args.tokens, dev) for text in prompts(args)]
    return {"gguf": name, "way": way, "load_s": round(load_s, 2), "peak_rss_gb": (peak - base) / GB,
            "rss_after_load_gb": (after - base) / GB, "peak_rss_end_gb": (peak_rss() - base) / GB,
            "streamed_gb": handle.pinned_bytes / GB,
            "streamed_layers": handle.streamed_layers, "codecs": handle.codecs(),
            "passes": [{"tokens": p["tokens"], "pass_s": p["pass_s"],
                        "decode_s": sorted(s.decode_time for s in p["stats"])[len(p["stats"]) // 2]} for p in passes],
            "tokens": tokens}


@torch.inference_mode()
def greedy(model, tok, text: str, n: int, dev: torch.device) -> list[int]:
    if tok.chat_template is None:  # a GGUF without one (the tests' tiny files): the text as is
        ids = tok(text)["input_ids"]
    else:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        ids = ids if isinstance(ids, list) else ids["input_ids"]
    out = model.generate(torch.tensor([ids], device=dev), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def run_child(args, name: str, way: str) -> dict:
    cmd = [sys.executable, __file__, "--device", args.device, "--resident-layers", str(args.resident_layers),
           "--sizes", args.sizes, "--repeats", str(args.repeats), "--prompts", str(args.prompts),
           "--tokens", str(args.tokens), "--questions", args.questions, "--child", name, way]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{name} / {way} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    sizes = [p["tokens"] for p in rows[0]["passes"]] if rows else []
    head = "".join(f" pass ms, {n} tok (decode) |" for n in sizes)
    lines = [f"| GGUF | streamed as | peak RSS loading GB | RSS after load GB | peak RSS to the end GB "
             f"| streamed per pass GB | load s |{head} same tokens |",
             "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(sizes) + "---|"]
    for r in rows:
        twin = next((o for o in rows if o["gguf"] == r["gguf"] and o["way"] == "copy"), None)
        same = "reference" if r["way"] == "copy" else "n/a" if twin is None else (
            "yes" if r["tokens"] == twin["tokens"] else "NO")
        times = "".join(f" {1e3 * p['pass_s']:.0f} ({1e3 * p['decode_s']:.0f}) |" for p in r["passes"])
        lines.append(f"| {Path(r['gguf']).name} | {r['way']} | {r['peak_rss_gb']:.2f} | {r['rss_after_load_gb']:.2f} | "
                     f"{r['peak_rss_end_gb']:.2f} | {r['streamed_gb']:.3f} | {r['load_s']:.1f} |{times} {same} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return []
    print(f"device {args.device}, torch {torch.__version__}; {args.prompts} prompts x {args.tokens} greedy tokens; "
          f"tree sizes {args.sizes}, {args.repeats} timed passes each", flush=True)
    rows = []
    for name in args.gguf.split(","):
        prepare(name, args)
        for way in args.ways.split(","):
            rows.append(run_child(args, name, way))
            r = rows[-1]
            kinds = ", ".join(f"{c['type']}:{c['codec']}" for c in r["codecs"])
            print(f"  {Path(name).name} {way}: peak RSS +{r['peak_rss_gb']:.2f} GB, {r['streamed_gb']:.3f} GB "
                  f"streamed per pass ({kinds})", flush=True)
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
