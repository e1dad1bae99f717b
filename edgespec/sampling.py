"""How the target picks a token at a tree node: argmax, or a sample after temperature and top-p.

Sampling is Gumbel-max with noise that depends only on the seed and the position being sampled: the
token at position i is argmax(log p_i + g_i), with g_i Gumbel noise hashed from (seed, i, token id).
g_i is fresh for every position (independent of the noise that chose the tokens before), so every
token is an exact draw from the target's distribution given the tokens before it: ordinary
ancestral sampling. The point is that the drafter sees the same noise: it proposes the children
argmax(log q + g) and the next best, which the target picks whenever its own perturbed argmax
agrees, for a drafter close to the target nearly as often as in greedy decoding (a coupling, as
speculative sampling's min(1, p/q) rule is for chains, here for whole trees). For a given seed the
output depends only on the target, never on the drafter or the tree.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from edgespec.errors import InvalidArgumentError

if TYPE_CHECKING:
    from edgespec.scores import ScoreCalibration


@dataclass
class Sampler:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    # greedy: tree scores are the drafter's log-probs at this temperature. Below 1 they favour depth
    # over siblings: a drafter close to the target is right more often than its probabilities say,
    # because the target takes its argmax (benchmarks/acceptance_cpu.md, "draft temperature").
    draft_temperature: float = 1.0
    # maps draft log-probs to calibrated log hit rates for tree scores (edgespec/scores.py); None = raw
    calibration: "ScoreCalibration | None" = None

    def __post_init__(self):
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise InvalidArgumentError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidArgumentError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (self.draft_temperature > 0.0):
            raise InvalidArgumentError(f"draft_temperature must be > 0 (1 = the drafter's own probabilities), "
                                       f"got {self.draft_temperature}")
        self.key = self.seed if self.seed is not None else random.SystemRandom().getrandbits(63)
        self._noise: dict[tuple, torch.Tensor] = {}

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution the target samples from: softmax(logits / T), restricted to the top-p nucleus."""
        probs = torch.softmax(logits.float().cpu() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            cum = sorted_p.cumsum(-1)
            drop = cum - sorted_p >= self.top_p  # keep the smallest prefix whose mass reaches top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def pick(self, logits: torch.Tensor, position: int) -> int:
        """The token at sequence `position`, from the 1-D logits that predict it."""
        if self.greedy:
            return int(torch.argmax(logits))
        probs = self.probs(logits)
        return int(torch.argmax(probs.log() + self.noise(position, probs.numel(), probs.device)))

    def draft_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """Drafter scores: log-softmax at the sampling temperature (`draft_temperature` when greedy)."""
        t = self.temperature if not self.greedy else self.draft_temperature
        return torch.log_softmax(logits.float() / t, dim=-1)

    def draft_children(self, logits: torch.Tensor, positions: torch.Tensor, k: int):
        """The drafter's top-`k` proposals (log-scores, tokens) for the tokens at `positions` (n,),
        from `logits` (n, V): by draft probability when greedy; when sampling, by the draft's logits
        perturbed with the target's own noise, scored by the log-softmax of those."""
        logprobs = self.draft_logprobs(logits)
        k = min(k, logprobs.shape[-1])
        if self.greedy:
            return logprobs.topk(k, dim=-1)
        noise = torch.stack([self.noise(int(p), logprobs.shape[-1], logprobs.device) for p in positions])
        perturbed = torch.log_softmax(logprobs + noise, dim=-1)
        return perturbed.topk(k, dim=-1)

    def noise(self, position: int, vocab: int, device) -> torch.Tensor:
        """Gumbel noise (vocab,) for the token at `position` (cached; the drafter and the verifying
        thread may ask at the same time, hence no check-then-read)."""
        key = (position, vocab, str(device))
        noise = self._noise.get(key)
        if noise is None:
            noise = gumbel(self.key, position, vocab, device)
            if len(self._noise) > 4096:
                self._noise.clear()
            self._noise[key] = noise
        return noise


_GOLD, _M1, _M2 = -7046029254386353131, -4658895280553007687, -7723592293110705685  # splitmix64's, as int64


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 on int64 tensors (products wrap mod 2^64 as uint64's do): same bits on any device."""
    x = x + _GOLD
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def gumbel(seed: int, position: int, vocab: int, device="cpu") -> torch.Tensor:
    """Standard Gumbel noise (vocab,) float32: a pure function of (seed, position)."""
    base = _mix(torch.tensor([(seed & (2**62 - 1)) ^ (position * 0x2545F491)], dtype=torch.long, device=device))
    bits = _mix(base ^ (torch.arange(vocab, dtype=torch.long, device=device) * 0x9E3779B1))
    u = (_shr(bits, 11).double() + 0.5) / 2.0**53  # uniform in (0, 1)
    return (-torch.log(-torch.log(u))).float()
