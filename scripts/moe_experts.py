"""How many of an MoE layer's experts one target pass over a token tree touches.

    python scripts/moe_experts.py --out benchmarks/moe_experts.md

A streamed MoE layer costs its full bytes whatever the tree (edgespec streams whole layers), so
this says how much of that a tree actually uses. For each pass size K (the root plus K - 1 draft
nodes; K = 1 is plain decoding) the script drafts a best-first tree with edgespec's TreeSearch
(drafter: the embedded SmolLM2-135M in fp32, on MT-Bench first turns, so the trees carry real text
tokens; `--drafter tiny` drafts with a noisy copy of the MoE instead), runs one verification pass of
tiny random MoE targets built like Mixtral-8x7B (8 experts, top-2), gpt-oss-120b (128, top-4) and
Qwen3-30B-A3B (128, top-8), and counts, per layer, the distinct experts the router picks for the
pass's K tokens (forward hooks on the routers). It prints the mean fraction over prompts and layers
(and the range over layers) next to what independent routing gives, 1 - (1 - k/E)^K, and that
formula for the real models.

A random tiny model's router is not a trained one: its picks follow the token embeddings more than
context, and trained routers are more correlated across related tokens (which lowers the fraction),
so the measured rows show the effect of real tree shapes and token repetition, not real routing.
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

from edgespec.core.kv import new_cache  # noqa: E402
from edgespec.core.search import TreeSearch  # noqa: E402
from edgespec.core.draft_runner import DraftRunner  # noqa: E402
from edgespec.core.forward import hidden_states  # noqa: E402
from edgespec.core.sampling import Sampler  # noqa: E402
from edgespec.base.stats import Plan  # noqa: E402
from edgespec.core.tree import Tree  # noqa: E402
from edgespec.core.verify import verify  # noqa: E402

# name, real model it mimics, family, experts, top-k
SHAPES = [("mixtral-like", "Mixtral-8x7B", "mixtral", 8, 2),
          ("gpt-oss-like", "gpt-oss-120b", "gpt_oss", 128, 4),
          ("qwen3-moe-like", "Qwen3-30B-A3B", "qwen3_moe", 128, 8)]
PAPER = [("Mixtral-8x7B", 8, 2), ("gpt-oss-20b", 32, 4), ("gpt-oss-120b", 128, 4), ("Qwen3-30B-A3B", 128, 8)]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,16,64,256,1024", help="tokens per verification pass (root included)")
    ap.add_argument("--n-prompts", type=int, default=5)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of each tiny MoE")
    ap.add_argument("--drafter", choices=["embedded", "tiny"], default="embedded")
    ap.add_argument("--out", help="write the markdown table here too")
    return ap.parse_args(argv)


def independent(experts: int, top_k: int, tokens: int) -> float:
    """Expected fraction of experts touched by `tokens` tokens each routed to `top_k` of `experts`
    uniformly and independently (per token, the k picks are distinct)."""
    return 1.0 - (1.0 - top_k / experts) ** tokens


def tiny_moe(family: str, experts: int, top_k: int, vocab: int, layers: int, seed: int = 0):
    import transformers

    names = {"mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": experts}),
             "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", {"num_local_experts": experts, "sliding_window": 4096,
                                                              "rope_parameters": {"rope_type": "default",
                                                                                  "rope_theta": 150000.0}}),
             "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts": experts,
                                                                      "moe_intermediate_size": 32})}
    cfg_name, model_name, extra = names[family]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts_per_tok=top_k, max_position_embeddings=4096,
        eos_token_id=None, bos_token_id=None, pad_token_id=None, **extra)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(cfg).eval()


class RouterLog:
    """Forward hooks on every router: the expert indices it picked, per layer, for the last pass."""

    def __init__(self, model):
        self.picks: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if type(m).__name__.endswith("TopKRouter")]
        assert self.handles, "no router found"

    def _hook(self, module, inputs, output):
        self.picks.append(output[2].detach().reshape(-1, output[2].shape[-1]).cpu())

    def touched(self, experts: int, last: int) -> list[float]:
        """Fraction of experts each layer's router picked for the pass's last `last` token rows."""
        return [picks[-last:].unique().numel() / experts for picks in self.picks]


def draft_trees(drafter, prompts: list[list[int]], sizes: list[int]) -> list[list[Tree]]:
    """For each prompt, one best-first tree per pass size (budget K - 1 draft nodes under the root)."""
    out, draft = [], DraftRunner(drafter)
    with torch.no_grad():
        for ids in prompts:
            trees = []
            for k in sizes:
                if k == 1:
                    trees.append(Tree.root_only(ids[-1]))
                    continue
                search = TreeSearch.start(draft, draft.new_cache(), torch.tensor(ids), Sampler(), branch=8)
                search.grow(Plan(k - 1, 32, 8, 64))
                tree = search.tree(k - 1)
                assert tree.size == k - 1, (tree.size, k)
                trees.append(tree)
            out.append(trees)
    return out


def measure(target, experts: int, prompts, trees, sizes) -> dict[int, list[list[float]]]:
    """Per pass size: for each prompt, the touched fraction per layer."""
    log = RouterLog(target)
    rows: dict[int, list[list[float]]] = {k: [] for k in sizes}
    with torch.no_grad():
        for ids, per_size in zip(prompts, trees):
            cache = new_cache(target)
            hidden_states(target, cache, torch.tensor(ids[:-1]), torch.arange(len(ids) - 1), None)
            for k, tree in zip(sizes, per_size):
                log.picks = []
                verify(target, cache, torch.tensor(ids[-1:]), tree, Sampler())
                rows[k].append(log.touched(experts, k))
                cache.crop_to(len(ids) - 1)
    return rows


def load_prompts(args):
    from edgespec.loading.models import load_model, load_tokenizer

    path = ROOT / "tests" / "data" / "mt_bench_first5.jsonl"
    turns = [json.loads(line)["turns"][0] for line in path.read_text().splitlines() if line.strip()]
    if args.drafter == "tiny":
        gen = torch.Generator().manual_seed(0)
        return None, [torch.randint(0, 256, (32,), generator=gen).tolist() for _ in range(args.n_prompts)], 256
    tok = load_tokenizer(None, progress=False)
    prompts = []
    for text in turns[: args.n_prompts]:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        prompts.append(ids["input_ids"] if not isinstance(ids, list) else ids)
    return load_model(None, progress=False), prompts, len(tok)


def main(argv=None, drafter=None, prompts=None, vocab=None) -> list[dict]:
    args = parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if prompts is None:
        drafter, prompts, vocab = load_prompts(args)
    shared = draft_trees(drafter, prompts, sizes) if drafter is not None else None
    results = []
    for name, real, family, experts, top_k in SHAPES:
        target = tiny_moe(family, experts, top_k, vocab, args.layers)
        if shared is None:
            from tests.conftest import noisy_copy

            trees = draft_trees(noisy_copy(target, scale=0.01), prompts, sizes)
        rows = measure(target, experts, prompts, shared or trees, sizes)
        for k in sizes:
            layer_means = [statistics.mean(col) for col in zip(*rows[k])]
            results.append({"model": name, "mimics": real, "experts": experts, "top_k": top_k, "tokens": k,
                            "measured": statistics.mean(layer_means), "layer_min": min(layer_means),
                            "layer_max": max(layer_means), "independent": independent(experts, top_k, k)})
    text = report(results, sizes, args, len(prompts))
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return results


def report(results: list[dict], sizes: list[int], args, n_prompts: int) -> str:
    head = "| model | E | top-k | " + " | ".join(f"K={k}" for k in sizes) + " |"
    rule = "|---|---|---|" + "---|" * len(sizes)
    lines = [f"Measured on tiny random MoE targets ({args.layers} layers, hidden 64), trees drafted by "
             f"{'the embedded SmolLM2-135M on MT-Bench first turns' if args.drafter == 'embedded' else 'a noisy copy'} "
             f"({n_prompts} prompts): mean fraction of a layer's experts the pass's K tokens touch "
             "[range over layers] / independent routing 1-(1-k/E)^K.", "", head, rule]
    for name in dict.fromkeys(r["model"] for r in results):
        rs = [r for r in results if r["model"] == name]
        cells = [f"{r['measured']:.2f} [{r['layer_min']:.2f}-{r['layer_max']:.2f}] / {r['independent']:.2f}" for r in rs]
        lines.append(f"| {name} (as {rs[0]['mimics']}) | {rs[0]['experts']} | {rs[0]['top_k']} | " + " | ".join(cells) + " |")
    lines += ["", "On paper (independent routing, 1-(1-k/E)^K):", "", head, rule]
    for real, experts, top_k in PAPER:
        lines.append(f"| {real} | {experts} | {top_k} | " + " | ".join(f"{independent(experts, top_k, k):.3f}"
                                                                         for k in sizes) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
