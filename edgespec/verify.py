"""Verification: the target scores every tree node in one pass; the longest accepted path is kept.

At each node on the walk the target picks its own next token (argmax, or a sample from its
temperature/top-p distribution, edgespec/sampling.py). If a child of the node carries that token, the child is accepted
and the walk goes on; otherwise the picked token is the step's bonus token. The draft
probabilities play no part, so the committed tokens are exactly what the target alone would have
produced: greedy output is identical, and sampling is ordinary ancestral sampling from the target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edgespec.forward import hidden_states, logits_from_hidden, stem_and_tree_mask
from edgespec.tree import Tree


@dataclass
class Verdict:
    path: list[int]  # accepted draft node indices, root excluded, in order
    tokens: list[int]  # committed tokens: the accepted nodes' tokens, then the bonus token


def verify(model, cache, stem: torch.Tensor, tree: Tree, sampler) -> Verdict:
    """One target pass over the pending `stem` (ending in the root) plus the tree; cache grows by all."""
    past = cache.get_seq_length()
    s = stem.numel()
    root_pos = past + s - 1
    positions = torch.cat([torch.arange(past, past + s), root_pos + tree.depths[1:]])
    allowed = stem_and_tree_mask(past, s, tree.ancestor_mask()) if tree.size else None
    hidden = hidden_states(model, cache, torch.cat([stem, tree.tokens[1:]]), positions, allowed)
    return walk(tree, lambda i: logits_from_hidden(model, hidden[s - 1 + i]), sampler, root_pos)


def walk(tree: Tree, logits_at, sampler, root_pos: int) -> Verdict:
    """Follow the target's picks down the tree (the root at sequence position `root_pos`); logits are
    computed only at the nodes visited."""
    kids = tree.children()
    node, path, tokens = 0, [], []
    while True:
        tok = sampler.pick(logits_at(node), root_pos + len(tokens) + 1)
        child = kids[node].get(tok)
        tokens.append(tok)
        if child is None:
            return Verdict(path, tokens)
        path.append(child)
        node = child
