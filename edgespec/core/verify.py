"""Verification: the target scores every tree node in one pass; the longest accepted path is kept.

At each node on the walk the target picks its own next token (argmax, or a sample from its
processed distribution, edgespec/core/sampling.py), with that node's own context: the committed tokens
and the node's ancestors (which the repetition penalty looks at). If a child of the node carries that token, the child is accepted
and the walk goes on; otherwise the picked token is the step's bonus token. The draft
probabilities play no part, so the committed tokens are exactly what the target alone would have
produced: greedy output is identical, and sampling is ordinary ancestral sampling from the target.
Under a grammar each visited node's pick sees that node's grammar state (the root's, advanced by the
accepted tokens), and the log-probabilities asked for are read off the same transformed logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edgespec.core.forward import hidden_states, logits_from_hidden, stem_and_tree_mask
from edgespec.core.grammar import GrammarState
from edgespec.core.logprobs import TokenLogprob, token_logprob
from edgespec.core.tree import Tree
from edgespec.base.errors import NonFiniteLogitsError


@dataclass
class Verdict:
    path: list[int]  # accepted draft node indices, root excluded, in order
    tokens: list[int]  # committed tokens: the accepted nodes' tokens, then the bonus token
    grammar: GrammarState | None = None  # the grammar state after `tokens` (None: no grammar)
    logprobs: list[TokenLogprob] | None = None  # one per token, when asked for


class TreeVerifier:
    """A target that runs the verification pass its own way: split across machines
    (edgespec/distributed/target.py), its cache a kv.KVSurgery. `verify` hands it the whole pass."""

    def verify_tree(self, cache, stem: torch.Tensor, tree: Tree, sampler, history=None,
                    grammar: GrammarState | None = None, logprobs: int | None = None) -> Verdict:
        raise NotImplementedError


def verify(model, cache, stem: torch.Tensor, tree: Tree, sampler, history=None, grammar: GrammarState | None = None,
           logprobs: int | None = None) -> Verdict:
    """One target pass over the pending `stem` (ending in the root) plus the tree; cache grows by all.
    `history`: the committed tokens, root included (needed when the sampler penalises repetition);
    `grammar`: the grammar state after the root; `logprobs`: how many top alternatives each token's
    log-probability comes with (None: no log-probabilities)."""
    if isinstance(model, TreeVerifier):
        return model.verify_tree(cache, stem, tree, sampler, history, grammar, logprobs)
    past = cache.get_seq_length()
    s = stem.numel()
    positions, allowed = pass_inputs(past, s, tree)
    hidden = hidden_states(model, cache, torch.cat([stem, tree.tokens[1:]]), positions, allowed)
    return walk(tree, lambda i: logits_from_hidden(model, hidden[s - 1 + i]), sampler, past + s - 1, history,
                grammar, logprobs)


def pass_inputs(past: int, stem: int, tree: Tree) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(positions, visibility) of a pass over `stem` pending tokens (ending in the root) plus the tree's
    nodes, on a cache of `past` entries (visibility None: plain causal, no tree)."""
    root_pos = past + stem - 1
    positions = torch.cat([torch.arange(past, past + stem), root_pos + tree.depths[1:]])
    allowed = stem_and_tree_mask(past, stem, tree.ancestor_mask()) if tree.size else None
    return positions, allowed


def walk(tree: Tree, logits_at, sampler, root_pos: int, history=None, grammar: GrammarState | None = None,
         logprobs: int | None = None) -> Verdict:
    """Follow the target's picks down the tree (the root at sequence position `root_pos`); logits are
    computed only at the nodes visited. `history` (the committed tokens, root included), the grammar
    state after the root and the accepted nodes so far are each pick's context."""
    kids = tree.children()
    node, path, tokens, seen = 0, [], [], None
    state = grammar.fork() if grammar is not None else None
    lps = [] if logprobs is not None else None
    while True:
        logits = logits_at(node)
        if node == 0 and not bool(torch.isfinite(logits).all()):  # once a pass: a corrupt file, an fp16 overflow
            raise NonFiniteLogitsError("target", root_pos)
        if seen is None and history is not None:
            seen = sampler.seen(history, logits.shape[-1])
        warped = sampler.warp(logits if sampler.greedy else logits.cpu(), seen,
                              state.allowed() if state is not None else None)
        tok = sampler.pick_warped(warped, root_pos + len(tokens) + 1)
        if lps is not None:
            lps.append(token_logprob(warped, tok, logprobs))
        if state is not None:
            state.advance(tok)
        child = kids[node].get(tok)
        tokens.append(tok)
        if child is None:
            return Verdict(path, tokens, state, lps)
        if seen is not None:
            seen[tok] = True  # the accepted token is in the next node's context
        path.append(child)
        node = child
