"""How the target picks a token at a tree node: argmax, or a sample after temperature and top-p."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from edgespec.errors import InvalidArgumentError


@dataclass
class Sampler:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise InvalidArgumentError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidArgumentError(f"top_p must be in (0, 1], got {self.top_p}")
        self.generator = torch.Generator()
        self.generator.manual_seed(self.seed if self.seed is not None else random.SystemRandom().getrandbits(63))

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

    def pick(self, logits: torch.Tensor) -> int:
        """One token for a 1-D logits vector."""
        if self.greedy:
            return int(torch.argmax(logits))
        return int(torch.multinomial(self.probs(logits), 1, generator=self.generator))

    def draft_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """Drafter scores: log-softmax at the sampling temperature (1 when greedy)."""
        t = self.temperature if not self.greedy else 1.0
        return torch.log_softmax(logits.float() / t, dim=-1)
