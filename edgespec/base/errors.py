"""Errors edgespec raises: each names the problem and the fix."""


class EdgespecError(Exception):
    """Base class: every user-facing failure is one of these."""


class ModelNotFoundError(EdgespecError):
    """A model path, GGUF file or hub id could not be loaded."""


class TokenizerMismatchError(EdgespecError):
    """Target and drafter do not share a vocabulary."""


class UnsupportedModelError(EdgespecError):
    """The architecture cannot be offloaded or verified with a tree mask."""


class ContextLengthError(EdgespecError):
    """The prompt (or prompt + generation) does not fit the context window."""


class InvalidArgumentError(EdgespecError, ValueError):
    """A generation or scheduling argument is out of range or of the wrong kind; `argument` names it (None
    when no single argument is to blame), as the message does."""

    def __init__(self, message: str, argument: str | None = None):
        super().__init__(message)
        self.argument = argument


class InvalidPromptError(InvalidArgumentError):
    """A prompt that is not a string, a list of chat messages or a list of token ids in the vocabulary."""


class OutOfMemoryError(EdgespecError):
    """Device memory ran out and backing off did not help."""


class NonFiniteLogitsError(EdgespecError):
    """A model's logits came out NaN or infinite: a corrupt model file, or activations that overflow
    in float16. The answer stops there (it would otherwise be token 0 over and over)."""

    def __init__(self, model: str, position: int):
        super().__init__(
            f"the {model}'s logits are not finite (NaN or infinity) at position {position}: its model file is "
            "probably corrupt (download or convert it again), or its activations overflow in float16 (load it "
            "in bfloat16 or float32); the answer stops here")
        self.model, self.position = model, position


class BackoffWarning(UserWarning):
    """Device memory ran out during a step; edgespec shrank the plan and retried it."""


class GrammarError(InvalidArgumentError):
    """A grammar constraint (JSON schema, regex, Lark grammar, tools) that cannot be compiled or used."""


class StageFailedError(EdgespecError):
    """A stage of a target split across machines died, stopped answering or refused to serve; `stage`
    is its rank (None when it is not known). The conversation on stage 0 is kept."""

    def __init__(self, message: str, stage: int | None = None):
        super().__init__(message)
        self.stage = stage
