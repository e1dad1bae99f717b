"""Tokens per target pass with and without a JSON-schema constraint, and what the grammar costs a step.

    python scripts/structured_acceptance.py --budgets 16,64,256 --max-new-tokens 64 [--schema-in-prompt no]

Target: SmolLM2-135M-Instruct fp32 (the embedded default); drafter: its nf4 copy (bitsandbytes). Greedy,
the drafting not overlapped with the pass (so a step's time is drafting + the pass). Prompts: the ten
below, written for this benchmark, each asking for a JSON object naming its fields in words and, by
default, carrying the schema it is constrained to in its text ("Answer with JSON matching this schema:
{...}"); with --schema-in-prompt no the schema is left out of the text ("Answer with JSON only."), as
a client sending `response_format` leaves it: the constraint alone holds it. "tokens / pass" is new
tokens over target passes; "grammar ms / pass" is the time spent in the grammar engine and its masks (the drafter's proposals, the target's picks) per step, timed by
wrapping edgespec's grammar calls, and "% of step" that over the step's drafting + pass time. Every
constrained answer that ends is checked against its schema (jsonschema).

Rows, per budget, each with a fresh tree-score calibration: "JSON schema" (constrained, the drafter
proposing under the mask); "JSON schema, drafter unmasked" (the same answers, token for token — checked —
with the drafter proposing unconstrained: what drafting under the mask buys); "none" (no constraint, up
to --max-new-tokens: the small model mostly echoes the prompt's schema, text a drafter predicts almost
perfectly); "none, cut to the constrained length" (each prompt stopped at its constrained answer's token
count: same prompts, same tokens). "copied %": the new tokens that complete a 4-gram of the prompt's
own tokens (the schema echoed back).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jsonschema  # noqa: E402

from edgespec import Engine  # noqa: E402
from edgespec.core import grammar as grammar_mod, sampling, search  # noqa: E402
from edgespec.core.grammar import Grammar  # noqa: E402


def obj(props: dict, required=None) -> dict:
    return {"type": "object", "properties": props, "required": required or list(props), "additionalProperties": False}


S, I, B = {"type": "string", "maxLength": 40}, {"type": "integer"}, {"type": "boolean"}
PROMPTS = [
    ("Describe a fictional person as JSON with name, age and city.", obj({"name": S, "age": I, "city": S})),
    ("Give me a book recommendation as JSON: title, author, year.", obj({"title": S, "author": S, "year": I})),
    ("Return today's weather in Paris as JSON (temperature in C, sunny yes/no).",
     obj({"city": S, "temperature": I, "sunny": B})),
    ("List three fruits as a JSON object with a 'fruits' array.",
     obj({"fruits": {"type": "array", "items": S, "maxItems": 5}})),
    ("Write a simple pancake recipe as JSON with a name, a list of ingredients and the minutes it takes.",
     obj({"name": S, "ingredients": {"type": "array", "items": S, "maxItems": 8}, "minutes": I})),
    ("Give the capital of France and its population as JSON.", obj({"country": S, "capital": S, "population": I})),
    ("Summarise the sentence 'The cat sat on the mat' as JSON with the subject, verb and object.",
     obj({"subject": S, "verb": S, "object": S})),
    ("Classify the review 'Great phone, terrible battery' as JSON with a sentiment and a confidence from 0 to 100.",
     obj({"sentiment": {"enum": ["positive", "negative", "mixed"]}, "confidence": I})),
    ("Describe a laptop for sale as JSON: brand, price in dollars, in stock or not.",
     obj({"brand": S, "price": {"type": "number"}, "in_stock": B})),
    ("Create a to-do item as JSON with a title, a priority (low, medium or high) and whether it is done.",
     obj({"title": S, "priority": {"enum": ["low", "medium", "high"]}, "done": B})),
]


class Clock:
    """Seconds spent in the grammar: wraps the grammar calls the search, the walk and the sampler make."""

    def __init__(self):
        self.seconds, self.depth = 0.0, 0  # (a grammar call inside another is counted once)
        self._wrap(search, "allowed_rows")
        self._wrap(sampling, "mask_logits")
        for name in ("then", "advance", "fork", "allowed"):
            self._wrap(grammar_mod.GrammarState, name)

    def _wrap(self, owner, name):
        real = getattr(owner, name)

        def timed(*a, **k):
            t = time.perf_counter()
            self.depth += 1
            try:
                return real(*a, **k)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.seconds += time.perf_counter() - t

        setattr(owner, name, timed)


def copied(prompt: list[int], new: list[int], n: int = 4) -> int:
    """How many of `new` end an n-gram (with the tokens before them) that the prompt holds: text copied
    from the prompt, which a drafter predicts almost perfectly."""
    grams = {tuple(prompt[i:i + n]) for i in range(len(prompt) - n + 1)}
    seq = prompt[-(n - 1):] + new
    return sum(tuple(seq[i:i + n]) in grams for i in range(len(new)))


ROWS = ("JSON schema", "JSON schema, drafter unmasked", "none", "none, cut to the constrained length")


def unmasked_drafter():
    """The drafter proposes without the grammar (the target still verifies under it: same output), to
    show what drafting under the mask buys."""
    real = search.TreeSearch._allowed_at
    search.TreeSearch._allowed_at = lambda self, parents: None
    return real


def message(text: str, schema: dict, schema_in_prompt: bool) -> list[dict]:
    tail = f"Answer with JSON matching this schema: {json.dumps(schema)}" if schema_in_prompt else "Answer with JSON only."
    return [{"role": "user", "content": f"{text} {tail}"}]


def run_row(engine, budget: int, prompts, row: str, budget_lengths: list[int], max_new: int, clock: Clock, same: list,
            schema_in_prompt: bool = True) -> str:
    """One table row: every prompt once, with a fresh tree-score calibration (no row learns from another)."""
    from edgespec.core.scores import ScoreCalibrations

    engine.calibrations = ScoreCalibrations(engine.config.tree_scores == "calibrated")
    constrained = row.startswith("JSON")
    real = unmasked_drafter() if row == ROWS[1] else None
    new = passes = valid = ended = copies = 0
    step_s, before = 0.0, clock.seconds
    try:
        for i, (text, schema) in enumerate(prompts):
            engine.reset()
            msgs = message(text, schema, schema_in_prompt)
            n = budget_lengths[i] if row == ROWS[3] else max_new
            out = engine.generate(msgs, max_new_tokens=n, temperature=0,
                                  grammar=Grammar.json_schema(schema) if constrained else None)
            if row == ROWS[0]:
                budget_lengths.append(len(out.ids))
                same.append(out.ids)
            elif row == ROWS[1]:
                assert out.ids == same[i], "the drafter's mask changed the output: verification is not exact"
            new += len(out.ids)
            copies += copied(engine.encode(msgs), out.ids)
            passes += len(out.stats.steps)
            step_s += sum(s.draft_time + s.verify_time for s in out.stats.steps)
            if constrained and out.stats.stop_reason == "eos":
                ended += 1
                jsonschema.validate(json.loads(out.text), schema)
                valid += 1
    finally:
        if real is not None:
            search.TreeSearch._allowed_at = real
    g = (clock.seconds - before) / passes * 1e3
    step = step_s / passes * 1e3
    return (f"| {budget} | {row} | {new / passes:.2f} | {passes} | {new} | "
            f"{g:.2f} | {step:.0f} | {100 * g / step:.1f} | {100 * copies / new:.0f} | "
            f"{f'{valid} / {ended}' if constrained else '-'} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="16,64,256")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--n-prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--schema-in-prompt", choices=("yes", "no"), default="yes",
                    help="no: the prompt names the fields in words only, the schema is the constraint's alone")
    ap.add_argument("--rows", default="0,1,2,3", help="which rows (0-3, in the order of ROWS) to print")
    args = ap.parse_args(argv)
    if not set(args.rows.split(",")) <= {"0", "1", "2", "3"}:
        ap.error(f"--rows {args.rows!r}: give row numbers 0-3, comma-separated (e.g. 0,2)")
    shown_rows = {ROWS[int(r)] for r in args.rows.split(",")}
    run_rows = shown_rows | ({ROWS[0]} if shown_rows & {ROWS[1], ROWS[3]} else set())  # they need row 0's answers
    from edgespec.loading.models import load_model, load_tokenizer

    target, drafter, tok = load_model(None), load_model(None, quantize="nf4"), load_tokenizer(None)
    clock = Clock()
    prompts = PROMPTS[: args.n_prompts]
    shown = args.schema_in_prompt == "yes"
    print(f"{len(prompts)} prompts, at most {args.max_new_tokens} new tokens each, greedy, schema "
          f"{'in the prompt' if shown else 'left out of the prompt'}\n")
    print("| budget | constraint | tokens / pass | passes | new tokens | grammar ms / pass | step ms | % of step "
          "| copied % | valid / ended |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for budget in [int(b) for b in args.budgets.split(",")]:
        engine = Engine(target, drafter, tok, budget=budget, overlap=False)
        lengths, same = [], []
        for row in (r for r in ROWS if r in run_rows):
            line = run_row(engine, budget, prompts, row, lengths, args.max_new_tokens, clock, same, shown)
            if row in shown_rows:
                print(line, flush=True)


if __name__ == "__main__":
    main()
