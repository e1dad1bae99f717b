"""edgespec: run LLMs larger than your GPU at interactive speed.

The target model's layers stream from pinned CPU RAM; a small quantized drafter resident on the GPU
builds a large speculative token tree; the target verifies the whole tree in one streamed pass.
Output is lossless: greedy decoding equals the target's own greedy output, sampling keeps its
distribution.
"""
from edgespec.base import VERSION
from edgespec.engine import Engine, Generation
from edgespec.base.errors import (
    BackoffWarning,
    ContextLengthError,
    EdgespecError,
    InvalidArgumentError,
    ModelNotFoundError,
    NonFiniteLogitsError,
    OutOfMemoryError,
    TokenizerMismatchError,
    UnsupportedModelError,
)
from edgespec.base.stats import Plan, RunStats, StepStats

__version__ = VERSION
__all__ = [
    "Engine", "Generation", "Plan", "RunStats", "StepStats", "EdgespecError", "ContextLengthError",
    "InvalidArgumentError", "ModelNotFoundError", "OutOfMemoryError", "TokenizerMismatchError",
    "UnsupportedModelError", "BackoffWarning", "NonFiniteLogitsError",
]
