"""What the front ends (edgespec/front: cli, chat, bench, profile, server) may read from an engine: the
`FrontEnd` protocol, typed. `Engine` satisfies it (tests/test_imports.py checks that it does and that the
front ends reach nothing else); a front end never probes an engine with getattr.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from edgespec.base.clock import Clock
    from edgespec.base.config import DraftConfig
    from edgespec.core.draft_runner import DraftRunner
    from edgespec.core.sampling import SamplingConfig
    from edgespec.engine.run import Generation, Run
    from edgespec.offload import OffloadHandle
    from edgespec.scheduler import Scheduler


@runtime_checkable
class FrontEnd(Protocol):
    # the models and how they run
    target: Any  # the target model (a transformers model), streamed when `offload` is set
    drafter: Any  # the drafting model as given (the target's own self-drafter, or a separate model)
    draft_runner: "DraftRunner"  # runs the drafter's forwards (its forward choice: `drafter_forward()`)
    tokenizer: Any
    device: Any  # torch.device of the target's compute
    offload: "OffloadHandle | None"  # the target's streaming handle (None: not offloaded)
    self_draft: Any  # loading.self_drafter.SelfDraft when the target drafts for itself, else None
    verifier: Any  # the TreeVerifier when it is not the target model (a target split across stages), else None
    scheduler: "Scheduler"
    clock: "Clock"  # whose seconds the steps and runs record (edgespec/base/clock.py)
    warmup_seconds: float  # graph capture and the scheduler's calibration, paid before the first answer
    config: "DraftConfig"
    # what a generation runs with
    sampling: "SamplingConfig"  # the defaults a generation's sampling settings fall back to
    max_context: int
    eos_ids: frozenset

    def run(self, prompt, max_new_tokens: int = 256, *, stop=None, seed=None, sampling=None, grammar=None,
            logprobs=None, **settings) -> "Run": ...

    def generate(self, prompt, max_new_tokens: int = 256, **options) -> "Generation": ...

    def stream(self, prompt, max_new_tokens: int = 256, **options) -> Iterator[str]: ...

    def sampling_for(self, sampling: "SamplingConfig | Mapping | None" = None, **settings) -> "SamplingConfig": ...

    def encode(self, prompt) -> list[int]: ...

    def reset(self) -> None: ...

    def drafter_forward(self) -> str: ...

    def constraint(self, grammar) -> Any: ...  # a grammar compiled for this engine (core.grammar.Constraint)
