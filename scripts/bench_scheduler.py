"""Scheduler vs fixed tree budgets on the real pair, with an emulated slow link, overlap on and off.

    python scripts/bench_scheduler.py --link-delay 0.04 --n-prompts 3 --max-new-tokens 48

Target: SmolLM2-135M-Instruct fp32 (embedded default), all decoder layers streamed through the
offload engine; on a CPU-only machine `--link-delay` seconds per streamed layer emulate the
host→device link (30 layers x 0.04 s ≈ 1.2 s per pass, a 70B-on-PCIe-like regime where the pass
costs about the same for 1 or 1,000 tokens). DraftRunner: its nf4 copy. Every configuration runs
greedy on the same MT-Bench first turns in the same process, each with a fresh engine, and all
outputs must be identical. The auto scheduler starts as a user's engine does: with the start-up
calibration of pass and draft costs on this machine (cached, not timed), knowing nothing about the
prompts' acceptance or which fixed budget wins. `--compare-scores 64,256` adds those budgets (overlap
on) ranked by the other tree scores, for the raw vs calibrated rows.

`--costs FILE` replays a machine's measured costs (edgespec/base/costs.py; e.g. benchmarks/costs/h200-8b.json)
instead of this machine's wall time: the models run here (the target unstreamed, no link delay: only
the tokens matter), every configuration's seconds are the file's, the auto engine's start-up
calibration too. Every configuration starts from the same state (its own fresh engine); the prompts
are taken in turn, each by every configuration in an order rotated by one per prompt.

    python scripts/bench_scheduler.py --costs benchmarks/costs/h200-8b.json --n-prompts 5 \
        --max-new-tokens 128 --overlap on --questions tests/data/mt_bench_first5.jsonl
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgespec import Engine  # noqa: E402
from edgespec.engine.prompts import KEPT, chat_messages, default_questions, read_questions  # noqa: E402
from edgespec.base.clock import ReplayClock, WallClock  # noqa: E402
from edgespec.base.stats import Totals  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--link-delay", type=float, default=0.04, help="seconds per streamed layer (emulated link)")
    ap.add_argument("--budgets", default="16,64,256,1024", help="fixed budgets to compare against")
    ap.add_argument("--n-prompts", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--overlap", default="off,on", help="overlap settings to run: off, on or both")
    ap.add_argument("--questions", default=str(default_questions()))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--target-shape", default=None,
                    help="GPU runs: zero-pad the target into this shape (e.g. llama-8b): realistic streaming cost, "
                         "the real model's predictions (see edgespec/offload/padded.py)")
    ap.add_argument("--draft-quant", default="nf4", choices=["nf4", "int8", "none"])
    ap.add_argument("--draft-temperature", type=float, default=1.0,
                    help="greedy tree scoring at this drafter temperature, for every configuration")
    ap.add_argument("--tree-scores", default="calibrated", choices=["calibrated", "draft"],
                    help="tree node ranking for every configuration: learnt hit rates or raw draft probabilities")
    ap.add_argument("--compare-scores", default="",
                    help="also run these fixed budgets (e.g. 64,256) with overlap on and the other tree scores "
                         "(raw draft probabilities when --tree-scores is calibrated), same prompts and process")
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--costs", default=None, help="replay this cost file's seconds (e.g. benchmarks/costs/h200-8b.json)")
    return ap.parse_args(argv)


def make_config(base: Engine, budget, overlap: bool, clock, draft_temperature: float = 1.0,
                tree_scores: str = "calibrated") -> dict:
    """A fresh engine for one configuration: every configuration starts from the same state (the auto
    engine with its start-up calibration, paid here, before its first answer)."""
    engine = Engine(base.target, base.drafter, base.tokenizer, budget=budget, overlap=overlap, progress=False,
                    calibrate=budget == "auto", draft_temperature=draft_temperature, tree_scores=tree_scores,
                    clock=clock)
    name = f"{'auto' if budget == 'auto' else f'K={budget}'} overlap={'on' if overlap else 'off'}"
    return {"engine": engine, "config": name, "budget": budget, "overlap": overlap, "tree_scores": tree_scores,
            "outputs": [], "totals": Totals()}


def answer(cfg: dict, question: str, max_new: int) -> None:
    engine = cfg["engine"]
    engine.reset()
    out = engine.generate(engine.encode(chat_messages(question)), max_new_tokens=max_new, temperature=0)
    cfg["outputs"].append(out.ids)
    cfg["totals"].add(out.stats)


def row(cfg: dict) -> dict:
    totals = cfg["totals"]
    return {
        "config": cfg["config"], "budget": cfg["budget"], "overlap": cfg["overlap"], "tree_scores": cfg["tree_scores"],
        "tokens": totals.new_tokens, "passes": totals.steps,
        "wall_s": round(totals.wall_time, 2), "tok_per_s": round(totals.tokens_per_second, 3),
        "acc_per_pass": round(totals.tokens_per_pass, 2), "mean_budget": totals.as_dict()["mean_budget"],
        "rest_share": round(totals.overhead_time / max(totals.draft_time + totals.verify_time + totals.overhead_time,
                                                       1e-12), 4),
        "outputs": cfg["outputs"],
    }


def load_base(args) -> Engine:
    if args.costs:  # only the tokens are this machine's: the target unstreamed, no emulated link
        return Engine.from_pretrained(device=args.device, offload=False, budget=16, draft_quant=args.draft_quant,
                                      progress=False)
    return Engine.from_pretrained(device=args.device, offload=True, resident_layers=0, link_delay=args.link_delay,
                                  budget=16, target_shape=args.target_shape, draft_quant=args.draft_quant)


def main(argv=None, base: Engine | None = None, prompts: list | None = None) -> list[dict]:
    args = parse_args(argv)
    base = base or load_base(args)
    questions = args.questions if Path(args.questions).is_file() else str(KEPT)
    prompts = prompts or read_questions(questions, args.n_prompts)
    overlaps = [o.strip() == "on" for o in args.overlap.split(",")]
    other = OTHER_SCORES[args.tree_scores]
    specs = [("auto", o, args.tree_scores) for o in overlaps]
    specs += [(int(b), o, args.tree_scores) for o in overlaps for b in args.budgets.split(",") if b.strip()]
    specs += [(int(b), True, other) for b in args.compare_scores.split(",") if b.strip()]
    clock = ReplayClock(args.costs) if args.costs else WallClock()
    configs = [make_config(base, b, o, clock, args.draft_temperature, sc) for b, o, sc in specs]
    for cfg, (_, _, scores) in zip(configs, specs):
        if scores != args.tree_scores:
            cfg["config"] += f" {SCORE_NAMES[scores]} scores"
    for i, question in enumerate(prompts):  # every configuration answers each prompt, the order rotated
        for cfg in configs[i % len(configs):] + configs[:i % len(configs)]:
            answer(cfg, question, args.max_new_tokens)
            print(f"  prompt {i + 1} {cfg['config']:<22} {cfg['totals'].tokens_per_second:.3f} tok/s so far",
                  flush=True)
    rows = [row(cfg) for cfg in configs]
    report(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "outputs"} for r in rows], indent=1))
    return rows


OTHER_SCORES = {"calibrated": "draft", "draft": "calibrated"}
SCORE_NAMES = {"calibrated": "calibrated", "draft": "raw"}


def report(rows: list[dict], args) -> None:
    same = all(r["outputs"] == rows[0]["outputs"] for r in rows)
    compared = [r for r in rows if r["tree_scores"] != args.tree_scores]
    rows = [r for r in rows if r["tree_scores"] == args.tree_scores]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    link = f"replayed costs {args.costs}" if args.costs else f"link delay {args.link_delay} s/layer"
    print(f"\n# scheduler vs fixed budgets ({link}, {args.n_prompts} prompts, "
          f"{args.max_new_tokens} new tokens, target shape {args.target_shape or 'as loaded'}, "
          f"{platform.machine()} {gpu} torch {torch.__version__})\n")
    print("| config | tok/s | tokens/pass | mean budget | passes | seconds | rest share |")
    print("|---|---|---|---|---|---|---|")
    for r in rows + compared:
        print(f"| {r['config']} | {r['tok_per_s']:.3f} | {r['acc_per_pass']:.2f} | {r['mean_budget']} "
              f"| {r['passes']} | {r['wall_s']} | {r['rest_share']:.1%} |")
    print(f"\nall outputs identical: {same}")
    for overlap in sorted({r["overlap"] for r in rows}):
        group = [r for r in rows if r["overlap"] == overlap]
        fixed = [r for r in group if r["budget"] != "auto"]
        auto = next((r for r in group if r["budget"] == "auto"), None)
        if not fixed or auto is None:
            continue
        best, worst = max(fixed, key=lambda r: r["tok_per_s"]), min(fixed, key=lambda r: r["tok_per_s"])
        ratio = auto["tok_per_s"] / best["tok_per_s"]
        print(f"overlap {'on' if overlap else 'off'}: auto {auto['tok_per_s']:.3f} tok/s = {ratio:.2f}x best fixed "
              f"({best['config']}, {best['tok_per_s']:.3f}); worst fixed {worst['config']} {worst['tok_per_s']:.3f}; "
              f"goal (>= 0.90x best): {'met' if ratio >= 0.9 else 'NOT met'}")
    on = [r for r in rows if r["overlap"]]
    off = {r["budget"]: r for r in rows if not r["overlap"]}
    for r in on:
        if r["budget"] in off:
            print(f"overlap gain at {r['config'].split()[0]}: {r['tok_per_s'] / off[r['budget']]['tok_per_s']:.2f}x")
    mine = {r["budget"]: r for r in on}
    for r in compared:
        if r["budget"] in mine:
            m = mine[r["budget"]]
            print(f"{SCORE_NAMES[args.tree_scores]} vs {SCORE_NAMES[r['tree_scores']]} scores at K={r['budget']} "
                  "(overlap on): "
                  f"{m['tok_per_s']:.3f} vs {r['tok_per_s']:.3f} tok/s ({m['tok_per_s'] / r['tok_per_s']:.2f}x), "
                  f"{m['acc_per_pass']:.2f} vs {r['acc_per_pass']:.2f} tokens/pass")


if __name__ == "__main__":
    main()
