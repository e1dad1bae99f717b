"""How the target picks a token at a tree node: argmax, or a sample from its processed distribution.

The target's logits at a node go through the same steps, in the same order, as transformers'
`generate`: repetition penalty over every token before the node (the committed sequence and the
node's ancestors; greedy decoding too), then temperature, top-k, top-p and min-p when sampling.
`SamplingConfig` holds those settings; `model_defaults` reads a model's own (its generation_config,
as transformers' generate does) or, for a model that carries none, chat defaults as local chat
tools use (ollama's).

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace

import torch

from edgespec.base import checks, reach
from edgespec.base.errors import InvalidArgumentError
from edgespec.core.grammar import mask_logits

@dataclass(frozen=True)
class SamplingConfig:
    """What the target samples from. temperature 0 = greedy (argmax after the repetition penalty);
    top_k 0, top_p 1, min_p 0 and repetition_penalty 1 switch that step off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    source: str = "explicit"  # where these came from: "explicit", "generation_config", "chat defaults"

    def __post_init__(self):
        check_sampling(self.temperature, self.top_p, self.top_k, self.min_p, self.repetition_penalty)

    def describe(self) -> str:
        """One line for humans: what is in force and where it came from."""
        if self.temperature == 0:
            how = "greedy"
        else:
            parts = [f"temperature {self.temperature:g}"]
            parts += [f"top-k {self.top_k}"] if self.top_k else []
            parts += [f"top-p {self.top_p:g}"] if self.top_p < 1 else []
            parts += [f"min-p {self.min_p:g}"] if self.min_p else []
            how = "sampling at " + ", ".join(parts)
        if self.repetition_penalty != 1.0:
            how += f", repetition penalty {self.repetition_penalty:g}"
        return f"{how} ({self.source})"


def check_sampling(temperature, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0) -> None:
    """Raise InvalidArgumentError naming the first setting out of range or of the wrong kind (a string,
    a bool, inf or nan; edgespec/base/checks.py)."""
    checks.number("temperature", temperature, 0.0, fix=" (0 = greedy)")
    checks.number("top_p", top_p, 0.0, 1.0, lo_open=True)
    checks.integer("top_k", top_k, lo=0, fix=" (0 = off)")
    checks.number("min_p", min_p, 0.0, 1.0, hi_open=True, fix=" (0 = off)")
    checks.number("repetition_penalty", repetition_penalty, 0.0, lo_open=True, fix=" (1 = off)")


# ollama's defaults, for models that say nothing about how to sample them (a GGUF carries no
# generation_config): temperature 0.8, top_k 40, top_p 0.9, repeat penalty 1.1
CHAT_DEFAULTS = SamplingConfig(0.8, 0.9, 40, 0.0, 1.1, source="chat defaults")
GREEDY = SamplingConfig()


def model_defaults(model) -> SamplingConfig:
    """The model's own sampling settings (its generation_config, read as transformers' generate reads
    it), or CHAT_DEFAULTS when it carries none (a config derived from the model config, as a GGUF's)."""
    gen = getattr(model, "generation_config", None)
    if gen is None or reach.derived_generation_config(gen):
        return CHAT_DEFAULTS
    penalty = float(gen.repetition_penalty or 1.0)
    if not gen.do_sample:
        return SamplingConfig(repetition_penalty=penalty, source="generation_config")
    return SamplingConfig(float(gen.temperature if gen.temperature is not None else 1.0),
                          float(gen.top_p if gen.top_p is not None else 1.0), int(gen.top_k or 0),
                          float(gen.min_p or 0.0), penalty, source="generation_config")


SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingConfig) if f.name != "source")  # what a caller may set


def resolve(defaults: SamplingConfig, given: "SamplingConfig | Mapping[str, object] | None" = None) -> SamplingConfig:
    """The settings a generation samples with: `given` as is when it is a SamplingConfig, else `defaults`
    with every setting the mapping `given` holds (a value of None keeps the default's; a name that is not
    a SamplingConfig field is an InvalidArgumentError naming it). An explicit temperature of 0 is plain
    greedy: a chat preset's repetition penalty is part of its sampling and stays out (give
    repetition_penalty to use one in greedy decoding); a model's own generation_config keeps its."""
    if isinstance(given, SamplingConfig):
        return given
    if given is not None and not isinstance(given, Mapping):
        raise InvalidArgumentError(f"sampling must be a SamplingConfig or a mapping of its fields "
                                   f"{list(SAMPLING_FIELDS)}, got {type(given).__name__}")
    given = {k: v for k, v in (given or {}).items() if v is not None}
    if unknown := sorted(set(given) - set(SAMPLING_FIELDS)):
        raise InvalidArgumentError(f"unknown sampling setting {unknown[0]!r}: the settings are {list(SAMPLING_FIELDS)}")
    if not given:
        return defaults
    if given.get("temperature") == 0 and defaults.source == "chat defaults":
        given.setdefault("repetition_penalty", 1.0)
    return replace(defaults, **given, source="explicit" if len(given) == len(SAMPLING_FIELDS)
                   else defaults.source + ", overridden")


