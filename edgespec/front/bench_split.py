"""`edgespec bench --stages ...`: the bench's methods against a target split across stages
(edgespec/distributed/). edgespec and plain decoding both verify through the split target (plain: an
Engine of budget 0 over the same PipelineTarget, one pass per token, each pass crossing the stages);
HF assisted cannot run on it and is left out with a line saying why.

Every run also counts its hops: the messages and bytes stage 0 sent down the pipeline and the verdicts
it got back, and what they cost on the emulated networks (stage 0's --hop-latency/--hop-gbps, and each
stage's own from its hello): exactly the sleeps the wire adds; and the transport's own cost per pass
(PipelineTarget.round_trip, measured at start: gloo's sends and receives, the stages' loops) times the
passes. The split run's seconds minus both are what the run costs without the network, to set beside a
single-process `edgespec bench` of the same target (benchmarks/pipeline_hops.md: split seconds against
single seconds + the hops).
"""
from __future__ import annotations

import sys

from edgespec.distributed.hops import emulated_seconds
from edgespec.engine.face import FrontEnd

SKIPPED = {"hf-assisted": "transformers' assisted generation needs the whole target in this process, and a split "
                          "target holds only stage 0's layers here: run `edgespec bench` without --stages for it"}


def runners(engine: FrontEnd, sampling: dict | None, run_engine) -> dict:
    """The bench's methods through the engine's split target (`run_engine`: bench's engine runner)."""
    from edgespec.engine.engine import Engine

    pipe = engine.verifier
    plain = Engine(engine.target, engine.drafter, engine.tokenizer, budget=0, verifier=pipe, clock=engine.clock)
    for name, why in SKIPPED.items():
        print(f"edgespec: {name} skipped: {why}", file=sys.stderr)
    return {"edgespec": metered(pipe, lambda ids, n: run_engine(engine, ids, n, sampling)),
            "plain": metered(pipe, lambda ids, n: run_engine(plain, ids, n, sampling))}


def metered(pipe, run):
    """`run`, with its traffic through `pipe` added to its result as "hops" (sent and received messages, bytes)."""
    def counted(ids: list[int], n: int) -> dict:
        before = pipe.traffic()
        out = run(ids, n)
        out["hops"] = [a - b for a, b in zip(pipe.traffic(), before)]
        return out
    return counted


def summary(engine: FrontEnd, outputs: dict) -> dict:
    """What the bench's result adds for a split target (nothing for one in this process): the stages,
    the skipped methods, each method's hops and their emulated cost, and the report's lines on them."""
    if engine.verifier is None:
        return {}
    pipe = engine.verifier
    nets = pipe.nets()
    hops = {name: method_hops(runs, nets, pipe.transport_s) for name, runs in outputs.items()
            if runs and "hops" in runs[0]}
    split = {"stages": pipe.describe(), "skipped": dict(SKIPPED), "hops": hops, "transport_s_per_pass": pipe.transport_s,
             "nets": [None if n is None else {"latency_s": n.latency, "bytes_per_s": n.bytes_per_s} for n in nets]}
    return {"split": split, "split_notes": notes(split, nets)}


def method_hops(runs: list[dict], nets: list, transport_s: float = 0.0) -> dict:
    """A method's hops over its runs: counts, their emulated seconds, the transport's own seconds
    (`transport_s` per pass, one verdict back per pass), and tokens/s without both."""
    sent_m, sent_b, back_m, back_b = (sum(r["hops"][i] for r in runs) for i in range(4))
    seconds, tokens = sum(r["seconds"] for r in runs), sum(len(r["ids"]) for r in runs)
    hop_s = emulated_seconds(nets, (sent_m, sent_b), (back_m, back_b))
    rest = seconds - hop_s - back_m * transport_s
    return {"messages_down": sent_m, "bytes_down": sent_b, "messages_back": back_m, "bytes_back": back_b,
            "emulated_s": hop_s, "transport_s": back_m * transport_s, "seconds": seconds, "tokens": tokens,
            "tokens_per_s_without_hops": tokens / rest if rest > 0 else None}


def net_text(net) -> str:
    if net is None:
        return "none (the real one)"
    gbps = net.bytes_per_s * 8 / 1e9
    return f"{net.latency * 1e3:g} ms/message, " + (f"{gbps:g} Gb/s" if gbps < 1e5 else "no bandwidth limit")


def notes(split: dict, nets: list) -> str:
    """The report's lines on the split target (markdown bullets)."""
    lines = ["- split target: " + "; ".join(split["stages"]),
             "- emulated network on each stage's sends: " + "; ".join(
                 f"stage {r}: {net_text(n)}" for r, n in enumerate(nets)),
             f"- the transport's own round trip (measured at start): {split['transport_s_per_pass'] * 1e3:.1f} ms per pass"]
    lines += [f"- {name}: skipped: {why}" for name, why in split["skipped"].items()]
    for name, h in split["hops"].items():
        rate = h["tokens_per_s_without_hops"]
        lines.append(f"- {name} hops: {h['messages_down']} messages down the stages ({h['bytes_down']:,} bytes), "
                     f"{h['messages_back']} verdicts back ({h['bytes_back']:,} bytes): {h['emulated_s']:.2f} s emulated "
                     f"and {h['transport_s']:.2f} s of transport of its {h['seconds']:.2f} s; without them "
                     + (f"{rate:.2f} tokens/s" if rate else "-")
                     + " (a single-process run of the same target should match that)")
    return "\n" + "\n".join(lines) + "\n"
