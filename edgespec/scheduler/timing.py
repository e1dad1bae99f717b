"""Timing measurements shared by the scheduler's calibration, `edgespec profile` and the scripts: a
target pass over a tree of n tokens, and the drafter building a tree of budget k."""
from __future__ import annotations

import statistics
import time

import torch

from edgespec.base.device import sync
from edgespec.core.forward import cache_kwarg
from edgespec.core.sampling import Sampler
from edgespec.core.search import TreeSearch
from edgespec.core.tree import ancestor_mask


def tree_inputs(tokens: int, past: int, vocab: int, device, seed: int = 0):
    """Random tree of `tokens` nodes under a `past`-token prefix: ids, positions, bool mask (1,1,q,past+q)."""
    gen = torch.Generator().manual_seed(seed + tokens)
    ids = torch.randint(0, vocab, (1, tokens), generator=gen)
    parents = torch.tensor([int(torch.randint(0, i, (1,), generator=gen)) if i else -1 for i in range(tokens)])
    depth = torch.zeros(tokens, dtype=torch.long)
    for i in range(1, tokens):
        depth[i] = depth[parents[i]] + 1
    anc = ancestor_mask(parents, depth)
    mask = torch.cat([torch.ones(tokens, past, dtype=torch.bool), anc], dim=1)[None, None]
    return ids.to(device), (past + depth)[None].to(device), mask.to(device)


@torch.inference_mode()
def time_passes(model, device, sizes, past: int = 128, repeats: int = 1, vocab: int | None = None,
                handle=None) -> list[dict]:
    """Median pass time per tree size (plus the streamer's stats of those passes when offloaded)."""
    from transformers import DynamicCache

    vocab = vocab or model.config.vocab_size
    cache = DynamicCache()
    prefix = torch.randint(0, vocab, (1, past), device=device)
    model(prefix, use_cache=True, **{cache_kwarg(type(model)): cache})
    decoder = model.get_decoder()
    kv = {cache_kwarg(type(decoder)): cache}
    rows = []
    for size in sizes:
        ids, pos, mask = tree_inputs(size, past, vocab, device)
        times, stats = [], []
        for r in range(repeats + 1):  # the first run warms up
            sync(device)
            t0 = time.perf_counter()
            decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kv)
            sync(device)
            cache.crop(past - cache.get_seq_length())  # negative: drop the tree's entries
            if r:
                times.append(time.perf_counter() - t0)
                stats.append(handle.last_pass if handle else None)
        rows.append({"tokens": size, "pass_s": statistics.median(times), "stats": stats})
    return rows


@torch.inference_mode()
def time_drafts(drafter, prefix: list[int], budgets, plan_for, repeats: int = 1,
                draft_temperature: float = 1.0) -> list[dict]:
    """Median seconds for `drafter` (edgespec/core/draft_runner.py) to build a tree of each budget under `prefix`
    (its last token the root), as a step does: feed the root, grow best-first, take the top-`budget`
    tree; with the drafter forwards it took and the tokens they fed. `plan_for(k)` gives the Plan (depth,
    branch, batch). The prefix's drafter cache is filled once, outside the timing; `repeats` 0: one
    untimed-warm-up-free run."""
    device = drafter.device
    cache = drafter.new_cache()
    stem = torch.tensor(prefix)
    drafter.hidden_states(cache, stem[:-1], torch.arange(stem.numel() - 1), None)
    rows = []
    for budget in budgets:
        plan = plan_for(budget)
        times, tree = [], None
        for r in range(repeats + 1):  # the first run warms up (unless it is the only one)
            cache.crop_to(stem.numel() - 1)
            sync(device)
            t0 = time.perf_counter()
            search = TreeSearch.start(drafter, cache, stem[-1:], Sampler(0.0, draft_temperature=draft_temperature),
                                      plan.branch)
            search.grow(plan)
            tree = search.tree(budget)
            sync(device)
            if r or not repeats:
                times.append(time.perf_counter() - t0)
        rows.append({"budget": budget, "draft_s": statistics.median(times), "tree_size": tree.size,
                     "tree_depth": tree.depth, "forwards": search.forwards, "fed": search.fed_tokens})
    cache.crop_to(0)
    return rows