@dataclass
class Sampler:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    # greedy: tree scores are the drafter's log-probs at this temperature. Below 1 they favour depth
    # over siblings: a drafter close to the target is right more often than its probabilities say,
    # because the target takes its argmax (benchmarks/acceptance_cpu.md, "draft temperature").
    draft_temperature: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        check_sampling(self.temperature, self.top_p, self.top_k, self.min_p, self.repetition_penalty)
        if not (self.draft_temperature > 0.0):
            raise InvalidArgumentError(f"draft_temperature must be > 0 (1 = the drafter's own probabilities), "
                                       f"got {self.draft_temperature}")
        self.top_k = int(self.top_k)
        self.key = self.seed if self.seed is not None else random.SystemRandom().getrandbits(63)
        self._noise: dict[tuple, torch.Tensor] = {}

    @classmethod
    def of(cls, config: SamplingConfig, seed: int | None = None, **kw) -> "Sampler":
        return cls(config.temperature, config.top_p, seed, top_k=config.top_k, min_p=config.min_p,
                   repetition_penalty=config.repetition_penalty, **kw)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def key_of_setting(self) -> tuple:
        """What distinguishes this sampling setting (the tree-score calibrations are kept per setting)."""
        if self.greedy:
            return ("greedy", self.repetition_penalty)
        return (self.temperature, self.top_p, self.top_k, self.min_p, self.repetition_penalty)

    # ---- the target's distribution -----------------------------------------------------------
    def seen(self, history: Sequence[int] | torch.Tensor, vocab: int) -> torch.Tensor | None:
        """(vocab,) bool: the tokens in `history`, which the repetition penalty applies to (None when off)."""
        if self.repetition_penalty == 1.0:
            return None
        ids = torch.as_tensor(history, dtype=torch.long).reshape(-1)
        mask = torch.zeros(vocab, dtype=torch.bool)
        mask[ids[ids < vocab]] = True
        return mask

    def penalize(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """transformers' repetition penalty: a seen token's logit is divided by the penalty when
        positive, multiplied when negative."""
        if seen is None:
            return logits
        seen = seen.to(logits.device)
        return torch.where(seen, torch.where(logits < 0, logits * self.repetition_penalty,
                                             logits / self.repetition_penalty), logits)

    def warp(self, logits: torch.Tensor, seen: torch.Tensor | None = None,
             allowed: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits (..., V) → the logits the target samples from: penalty, the grammar's mask
        (`allowed` (..., V) bool, edgespec/core/grammar.py; None: no grammar), then (sampling) temperature,
        top-k, top-p and min-p, each removed token at -inf, in transformers' order (a grammar is a
        logits processor there, applied after the penalty and before the sampling steps)."""
        logits = mask_logits(self.penalize(logits.float(), seen), allowed)
        if self.greedy:
            return logits
        logits = logits / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_p, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p >= self.top_p  # keep the smallest prefix reaching top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
        if self.min_p > 0.0:
            probs = torch.softmax(logits, dim=-1)
            logits = logits.masked_fill(probs < self.min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
        return logits

    def probs(self, logits: torch.Tensor, seen: torch.Tensor | None = None,
              allowed: torch.Tensor | None = None) -> torch.Tensor:
        """The distribution the target samples from (sampling only)."""
        return torch.softmax(self.warp(logits.cpu(), seen, allowed), dim=-1)

    def pick(self, logits: torch.Tensor, position: int, seen: torch.Tensor | None = None,
             allowed: torch.Tensor | None = None) -> int:
        """The token at sequence `position`, from the 1-D logits that predict it; `seen` marks the
        tokens before it (for the repetition penalty), `allowed` the tokens the grammar allows there."""
        return self.pick_warped(self.warp(logits.cpu() if not self.greedy else logits, seen, allowed), position)

    def pick_warped(self, warped: torch.Tensor, position: int) -> int:
        """The token at `position` from logits `warp` already transformed."""
        if self.greedy:
            return int(torch.argmax(warped))
        probs = torch.softmax(warped, dim=-1)
        return int(torch.argmax(probs.log() + self.noise(position, probs.numel(), probs.device)))

    # ---- the drafter's proposals -------------------------------------------------------------
    def draft_logprobs(self, logits: torch.Tensor, seen: torch.Tensor | None = None,
                       allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Drafter scores: log-softmax of the drafter's penalised (and grammar-masked) logits at the
        sampling temperature (`draft_temperature` when greedy). No top-k / top-p / min-p cut: the
        drafter's cut is not the target's, and a token outside the drafter's may still be the target's
        pick. A row the grammar closes entirely scores -inf everywhere."""
        t = self.temperature if not self.greedy else self.draft_temperature
        return _log_softmax(mask_logits(self.penalize(logits.float(), seen), allowed) / t, allowed is not None)

    def draft_children(self, logits: torch.Tensor, positions: torch.Tensor, k: int,
                       seen: torch.Tensor | None = None, allowed: torch.Tensor | None = None):
        """The drafter's top-`k` proposals (log-scores, tokens) for the tokens at `positions` (n,),
        from `logits` (n, V) (`seen` (n, V): the tokens before each, for the repetition penalty;
        `allowed` (n, V): what the grammar allows there, so only those are proposed): by draft
        probability when greedy; when sampling, by the draft's logits perturbed with the target's own
        noise, scored by the log-softmax of those."""
        logprobs = self.draft_logprobs(logits, seen, allowed)
        k = min(k, logprobs.shape[-1])
        if self.greedy:
            return logprobs.topk(k, dim=-1)
        noise = torch.stack([self.noise(int(p), logprobs.shape[-1], logprobs.device) for p in positions])
        perturbed = _log_softmax(logprobs + noise, allowed is not None)
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


def _log_softmax(x: torch.Tensor, masked: bool) -> torch.Tensor:
    """log_softmax over the last dimension; when `masked`, a row of -inf (a grammar allowing nothing
    there) stays -inf rather than NaN."""
    out = torch.log_softmax(x, dim=-1)
    return out.nan_to_num(nan=float("-inf"), neginf=float("-inf")) if masked else out


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
