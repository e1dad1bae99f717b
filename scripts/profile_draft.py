#!/usr/bin/env python
"""DraftRunner speed: one forward of 1/16/64 tokens and one best-first tree build per budget.

    python scripts/profile_draft.py --device cuda --quant nf4,none --forward transformers,lean,static
    python scripts/profile_draft.py --device cpu --quant none --budgets 1,16,64     # any machine

`--forward` picks how the drafter's forwards run (edgespec/core/draft_runner.py): `transformers` (the model's own
forward), `lean` (edgespec's lean forward over transformers' cache), `static` (the lean forward over
preallocated buffers, replayed from CUDA graphs on a GPU; eager on a CPU).

The drafter is SmolLM2-135M-shaped (30 layers, 576 hidden) with random weights (initializer range
0.25, so its distributions are peaked and trees grow deep as with a real model), saved once and
loaded through edgespec's loader, bitsandbytes-quantized where asked. Each forward runs on top of a
199-token KV cache; tree builds time what an engine step's drafting does (`timing.time_drafts`).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgespec.core.draft_runner import DraftRunner  # noqa: E402
from edgespec.base.device import sync  # noqa: E402
from edgespec.scheduler.timing import time_drafts  # noqa: E402
from edgespec.loading.models import load_model  # noqa: E402
from edgespec.base.stats import Plan  # noqa: E402

PREFIX = 200


def random_drafter_folder(layers: int = 30) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      tie_word_embeddings=True, initializer_range=0.25, rope_theta=100000.0)
    torch.manual_seed(0)
    folder = tempfile.mkdtemp(prefix="edgespec-drafter-")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    return folder


@torch.inference_mode()
def forward_ms(draft: DraftRunner, device, prefix: list[int], n: int, repeats: int = 5) -> float:
    cache = draft.new_cache()
    allowed = torch.ones(n, PREFIX - 1 + n, dtype=torch.bool).tril(PREFIX - 1)
    draft.hidden_states(cache, torch.tensor(prefix[:-1]), torch.arange(PREFIX - 1), None)
    times = []
    for _ in range(repeats + 1):  # the first warms up
        sync(device)
        t0 = time.perf_counter()
        draft.hidden_states(cache, torch.tensor(prefix[:n]), torch.arange(PREFIX - 1, PREFIX - 1 + n), allowed)
        sync(device)
        times.append(time.perf_counter() - t0)
        cache.crop_to(PREFIX - 1)
    return statistics.median(times[1:]) * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quant", default="nf4,none", help="comma list of nf4, int8, none")
    ap.add_argument("--budgets", default="1,4,16,64,256,1024")
    ap.add_argument("--layers", type=int, default=30, help="decoder layers (30 = SmolLM2-135M)")
    ap.add_argument("--forward", default="transformers,lean,static", help="comma list of transformers, lean, static")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    folder = random_drafter_folder(args.layers)
    prefix = torch.randint(0, 49152, (PREFIX,), generator=torch.Generator().manual_seed(1)).tolist()
    budgets = [int(b) for b in args.budgets.split(",")]
    for quant in args.quant.split(","):
        model = load_model(folder, quantize=None if quant == "none" else quant, device=args.device, progress=False)
        for how in args.forward.split(","):
            draft = DraftRunner(model, how)
            if how != "transformers" and draft.lean is None:
                print(f"{how}: not available for this model", flush=True)
                continue
            name = f"{'unquantized' if quant == 'none' else quant} {how}"
            for n in (1, 16, 64):
                print(f"{name} drafter forward, {n} tokens: {forward_ms(draft, device, prefix, n):.1f} ms", flush=True)
            for r in time_drafts(draft, prefix, budgets, lambda k: Plan(k, 32, 16, 64), repeats=2):
                print(f"{name} tree build K={r['budget']}: {r['draft_s'] * 1e3:.1f} ms "
                      f"(size {r['tree_size']}, depth {r['tree_depth']})", flush=True)
        del model


if __name__ == "__main__":
    main()
