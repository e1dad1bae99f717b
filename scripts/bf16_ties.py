#!/usr/bin/env python
"""Where edgespec's greedy output leaves `target.generate` when the target runs in bf16, and why.

    python scripts/bf16_ties.py --n-prompts 5 --max-new-tokens 48 --budget 64

The embedded pair on the CPU with the target in bf16 (fp32 is token-exact: see the tests). For each
prompt it prints whether edgespec's tokens equal `generate`'s and, where they first differ, the
target's own top-2 logits at that point (a plain forward over prompt + generate's tokens so far)
and their gap in bf16 units in the last place: a flip there is batch-shape rounding, not a bug.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgespec import Engine  # noqa: E402
from edgespec.front.bench import first_difference, top2_gap  # noqa: E402
from edgespec.loading.models import load_model, load_tokenizer  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-prompts", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--questions", default=str(ROOT / "tests" / "data" / "mt_bench_first5.jsonl"))
    args = ap.parse_args(argv)
    tok = load_tokenizer(None, False)
    target = load_model(None, device="cpu", dtype=torch.bfloat16, progress=False)
    drafter = load_model(None, device="cpu", quantize="nf4", progress=False)
    engine = Engine(target, drafter, tok, budget=args.budget, calibrate=False, progress=False)
    lines = [json.loads(x)["turns"][0] for x in Path(args.questions).read_text().splitlines() if x.strip()]
    for i, question in enumerate(lines[: args.n_prompts], 1):
        engine.reset()
        ids = engine.encode([{"role": "user", "content": question}])
        got = engine.generate(ids, max_new_tokens=args.max_new_tokens, temperature=0).ids
        x = torch.tensor([ids])
        with torch.no_grad():
            ref = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens,
                                  do_sample=False)[0, len(ids):].tolist()
        at = first_difference(got, ref)
        if at is None:
            print(f"prompt {i}: identical ({len(got)} tokens)")
            continue
        gap, ulp = top2_gap(target, ids + ref[:at])
        print(f"prompt {i}: first differs at new token {at} (edgespec {got[at] if at < len(got) else None}, "
              f"generate {ref[at] if at < len(ref) else None}); target's top-2 logit gap there {gap:.4f} "
              f"= {gap / ulp:.1f} bf16 ulps")


if __name__ == "__main__":
    main()
