"""Tokens per second of a target split across 2 local processes (gloo on loopback) against the same
target in one process, with an emulated host link (seconds per streamed layer) and an emulated network
on every hop (latency per message, bandwidth), and the split run's time as predicted: the single
process's time plus every message's emulated hop cost (edgespec/distributed/hops.py). The delays are
sleeps large enough to dominate this machine's noise; runs alternate (single, split, single, split).

    python scripts/pipeline_bench.py [--layers 4] [--link-delay 0.05] [--hop-latency 0.02] [--hop-gbps 1]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edgespec import Engine
from edgespec.distributed.group import Timeouts
from edgespec.distributed.hops import HEADER_BYTES, Net
from edgespec.distributed.layers import Range, load_range
from edgespec.distributed.placement import Placement
from edgespec.distributed.target import PipelineTarget


def tiny(layers: int, seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.5, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def drafter_of(model, scale=0.002):
    import copy

    gen = torch.Generator().manual_seed(1)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp(min=1e-3) / 0.02)
    return draft


def timed(engine, prompt, n):
    start = time.perf_counter()
    out = engine.generate(prompt, max_new_tokens=n, temperature=0)
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--link-delay", type=float, default=0.05)
    p.add_argument("--hop-latency", type=float, default=0.02)
    p.add_argument("--hop-gbps", type=float, default=1.0)
    p.add_argument("--budget", type=int, default=16)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--resident", action="store_true", help="every layer resident (no link): the hops alone")
    a = p.parse_args()
    folder = tempfile.mkdtemp(prefix="edgespec-pipe-")
    whole = tiny(a.layers)
    whole.save_pretrained(folder)
    half = a.layers // 2
    net = Net("emulated", a.hop_gbps * 1e9 / 8, a.hop_latency)
    keep, mark = (None, "") if a.resident else (0, ":0")
    single_stage = load_range(folder, Range(0, a.layers, a.layers, keep), torch.device("cpu"), link_delay=a.link_delay)
    drafter = drafter_of(whole)
    single = Engine(single_stage.model, drafter, budget=a.budget)
    target = PipelineTarget(folder, Placement.parse(f"127.0.0.1:0-{half - 1}{mark},127.0.0.1:{half}-{a.layers - 1}{mark}"),
                            torch.device("cpu"), link_delay=a.link_delay, progress=False, emulate=net,
                            timeouts=Timeouts(op=120))
    cmd = [sys.executable, "-m", "edgespec.distributed.stage", "--coordinator", f"127.0.0.1:{target.port}", "--rank",
           "1", "--world", "2", "--model", folder, "--device", "cpu", "--quiet", "--link-delay", str(a.link_delay),
           "--hop-latency", str(a.hop_latency), "--hop-gbps", str(a.hop_gbps)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        target.start()
        split = Engine(target.model, drafter, budget=a.budget, verifier=target)
        prompt = [5, 9, 13, 2, 40, 7, 31]
        rows = []
        for _ in range(a.rounds):
            t1, o1 = timed(single, prompt, a.tokens)
            before = list(target.link.sent)
            t2, o2 = timed(split, prompt, a.tokens)
            assert o1.ids == o2.ids, "the split target's tokens differ from the single process's"
            msgs, nbytes = target.link.sent[0] - before[0], target.link.sent[1] - before[1]
            passes = len(o2.stats.steps)
            verdict = passes * net.seconds(HEADER_BYTES + 8 * 2 * (a.budget + 1))  # the last stage's replies
            predicted = t1 + msgs * net.latency + nbytes / net.bytes_per_s + verdict
            rows.append((t1, t2, predicted, len(o1.ids), passes, msgs, nbytes))
        how = "resident" if a.resident else f"streamed (link delay {a.link_delay} s/layer, ring 2 per stage)"
        print(f"{a.layers} layers {how}, budget {a.budget}, {a.tokens} tokens; "
              f"emulated hop: {a.hop_latency * 1e3:g} ms/message, {a.hop_gbps:g} Gb/s")
        print("| run | single s | single tok/s | split s | split tok/s | predicted split s | split / predicted | passes "
              "| messages 0→1 | bytes 0→1 |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for i, (t1, t2, pred, n, passes, msgs, nbytes) in enumerate(rows):
            print(f"| {i + 1} | {t1:.2f} | {n / t1:.1f} | {t2:.2f} | {n / t2:.1f} | {pred:.2f} | {t2 / pred:.3f} | "
                  f"{passes} | {msgs} | {nbytes} |")
    finally:
        target.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
