"""`edgespec bench` in one process against `edgespec bench --stages` across 2 local processes (stage 1
an `edgespec stage` process, gloo on loopback), runs alternating (single, split, single, split), with
the same emulated network on both stages' sends; prints, per method and run, tokens/s of both, the
split run's emulated hop seconds and its transport seconds (the round trip stage 0 measured at start,
times the passes; its report's hops line), and the prediction: the single run's seconds + both
(benchmarks/pipeline_hops.md).

    OMP_NUM_THREADS=1 python scripts/pipeline_bench_cli.py --split 127.0.0.1:0-14,127.0.0.1:15-29 \\
        --single=--no-offload --hop-latency 0.05 -- --budget 8 --draft-quant none --n-prompts 2
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys


def bench(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "edgespec.front.cli", "bench", "--json", *argv], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout[out.stdout.index("{"):])


def split_bench(stages: str, hop: list[str], extra: list[str], argv: list[str]) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stage = subprocess.Popen([sys.executable, "-m", "edgespec.distributed.stage", "--coordinator", f"127.0.0.1:{port}",
                              "--rank", "1", "--world", "2", "--device", "cpu", "--quiet", *hop, *extra],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return bench(["--stages", stages, "--stage-port", str(port), *hop, *argv])
    finally:
        try:
            stage.wait(timeout=60)  # it leaves when stage 0's process is gone
        except subprocess.TimeoutExpired:
            stage.kill()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--split", required=True, help="--stages for the split runs (2 stages)")
    p.add_argument("--single", default="", help="options for the single-process runs only (--single=--no-offload)")
    p.add_argument("--stage-args", default="", help="options for stage 1 only (e.g. --link-delay 0.02)")
    p.add_argument("--hop-latency", default="0.05")
    p.add_argument("--hop-gbps", default="1")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("bench", nargs=argparse.REMAINDER, help="-- then options for both (edgespec bench)")
    a = p.parse_args()
    argv = [x for x in a.bench if x != "--"]
    hop = ["--hop-latency", a.hop_latency, "--hop-gbps", a.hop_gbps]
    print(f"| run | method | single tok/s | split tok/s | predicted tok/s | single s | split s | hops s | transport s "
          f"| predicted s | split / predicted | passes (single, split) | tokens |\n"
          f"|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
          flush=True)
    env_note = os.environ.get("OMP_NUM_THREADS", "unset")
    for run in range(1, a.rounds + 1):
        one = bench(shlex.split(a.single) + argv)
        two = split_bench(a.split, hop, shlex.split(a.stage_args), argv)
        for row in two["rows"]:
            ref = next(r for r in one["rows"] if r["method"] == row["method"])
            h = two["split"]["hops"][row["method"]]
            hops, transport = h["emulated_s"], h["transport_s"]
            predicted = ref["seconds"] + hops + transport
            print(f"| {run} | {row['method']} | {ref['tokens_per_s']:.2f} | {row['tokens_per_s']:.2f} | "
                  f"{row['new_tokens'] / predicted:.2f} | "
                  f"{ref['seconds']:.2f} | {row['seconds']:.2f} | {hops:.2f} | {transport:.2f} | {predicted:.2f} | "
                  f"{row['seconds'] / predicted:.3f} | {ref['passes']}, {row['passes']} | "
                  f"{ref['new_tokens']}, {row['new_tokens']} |", flush=True)
    print(f"(OMP_NUM_THREADS={env_note})")


if __name__ == "__main__":
    main()
