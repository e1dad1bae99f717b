"""The draft runner: a drafting model and how its forwards run, decided once when it is built.

`DraftRunner(model)` picks the forward: edgespec's lean forward for a Llama-family model
(edgespec/core/lean.py), over a preallocated static cache replaying CUDA graphs on a GPU
(edgespec/core/static_kv.py), else transformers' own. `forward` overrides the choice ("transformers",
"lean", "static"; "auto": lean where supported, static on a GPU; DraftConfig.forward reads the
EDGESPEC_LEAN switch). Everything that drafts (the
tree search, the scheduler's start-up timing, the profiles) goes through this object: the model
itself carries no edgespec state.

`vocab` limits proposals to the ids below it (a drafter whose embeddings are padded beyond the
target's); a committed token the drafter has no row for is fed to it as its last row (it only
proposes, so that can never change the output).
"""
from __future__ import annotations

import torch

from edgespec.core.kv import new_cache
from edgespec.base.errors import InvalidArgumentError
from edgespec.base.device import model_device
from edgespec.core.forward import hidden_states, logits_from_hidden, visibility
from edgespec.core.lean import LeanDecoder, supports
from edgespec.core.static_kv import StaticKV

FORWARDS = ("auto", "transformers", "lean", "static")


class DraftRunner:
    def __init__(self, model, forward: str = "auto", vocab: int | None = None):
        if forward not in FORWARDS:
            raise InvalidArgumentError(f"drafter forward must be one of {FORWARDS}, got {forward!r}")
        self.model = model.eval()
        self.vocab = vocab
        self.rows = model.get_input_embeddings().num_embeddings
        self.lean = _lean(model, forward)

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def config(self):
        return self.model.config

    def new_cache(self):
        """The cache its forwards run over: preallocated buffers on the static path, else transformers'."""
        return self.lean.new_cache() if self.lean is not None and self.lean.static else new_cache(self.model)

    def prepare(self, cache) -> None:
        """Capture the CUDA graphs over `cache` now (never during an overlapped target pass)."""
        if self.lean is not None and isinstance(cache, StaticKV) and cache.use_graphs:
            with torch.no_grad():
                cache.capture(self.lean.static_forward)

    def describe(self, cache=None) -> str:
        """"transformers", "lean" or "lean+static"; given its cache, "lean+cuda-graphs" where the forwards
        replay graphs."""
        if self.lean is None:
            return "transformers"
        if isinstance(cache, StaticKV) and cache.use_graphs:
            return "lean+cuda-graphs"
        return "lean+static" if self.lean.static else "lean"

    def hidden_states(self, cache, tokens: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor | None,
                      kv_positions: torch.Tensor | None = None) -> torch.Tensor:
        """`forward.hidden_states`' contract, on this drafter's forward."""
        tokens = tokens.clamp(max=self.rows - 1)
        if self.lean is None:
            return hidden_states(self.model, cache, tokens, positions, allowed, kv_positions)
        return self.lean(cache, tokens, positions, visibility(self.config, cache, positions, allowed, kv_positions))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits over the ids it may propose."""
        return logits_from_hidden(self.model, hidden)[:, : self.vocab]


def _lean(model, forward: str) -> LeanDecoder | None:
    """The lean forward the choice asks for, or None for transformers' (also where unsupported)."""
    if forward == "transformers" or not supports(model):
        return None
    static = forward == "static" or (forward == "auto" and model_device(model).type == "cuda")
    return LeanDecoder(model, static)
