"""`edgespec bench`: tokens/s and tokens per target pass on MT-Bench first turns, greedy, for

- edgespec: tree speculation, budget from the scheduler (auto unless --budget);
- plain: the same (offloaded) target decoding alone, one target pass per token (Engine, budget 0);
- HF assisted: `target.generate(assistant_model=drafter)` with the same pair.

With --stages (a target split across stages) the first two verify through the split target and HF
assisted is skipped (bench_split.py, which also prices each row's hops).

All three must produce the same tokens (greedy is lossless); the "same as plain" column says so. In
bf16 on a GPU, different batch shapes (a tree, a chain, one token) round the target's logits
differently, so a near-tie between its two best tokens can flip: where a method's output differs from
plain decoding, the report names the first differing token and the target's top-2 logit gap there,
and calls it a rounding tie only when that gap is within a few units in the last place of its dtype.
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from edgespec.base.device import compute_dtype, model_device
from edgespec.engine.prompts import chat_messages, load_prompts
from edgespec.base.stats import REST_PARTS, Totals
from edgespec.core.sampling import SamplingConfig
from edgespec.engine.face import FrontEnd
from edgespec.front import arguments, bench_split, replay
from edgespec.front.bench_report import TIE_ULPS, machine, markdown_table, report, rest_share

METHODS = ("edgespec", "plain", "hf-assisted")


# ---- the three methods --------------------------------------------------------------------------
# what every method decodes by: greedy, or sampling from the full distribution at T (top-p as asked),
# never the model's chat defaults (HF assisted and plain decoding must do exactly the same)
GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def run_engine(engine: FrontEnd, ids: list[int], max_new: int, sampling: dict | None = None) -> dict:
    engine.reset()  # no prefix cached from the previous prompt: every method starts cold
    settings = {**GREEDY, **(sampling or {})}
    seed = settings.pop("seed", None)
    out = engine.generate(ids, max_new_tokens=max_new, seed=seed, sampling=SamplingConfig(**settings))
    t = Totals.of([out.stats])
    split = {name: getattr(t, f"{name}_time") for name in ("draft", "verify", "overhead", "overlap")}
    split["rest"] = dict(t.rest)  # the overhead by part (stats.REST_PARTS)
    return {"ids": out.ids, "seconds": out.stats.wall_time, "passes": t.steps, "tree_tokens": t.tree_tokens,
            "split": split, "steps": out.stats.steps}


def run_assisted(target, drafter, ids: list[int], max_new: int, pad_id, sampling: dict | None = None) -> dict:
    counter = [0]
    hook = target.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    x = torch.tensor([ids], device=model_device(target))
    how = {"do_sample": False}
    if sampling:  # its own random stream: speculative sampling, full distribution at T, top-p as asked
        torch.manual_seed(sampling["seed"])
        how = {"do_sample": True, "temperature": sampling["temperature"], "top_p": sampling["top_p"], "top_k": 0}
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = target.generate(x, attention_mask=torch.ones_like(x), assistant_model=drafter,
                                  max_new_tokens=max_new, pad_token_id=pad_id, **how)
        seconds = time.perf_counter() - t0
    finally:
        hook.remove()
    return {"ids": out[0, len(ids):].tolist(), "seconds": seconds, "passes": counter[0], "tree_tokens": None}


def runners(engine: FrontEnd, sampling: dict | None = None):
    from edgespec.engine.engine import Engine

    if engine.verifier is not None:  # a target split across stages: its own methods (bench_split.py)
        return bench_split.runners(engine, sampling, run_engine)
    plain = Engine(engine.target, engine.drafter, engine.tokenizer, budget=0, clock=engine.clock)
    pad = next(iter(engine.eos_ids), 0)
    methods = {
        "edgespec": lambda ids, n: run_engine(engine, ids, n, sampling),
        "plain": lambda ids, n: run_engine(plain, ids, n, sampling),
        "hf-assisted": lambda ids, n: run_assisted(engine.target, engine.drafter, ids, n, pad, sampling),
    }
    if engine.clock.replay:  # transformers' own loop has no replayed seconds
        del methods["hf-assisted"]
    return methods


def run_bench(engine: FrontEnd, prompts: list[str], max_new: int, system: str | None = None, warmup: bool = True,
              progress: bool = True, sampling: dict | None = None) -> dict:
    """Every method on every prompt; returns per-method totals and per-prompt outputs. `sampling`
    ({temperature, top_p, seed}) samples instead of decoding greedily: edgespec and plain decoding
    then draw the same tokens for the same seed (edgespec/core/sampling.py), HF assisted its own."""
    methods = runners(engine, sampling)
    encoded = [engine.encode(chat_messages(p, system)) for p in prompts]
    if warmup and encoded:  # first-call costs (kernels, allocator) stay out of the timings
        for fn in methods.values():
            fn(encoded[0], 2)
    outputs = {m: [] for m in methods}
    with tqdm(total=len(encoded) * len(methods), desc="edgespec: bench", unit="run", disable=not progress) as bar:
        for ids in encoded:
            for name, fn in methods.items():
                bar.set_postfix_str(name)
                outputs[name].append(fn(ids, max_new))
                bar.update()
    own_stream = {"hf-assisted"} if sampling else set()  # draws from its own random stream: not comparable
    diverged = divergences(engine.target, encoded, outputs, skip=own_stream)
    return {"prompts": len(prompts), "max_new_tokens": max_new, "sampling": sampling,
            "rows": summarize(outputs, diverged, own_stream),
            "divergences": diverged, "outputs": {m: [r["ids"] for r in rs] for m, rs in outputs.items()},
            "steps": [s for m in ("edgespec", "plain") for r in outputs[m] for s in r["steps"]],
            **bench_split.summary(engine, outputs)}




def divergences(target, encoded: list[list[int]], outputs: dict, skip=()) -> list[dict]:
    """Where a method's tokens first differ from plain decoding's, with the target's top-2 logit gap."""
    found = []
    for name in (m for m in METHODS if m in outputs and m not in skip):
        for i, (ids, run) in enumerate(zip(encoded, outputs[name])):
            ref = outputs["plain"][i]["ids"]
            at = first_difference(run["ids"], ref)
            if at is None or at >= len(ref):
                continue
            gap, ulp = top2_gap(target, ids + ref[:at])
            found.append({"method": name, "prompt": i, "token": at, "gap": gap, "ulp": ulp,
                          "tie": at < len(run["ids"]) and gap <= TIE_ULPS * ulp})
    return found


