"""Where a split pass's time goes: the embedded target in one process against the same target split
over two local processes (stage 1 an `edgespec stage` process, gloo on loopback, no emulated network),
plain decoding (one pass per token), runs alternating; prints ms per token of both, and for the split
run stage 0's own layers and its wait for stage 1 (which includes stage 1's layers, the head, the walk
and the transport), and the round trip stage 0 measured at start (benchmarks/pipeline_hops.md).

    OMP_NUM_THREADS=1 python scripts/pipeline_split_cost.py --rounds 3 --tokens 48
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import torch

from edgespec import Engine
from edgespec.distributed.placement import Placement
from edgespec.distributed.target import PipelineTarget
from edgespec.loading.models import load_model, load_tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(acc: dict, key: str, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        acc[key] += time.perf_counter() - t
        return out
    return wrapper


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--split", default="127.0.0.1:0-14,127.0.0.1:15-29")
    a = p.parse_args()
    torch.set_num_threads(1)
    port = free_port()
    stage = subprocess.Popen([sys.executable, "-m", "edgespec.distributed.stage", "--coordinator", f"127.0.0.1:{port}",
                              "--rank", "1", "--world", "2", "--device", "cpu", "--quiet"],
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    pipe = PipelineTarget(None, Placement.parse(a.split), torch.device("cpu"), port=port, progress=False).start()
    try:
        tok, target = load_tokenizer(None), load_model(None)
        ids = tok.apply_chat_template([{"role": "user", "content": "Write a poem about the sea."}],
                                      add_generation_prompt=True, tokenize=True, return_dict=False)
        single = Engine(target, target, tok, budget=0)
        split = Engine(pipe.model, target, tok, budget=0, verifier=pipe)
        acc = {"stage 0 layers": 0.0, "waiting for stage 1": 0.0}
        pipe.stage.run = timed(acc, "stage 0 layers", pipe.stage.run)
        pipe._remote = timed(acc, "waiting for stage 1", pipe._remote)
        print(f"round trip through the stages (measured at start): {pipe.transport_s * 1e3:.2f} ms per pass")
        print("| round | run | ms per token | stage 0 layers ms | waiting for stage 1 ms |\n|---|---|---:|---:|---:|")
        for r in range(1, a.rounds + 1):
            for name, engine in (("single", single), ("split", split)):
                engine.reset()
                acc.update({k: 0.0 for k in acc})
                t = time.perf_counter()
                n = len(engine.generate(ids, max_new_tokens=a.tokens, temperature=0).ids)
                ms = (time.perf_counter() - t) / n * 1e3
                parts = " | ".join(f"{v / n * 1e3:.2f}" if name == "split" else "-" for v in acc.values())
                print(f"| {r} | {name} | {ms:.2f} | {parts} |", flush=True)
    finally:
        pipe.close()
        stage.wait(timeout=60)


if __name__ == "__main__":
    main()
