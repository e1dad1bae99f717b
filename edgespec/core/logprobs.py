"""Log-probabilities of the tokens the target picked, as the OpenAI API returns them (`logprobs`,
`top_logprobs`): read off the target's own logits at each accepted tree node — the verification pass has
them anyway — after the same transforms the pick used (edgespec/core/sampling.py: repetition penalty, the
grammar's mask, then when sampling temperature, top-k, top-p and min-p). So a token's log-probability
is its log-probability under the distribution it was drawn from (greedy: the penalised, masked
softmax at temperature 1), the same numbers plain decoding of the target gives. Tokens a transform
removed have probability 0 and are left out of the top list (JSON has no -infinity).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP = 20  # OpenAI's limit on top_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the most likely tokens with their log-probabilities, best first


def token_logprob(warped: torch.Tensor, token: int, n: int) -> TokenLogprob:
    """From the logits the token was picked from (`warped` (V,), removed tokens at -inf): the log-probability
    of `token` and the `n` (<= MAX_TOP) most likely tokens'."""
    lp = torch.log_softmax(warped.float(), dim=-1)
    top = lp.topk(min(n, lp.numel())) if n > 0 else None
    pairs = () if top is None else tuple((int(t), float(v)) for v, t in zip(top.values, top.indices)
                                         if v > float("-inf"))
    return TokenLogprob(int(token), float(lp[token]), pairs)