def first_difference(a: list[int], b: list[int]) -> int | None:
    at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return at if at is not None or len(a) == len(b) else min(len(a), len(b))


@torch.no_grad()
def top2_gap(target, ids: list[int]) -> tuple[float, float]:
    """The target's top-1 minus top-2 logit after `ids`, and one unit in the last place of the top
    logit in the target's compute dtype."""
    if target.get_output_embeddings() is None:  # stage 0 of a split target: the head is on the last stage
        return float("nan"), float("nan")
    x = torch.tensor([ids], device=model_device(target))
    top = target(x, logits_to_keep=1).logits[0, -1].float().topk(2).values
    ulp = torch.finfo(compute_dtype(target)).eps * 2.0 ** torch.floor(torch.log2(top[0].abs().clamp(min=1e-30)))
    return (top[0] - top[1]).item(), ulp.item()


def summarize(outputs: dict, diverged: list[dict] | None = None, own_stream=()) -> list[dict]:
    rows = []
    plain_rate = None
    for name in (m for m in METHODS if m in outputs):
        rs = outputs[name]
        tokens = sum(len(r["ids"]) for r in rs)
        secs, passes = sum(r["seconds"] for r in rs), sum(r["passes"] for r in rs)
        trees = None if any(r["tree_tokens"] is None for r in rs) else sum(r["tree_tokens"] for r in rs)
        same = all(outputs["plain"][i]["ids"] == r["ids"] for i, r in enumerate(rs))
        mine = [d for d in diverged or [] if d["method"] == name]
        if name == "plain":
            agreement = "reference"
        elif name in own_stream:
            agreement = "n/a (own sampler)"
        else:
            agreement = "yes" if same else ("near-tie" if mine and all(d["tie"] for d in mine) else "NO")
        rate = tokens / secs if secs else 0.0
        plain_rate = rate if name == "plain" else plain_rate
        timed = rs and all("split" in r for r in rs)
        split = add_splits([r["split"] for r in rs]) if timed else None
        rows.append({"method": name, "split": split, "rest_share": rest_share(split) if split else None,
                     "tokens_per_s": rate,
                     "tokens_per_pass": tokens / passes if passes else 0.0,
                     "passes": passes, "mean_tree": trees / passes if trees is not None and passes else None,
                     "new_tokens": tokens, "seconds": secs, "same_output": same, "agreement": agreement})
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / plain_rate if plain_rate else None
    return rows


def add_splits(splits: list[dict]) -> dict:
    """The runs' time splits summed: seconds per phase, and the rest per part."""
    total = {k: round(sum(sp[k] for sp in splits), 4) for k in splits[0] if k != "rest"}
    total["rest"] = {k: round(sum(sp["rest"].get(k, 0.0) for sp in splits), 4) for k in REST_PARTS}
    return total


def main(args, load) -> int:
    prompts, source = load_prompts(args.n_prompts, args.questions)
    engine = load()
    sampling = None
    if getattr(args, "temperature", None):  # bench decodes greedily unless --temperature is given
        sampling = {"temperature": args.temperature, "top_p": args.top_p or 1.0, "seed": args.seed or 0}
    result = run_bench(engine, prompts, arguments.max_new_tokens(args), args.system, sampling=sampling)
    result["source"] = source
    result["clock"] = engine.clock.describe()
    replay.write_costs(args, result.pop("steps"), f"edgespec bench on {machine()}")
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "outputs"}, indent=2))
    else:
        print(markdown_table(result["rows"]))
    if args.out:
        argv_text = "edgespec " + " ".join(shlex.quote(a) for a in getattr(args, "argv", ["bench"]))
        Path(args.out).write_text(report(result, engine, args, argv_text))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
