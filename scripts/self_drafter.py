"""Tokens per target pass with the target drafting for itself (edgespec/loading/self_drafter.py), by codec of the
streamed layers' copies and resident layers, next to the target's own full nf4 copy as drafter.

    python scripts/self_drafter.py --target /path/qwen.gguf --codecs nf4,hqq4,hqq3,hqq2 --resident 0,14
    python scripts/self_drafter.py --codecs nf4,hqq2 --resident 0,15        # the embedded SmolLM2

Greedy, MT-Bench first turns with the chat template, fixed budgets (`Engine(budget=K)`, overlap off, as
scripts/acceptance.py). A pass is one target forward (the prefill is the first). Each drafter is built
by the loader exactly as `edgespec chat --draft self --draft-quant C --resident-layers R` builds it.

`--verify oracle` (for speed on a CPU) replaces the target's tree pass by a lookup in the target's own
greedy continuation, computed once per prompt with `target.generate` (its de-quantized copy): in greedy
decoding a tree node is accepted exactly when its path is that continuation's next tokens, so the
tokens per pass are the same as with the real pass (`--verify target` runs it: check one row both ways).
`--dense-copies` runs each low-bit copy as its de-quantized weight in an nn.Linear: the values every
codec's CPU forward multiplies by (4-bit and HQQ copies de-quantize the weight in every call, then
multiply in the compute dtype; int8 copies do the same on a CPU, lowbit.Int8Copy), so the tokens per
pass are the codec's, drafted faster.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgespec import Engine  # noqa: E402
from edgespec.loading import lowbit
from edgespec.base.config import LoadConfig  # noqa: E402
from edgespec.loading.loader import load_pair  # noqa: E402
from edgespec.engine.prompts import default_questions, read_questions  # noqa: E402
from edgespec.base.stats import Totals  # noqa: E402
from edgespec.core.verify import Verdict, walk  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default=None, help="the target (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--codecs", default="nf4", help=f"self-drafter copy codecs, of {','.join(lowbit.CODECS)}")
    ap.add_argument("--resident", default="0", help="resident target layers to try, e.g. 0,14")
    ap.add_argument("--copy", action="store_true", help="also the target's own full nf4 copy as drafter")
    ap.add_argument("--budgets", default="16,64,256")
    ap.add_argument("--n-prompts", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--questions", default=str(default_questions()))
    ap.add_argument("--verify", choices=["oracle", "target"], default="target")
    ap.add_argument("--dense-copies", action="store_true", help="run the copies as their de-quantized weights")
    ap.add_argument("--draft-temperature", type=float, default=1.0, help="Engine(draft_temperature=)")
    ap.add_argument("--refs", default=None, help="JSON file caching the target's greedy continuations")
    ap.add_argument("--json", default=None, help="append each row here as it is measured (JSON lines)")
    return ap.parse_args(argv)


# ---- the target's own greedy continuations --------------------------------------------------------
def references(target: str | None, prompts: list[list[int]], max_new: int, path: str | None) -> list[list[int]]:
    """`target.generate` (greedy) of every prompt, from its whole de-quantized copy; cached in `path`."""
    saved = json.loads(Path(path).read_text()) if path and Path(path).is_file() else {}
    key = lambda ids: f"{target}|{max_new}|{','.join(map(str, ids))}"  # noqa: E731
    missing = [ids for ids in prompts if key(ids) not in saved]
    if missing:
        from edgespec.loading.models import load_model

        model = load_model(target, dtype=torch.float32)
        for ids in missing:
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)
            saved[key(ids)] = out[0, len(ids):].tolist()
        del model
        gc.collect()
        if path:
            Path(path).write_text(json.dumps(saved))
    return [saved[key(ids)] for ids in prompts]


class Oracle:
    """A stand-in for `verify.verify`: the tree is walked against the target's greedy continuation of the
    current prompt (`full`: prompt + continuation). The target cache only grows by placeholders."""

    def __init__(self, vocab: int, eos: int):
        self.vocab, self.eos, self.full = vocab, eos, []

    def __call__(self, model, cache, stem, tree, sampler, history=None) -> Verdict:
        z = torch.zeros(1, 1, stem.numel() + tree.size, 1)
        cache.update(z, z, 0)
        depths, base = tree.depths, len(history)

        def logits_at(node: int) -> torch.Tensor:
            at = base + int(depths[node])
            logits = torch.zeros(self.vocab)
            logits[self.full[at] if at < len(self.full) else self.eos] = 1.0
            return logits

        return walk(tree, logits_at, sampler, base - 1, history)


# ---- one drafter --------------------------------------------------------------------------------
def densify(model) -> None:
    """Every low-bit copy in `model` becomes an nn.Linear holding its de-quantized weight."""
    for mod in list(model.modules()):
        for name, child in list(mod._modules.items()):
            if child is not None and lowbit.is_copy(child):
                codec = {"Int8Copy": "int8", "HQQLinear": "hqq"}.get(type(child).__name__, "nf4")
                w = lowbit.dequantized(child, "hqq2" if codec == "hqq" else codec).float()
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=child.bias is not None)
                lin.weight = torch.nn.Parameter(w.reshape(lin.weight.shape).contiguous(), requires_grad=False)
                if child.bias is not None:
                    lin.bias = torch.nn.Parameter(child.bias.detach().float(), requires_grad=False)
                mod._modules[name] = lin


def rows(name: str, loaded, budgets, prompts, refs, max_new: int, oracle: Oracle | None, sink,
         draft_temperature: float = 1.0) -> list[dict]:
    out = []
    for k in budgets:
        engine = Engine(loaded.target, loaded.drafter, loaded.tokenizer, budget=k, overlap=False,
                        offload=loaded.offload, self_draft=loaded.self_draft, draft_temperature=draft_temperature)
        per_prompt, totals, equal, t0 = [], Totals(), True, time.perf_counter()
        for ids, ref in zip(prompts, refs):
            if oracle is not None:
                oracle.full = ids + ref
            engine.reset()
            res = engine.generate(ids, max_new_tokens=max_new, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0,
                                  repetition_penalty=1.0)
            equal = equal and res.ids == ref
            per_prompt.append(Totals.of([res.stats]).tokens_per_pass)
            totals.add(res.stats)
        row = {"drafter": name, "budget": k, "tokens_per_pass": totals.new_tokens / totals.steps,
               "mean_of_prompts": statistics.fmean(per_prompt), "equal": equal, "tokens": totals.new_tokens,
               "passes": totals.steps, "tree": totals.tree_tokens / totals.steps,
               "depth": totals.tree_depth / totals.steps, "draft_s": totals.draft_time,
               "wall_s": time.perf_counter() - t0, "verify": "oracle" if oracle else "target"}
        print(json.dumps(row), flush=True)
        if sink:
            with open(sink, "a") as f:
                f.write(json.dumps(row) + "\n")
        out.append(row)
    return out


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    budgets = [int(k) for k in args.budgets.split(",")]
    base = LoadConfig(args.target, device="cpu", progress=False)
    layouts = [("self", c.strip(), int(r)) for r in args.resident.split(",") for c in args.codecs.split(",")
               if c.strip()]
    layouts += [("copy", "nf4", 0)] if args.copy else []
    results, prompts, refs, oracle = [], None, None, None
    for kind, codec, resident in layouts:
        drafter = "self" if kind == "self" else (args.target or None)
        config = LoadConfig(**{**vars(base), "drafter": drafter, "draft_quant": codec, "resident_layers": resident})
        t0 = time.perf_counter()
        loaded = load_pair(config) if kind == "self" else _copy_pair(config)
        print(f"# loaded {kind} {codec} resident {resident} in {time.perf_counter() - t0:.1f} s", flush=True)
        if prompts is None:
            questions = read_questions(args.questions)[: args.n_prompts]
            engine = Engine(loaded.target, loaded.drafter, loaded.tokenizer, budget=0)
            prompts = [engine.encode([{"role": "user", "content": q}]) for q in questions]
            refs = references(args.target, prompts, args.max_new_tokens, args.refs)
            if args.verify == "oracle":
                import edgespec.engine.step

                eos = next(iter(engine.eos_ids), 0)
                oracle = Oracle(loaded.target.config.vocab_size, eos)
                edgespec.engine.step.verify = oracle
        if args.dense_copies and kind == "self":
            densify(loaded.drafter)
        name = (f"self {codec}, {resident} resident" if kind == "self" else "full nf4 copy")
        name += f", draft T={args.draft_temperature:g}" if args.draft_temperature != 1.0 else ""
        results += rows(name, loaded, budgets, prompts, refs, args.max_new_tokens, oracle, args.json,
                        args.draft_temperature)
        del loaded
        gc.collect()
    return results


def _copy_pair(config: LoadConfig):
    """The target with its own whole nf4 copy drafting (the drafter edgespec used before the self-drafter)."""
    return load_pair(LoadConfig(**{**vars(config), "drafter": config.target or "embedded"}))


if __name__ == "__main__":
    main()
