"""Accepted tokens per target pass on the real pair: edgespec trees vs HF assisted generation (chain).

    python scripts/acceptance.py --n-prompts 5 --max-new-tokens 64
    python scripts/acceptance.py --n-prompts 5 --max-new-tokens 64 --temperature 0.7   # sampling

Target: SmolLM2-135M-Instruct fp32 (the embedded default); drafter: its nf4 copy (bitsandbytes).
Greedy on MT-Bench first turns. A "pass" is one target forward: for edgespec one step (the first
also carries the prompt's prefill), for assisted generation one call of the target's forward
(counted with a hook; its first call is the prefill). Both outputs are checked against the
target's own greedy generate.

With `--temperature T` both sample from the target's full distribution at T (no top-k/top-p):
edgespec keeps a draft node only if it carries the token the target samples there; HF assisted
generation accepts each drafted token with probability min(1, p/q) (speculative sampling). Outputs
are then draws, not comparable token by token (the exactness of the distribution is
tests/test_sampling.py's job); the table shows tokens per pass.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgespec import Engine  # noqa: E402
from edgespec.front.bench import run_assisted  # noqa: E402
from edgespec.engine.prompts import default_questions, read_questions  # noqa: E402
from edgespec.base.stats import Totals  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="1,16,64,256,1024", help="edgespec tree budgets ('none': chains only)")
    ap.add_argument("--n-prompts", type=int, default=80)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--chains", default="default,4,8", help="assisted generation: default schedule and constant chain lengths")
    ap.add_argument("--questions", default=str(default_questions()))
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0: sample at this temperature")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (prompt i uses seed + i)")
    ap.add_argument("--draft-temperatures", default="1", help="greedy tree scoring: the drafter's log-probs at "
                    "these temperatures (1 = as is; < 1 favours depth), e.g. 1,0.5")
    ap.add_argument("--tree-scores", default="calibrated", help="'calibrated' (hit rates learnt from verified "
                    "trees, the default), 'draft' (the drafter's raw probabilities), or both: draft,calibrated")
    ap.add_argument("--json", help="write the rows as JSON here")
    return ap.parse_args(argv)


def edgespec_row(target, drafter, tok, budget: int, prompts, max_new: int, refs, temperature=0.0, seed=0,
                 draft_temperature: float = 1.0, tree_scores: str = "calibrated") -> dict:
    engine = Engine(target, drafter, tok, budget=budget, overlap=False, draft_temperature=draft_temperature,
                    tree_scores=tree_scores)
    per_prompt, equal, totals = [], True, Totals()
    for i, (ids, ref) in enumerate(zip(prompts, refs)):
        engine.reset()
        out = engine.generate(ids, max_new_tokens=max_new, temperature=temperature, seed=seed + i, top_p=1.0,
                              top_k=0, min_p=0.0, repetition_penalty=1.0)  # the full distribution, as HF's run
        equal = None if ref is None else equal and out.ids == ref
        per_prompt.append(Totals.of([out.stats]).tokens_per_pass)
        totals.add(out.stats)
    name = f"edgespec K={budget}" + (f", draft T={draft_temperature:g}" if draft_temperature != 1.0 else "")
    name += ", raw draft scores" if tree_scores == "draft" else ""
    return {"method": name, "per_prompt": per_prompt, "tokens": totals.new_tokens, "passes": totals.steps,
            "equal": equal, "tree": totals.tree_tokens / totals.steps, "depth": totals.tree_depth / totals.steps,
            "draft_s": totals.draft_time, "verify_s": totals.verify_time, "hit_rates": out.stats.hit_rates}


def assisted_row(target, drafter, chain: str, prompts, max_new: int, refs, temperature=0.0, seed=0) -> dict:
    import copy

    saved = copy.deepcopy(drafter.generation_config)
    if chain != "default":  # read from the assistant's own generation config, not generate()'s kwargs
        cfg = drafter.generation_config
        cfg.num_assistant_tokens, cfg.num_assistant_tokens_schedule = int(chain), "constant"
        cfg.assistant_confidence_threshold = 0.0  # no early stop: chains of exactly `chain` tokens
    try:
        return _assisted(target, drafter, chain, prompts, max_new, refs, temperature, seed)
    finally:
        drafter.generation_config = saved


def _assisted(target, drafter, chain: str, prompts, max_new: int, refs, temperature=0.0, seed=0) -> dict:
    per_prompt, tokens, passes, equal, t = [], 0, 0, True, 0.0
    pad = target.generation_config.pad_token_id
    for i, (ids, ref) in enumerate(zip(prompts, refs)):
        sampling = {"temperature": temperature, "top_p": 1.0, "seed": seed + i} if temperature > 0 else None
        run = run_assisted(target, drafter, ids, max_new, pad, sampling)
        out, t = run["ids"], t + run["seconds"]
        equal = None if ref is None else equal and out == ref
        per_prompt.append(len(out) / run["passes"])
        tokens, passes = tokens + len(out), passes + run["passes"]
    name = "assisted (HF default schedule)" if chain == "default" else f"assisted (constant chain {chain})"
    return {"method": name, "per_prompt": per_prompt, "tokens": tokens, "passes": passes, "equal": equal,
            "tree": None, "depth": None, "draft_s": None, "verify_s": t}


def main(argv=None, pair=None, prompts=None) -> list[dict]:
    args = parse_args(argv)
    if pair is None:
        from edgespec.loading.models import load_model, load_tokenizer

        pair = (load_model(None), load_model(None, quantize="nf4"), load_tokenizer(None))
    target, drafter, tok = pair
    if prompts is None:
        questions = read_questions(args.questions)
        prompts = [Engine(target, drafter, tok, budget=1).encode([{"role": "user", "content": q}])
                   for q in questions[: args.n_prompts]]
    if args.temperature > 0:
        refs = [None] * len(prompts)  # draws: nothing to compare token by token
    else:
        refs = [target.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=False)[0, len(ids):]
                .tolist() for ids in prompts]
    sample = (args.temperature, args.seed)
    rows = [assisted_row(target, drafter, c.strip(), prompts, args.max_new_tokens, refs, *sample)
            for c in args.chains.split(",")]
    rows += [edgespec_row(target, drafter, tok, int(k), prompts, args.max_new_tokens, refs, *sample, float(t), ts)
             for ts in args.tree_scores.split(",")
             for t in args.draft_temperatures.split(",")
             for k in args.budgets.split(",") if k.strip() and k.strip() != "none"]
    report(rows, args, len(prompts))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


def report(rows: list[dict], args, n: int) -> None:
    chain = rows[0]
    base = chain["tokens"] / chain["passes"]
    print(f"\n# accepted tokens per target pass: SmolLM2-135M-Instruct fp32 target, nf4 drafter, {n} MT-Bench "
          f"first turns, {args.max_new_tokens} new tokens, "
          f"{'greedy' if args.temperature == 0 else f'sampling at temperature {args.temperature}'}\n")
    print("| method | tokens/pass (mean of prompts) | tokens/pass (pooled) | vs HF chain | greedy-equal | mean tree | mean depth | draft s | verify s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pooled = r["tokens"] / r["passes"]
        fmt = lambda v, f="{:.1f}": "–" if v is None else f.format(v)  # noqa: E731
        print(f"| {r['method']} | {statistics.fmean(r['per_prompt']):.2f} | {pooled:.2f} | {pooled / base:.2f}x | "
              f"{'–' if r['equal'] is None else 'yes' if r['equal'] else 'NO'} | {fmt(r['tree'])} | {fmt(r['depth'])} | {fmt(r['draft_s'])} | {fmt(r['verify_s'])} |")
    k256 = next((r for r in rows if r["method"] == "edgespec K=256"), None)
    if k256:
        ratio = (k256["tokens"] / k256["passes"]) / base
        print(f"\ngoal: K=256 >= 1.5x the HF chain's tokens per pass: {ratio:.2f}x -> {'met' if ratio >= 1.5 else 'NOT met'}")
    print("(times are CPU seconds with the nf4 drafter on a 2-core CPU: not representative of a GPU)")
    for r in rows:
        if r.get("hit_rates"):  # the calibration at the end of the row's last prompt (about its last 50 trees)
            print(f"\nhit rates learnt by {r['method']} (draft p -> share the target took, tests):")
            for kind, bins in r["hit_rates"].items():
                print(f"  {kind:>5}: " + ", ".join(f"{p:.2f}->{h:.2f} ({n:.0f})" for p, h, n in bins))


if __name__ == "__main__":
    main()
