"""The bench's report: the markdown table, the header (command, date, machine, versions, setup), where
each method's seconds went (the per-step rest by part) and where outputs part from plain decoding."""
from __future__ import annotations

import datetime
import os
import platform

import torch

from edgespec.base.stats import REST_PARTS
from edgespec.engine.face import FrontEnd

TIE_ULPS = 8  # a gap within this many units in the last place of the top logit counts as a rounding tie


# ---- output ------------------------------------------------------------------------------------
def markdown_table(rows: list[dict]) -> str:
    cols = ["method", "tokens/s", "tokens/pass", "target passes", "mean tree", "new tokens", "seconds", "vs plain",
            "same as plain"]
    lines = ["| " + " | ".join(cols) + " |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        speed = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        tree = f"{r['mean_tree']:.1f}" if r["mean_tree"] is not None else "-"
        cells = [r["method"], f"{r['tokens_per_s']:.2f}", f"{r['tokens_per_pass']:.2f}", r["passes"], tree,
                 r["new_tokens"], f"{r['seconds']:.1f}", speed, r["agreement"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = f"{os.cpu_count()}-core {platform.machine()} CPU"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {gpu}, {platform.system()} {platform.release()}"


def versions() -> str:
    import transformers

    from edgespec.base import VERSION

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}",
             f"transformers {transformers.__version__}", f"edgespec {VERSION}"]
    try:
        import bitsandbytes

        parts.append(f"bitsandbytes {bitsandbytes.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


def setup_line(engine: FrontEnd, args) -> str:
    off = engine.offload
    encoded = f", streamed {off.quantize}-encoded" if off is not None and off.quantize else ""
    raw = sorted({c["type"] for c in off.codecs() if c["codec"].startswith("gguf:")}) if off is not None else []
    encoded += f", streamed as the GGUF's blocks ({', '.join(raw)})" if raw else ""
    where = (f"offloaded target ({off.streamed_layers} streamed / {off.resident_layers} resident layers{encoded}, "
             f"link delay {off.transport.link_delay} s/layer)" if off is not None else "target fully on the device")
    shape = getattr(args, "target_shape", None)
    padded = f" zero-padded into the {shape} shape" if shape else ""
    temperature = getattr(args, "temperature", None)
    how = f"sampling at temperature {temperature}, top-p {args.top_p or 1.0}" if temperature else "greedy"
    drafter = args.draft or ("the target's own copy" if args.target else "embedded")
    quant = args.draft_quant
    sd = engine.self_draft
    if sd is not None:  # the target drafts for itself
        drafter, quant = "the target itself", f"{len(sd.shared)} layers shared, {len(sd.copies)} {sd.codec} copies"
    return (f"target {args.target or 'embedded SmolLM2-135M-Instruct'}{padded}, drafter {drafter} "
            f"({quant}, {engine.drafter_forward()} forward); {where}; "
            f"device {engine.device}; budget {args.budget}; {how}")


def report(result: dict, engine: FrontEnd, args, argv_text: str) -> str:
    head = [
        "# edgespec bench", "",
        f"- command: `{argv_text}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {machine()}",
        f"- versions: {versions()}",
        f"- setup: {setup_line(engine, args)}",
        f"- seconds: {result.get('clock', 'wall clock')}; warm-up before the first answer (drafter graph capture, "
        f"the scheduler's start-up calibration) {engine.warmup_seconds:.1f} s, not in the rows",
        f"- prompts: {result['prompts']} from {result['source']}, max {result['max_new_tokens']} new tokens",
        ("- tokens/pass = new tokens / target forward passes (prefill included in the first pass); "
         "mean tree = draft tokens verified per target pass; "
         "same as plain = token-identical to plain " + ("greedy decoding" if not result.get("sampling") else
                                                         f"decoding with the same sampling seed ({sampling_text(result)})")
         + " of the same target on every prompt (near-tie: see the notes under the table)"), "", ""
    ]
    return ("\n".join(head) + markdown_table(result["rows"]) + "\n" + time_split(result["rows"])
            + divergence_notes(result) + result.get("split_notes", "") + "\n")


def sampling_text(result: dict) -> str:
    sp = result["sampling"]
    return f"temperature {sp['temperature']}, top-p {sp['top_p']}, seed {sp['seed']}"


def time_split(rows: list[dict]) -> str:
    """Where the engine methods' seconds went: drafting before the pass, the passes, the rest by part."""
    lines = []
    for r in rows:
        sp = r.get("split")
        if sp:
            lines.append(f"- {r['method']} time split: drafting {sp['draft']:.2f} s before the passes "
                         f"(+{sp['overlap']:.2f} s during them), target passes {sp['verify']:.2f} s, "
                         f"per-step rest {sp['overhead']:.2f} s ({rest_share(sp):.1%} of the steps: "
                         f"{rest_parts(sp['rest'])})")
    return ("\n" + "\n".join(lines) + "\n") if lines else ""


def rest_share(split: dict) -> float:
    """The rest's share of the steps' time (drafting before the pass + the passes + the rest)."""
    steps = split["draft"] + split["verify"] + split["overhead"]
    return split["overhead"] / steps if steps > 0 else 0.0


REST_WORDS = {"plan": "planning", "capture": "graph capture", "prune": "pruning", "reroot": "re-rooting",
              "observe": "observing", "text": "text", "other": "other"}


def rest_parts(rest: dict) -> str:
    """E.g. "planning 0.010 s, graph capture 0.000 s, ..." in the order of stats.REST_PARTS."""
    return ", ".join(f"{REST_WORDS[k]} {rest.get(k, 0.0):.3f} s" for k in REST_PARTS)


def divergence_notes(result: dict) -> str:
    """One line per output that differs from plain decoding (empty when all agree)."""
    lines = []
    for d in result.get("divergences", []):
        kind = "a rounding tie" if d["tie"] else "NOT a tie: a real mismatch"
        lines.append(f"- {d['method']}, prompt {d['prompt'] + 1}: first differs from plain at new token {d['token']}, "
                     f"where the target's top-2 logits differ by {d['gap']:.4f} (1 ulp = {d['ulp']:.4f}): {kind}")
    if not lines:
        return ""
    return ("\nsame as plain = yes: token-identical to plain decoding on every prompt; near-tie: every difference "
            f"starts where the target's two best logits are within {TIE_ULPS} units in the last place (batch-shape "
            "rounding in low precision decides it); NO: a real mismatch.\n\n" + "\n".join(lines) + "\n")


