"""The OpenAI HTTP API as edgespec speaks it: request bodies checked into requests (answers: answer.py).

A request is plain JSON (never pickle) checked strictly: wrong types, out-of-range values, unknown
fields and fields edgespec cannot honour (n > 1, tools, logprobs, images, ...) are each an
`ApiError` (HTTP 4xx, an OpenAI-shaped error object naming the field), never a silent ignore.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from edgespec.core.sampling import SAMPLING_FIELDS
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# request fields that become the generation's sampling settings (SamplingConfig's fields; only those a
# request sets are passed, the rest are the server's defaults) and its seed
SAMPLER_FIELDS = (*SAMPLING_FIELDS, "seed")
MAX_STOP = 16


class ApiError(Exception):
    """An HTTP error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- checking (edgespec/front/server/body.py parses the bytes) -----------------------------------
def check(model_cls: type[BaseModel], body: dict) -> BaseModel:
    """Validate a request body; the first problem becomes a 400 naming the field."""
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        path = [str(p) for p in err["loc"]]
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, _Unsupported):
            param = ".".join(path + [cause.field])
            raise ApiError(400, f"{param} is not supported: {cause.why}", param, "unsupported_parameter") from None
        param = ".".join(path) or None
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unrecognized request argument supplied: {param}", param) from None
        if err["type"] == "missing":
            raise ApiError(400, f"{param} is required", param) from None
        msg = str(cause) if isinstance(cause, _Invalid) else err["msg"]
        raise ApiError(400, f"{param}: {msg}" if param else msg, param) from None


class _Invalid(ValueError):
    """A value a validator refuses; its message follows the field's name."""


class _Unsupported(ValueError):
    """A field edgespec cannot honour (named with its path in the error)."""

    def __init__(self, field: str, why: str):
        super().__init__(f"{field} is not supported: {why}")
        self.field, self.why = field, why


# field: (values that leave it off, why it cannot be honoured)
UNSUPPORTED = {
    "n": ((None, 1), "edgespec generates one answer per request; send n=1 or leave it out"),
    "tools": ((None, []), "this server does no tool calling; send the conversation as plain messages"),
    "functions": ((None, []), "this server does no function calling; send plain messages"),
    "tool_choice": ((None, "none", "auto"), "this server does no tool calling"),
    "function_call": ((None, "none", "auto"), "this server does no function calling"),
    "logprobs": ((None, False, 0), "edgespec does not return log-probabilities; leave logprobs out"),
    "top_logprobs": ((None, 0), "edgespec does not return log-probabilities; leave top_logprobs out"),
    "logit_bias": ((None, {}), "edgespec samples from the target's own logits; leave logit_bias out"),
    "presence_penalty": ((None, 0), "use repetition_penalty (an edgespec sampler option) instead"),
    "frequency_penalty": ((None, 0), "use repetition_penalty (an edgespec sampler option) instead"),
    "response_format": ((None, {"type": "text"}), "structured output (JSON mode) is not implemented"),
    "audio": ((None,), "the served models read and write text only"),
    "modalities": ((None, ["text"]), "the served models read and write text only"),
    "prediction": ((None,), "predicted outputs are not implemented (edgespec drafts its own)"),
    "reasoning_effort": ((None,), "the served models have no reasoning-effort control"),
    "web_search_options": ((None,), "this server has no web search"),
    "best_of": ((None, 1), "edgespec generates one answer per request; send best_of=1 or leave it out"),
    "echo": ((None, False), "the prompt is not echoed back; leave echo out"),
    "suffix": ((None, ""), "insertion (suffix) is not implemented"),
}
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")  # no effect on the answer


def _check_unsupported(model: BaseModel) -> None:
    for name in (UNSUPPORTED.keys() & type(model).model_fields.keys()) - type(model).HANDLED:
        value = getattr(model, name)
        off, why = UNSUPPORTED[name]
        if not any(value == o and type(value) is type(o) for o in off):  # (False == 0, but logprobs=0 ...)
            raise _Unsupported(name, why)


# ---- requests --------------------------------------------------------------------------------------
NonNeg = Annotated[float, Field(ge=0, allow_inf_nan=False)]  # (1e400 in JSON reads as inf)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool | None = None  # (OpenAI's padding against length side channels: not needed here)


class _Request(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(strict=True, extra="forbid")
    HANDLED: ClassVar[frozenset] = frozenset()  # UNSUPPORTED fields this endpoint honours (structured.py)
    model: str | None = None  # absent: the served model
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: NonNeg | None = None
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    seed: int | None = None
    stop: Any = Field(None, validate_default=True)  # → list[str]
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    n: Any = None
    logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise _Invalid("must be a string or a list of strings")
        if len(v) > MAX_STOP:
            raise _Invalid(f"takes at most {MAX_STOP} strings, got {len(v)}")
        if any(not s for s in v):
            raise _Invalid("an empty stop string would end every answer at once: remove it")
        return v

    @model_validator(mode="after")
    def _honoured(self):
        _check_unsupported(self)
        return self

    def sampling(self) -> dict:
        """The sampler settings this request sets (SamplingConfig fields, and the seed)."""
        return {k: getattr(self, k) for k in SAMPLER_FIELDS if getattr(self, k) is not None}

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: Any = None
    tool_calls: Any = None
    function_call: Any = None
    tool_call_id: Any = None
    audio: Any = None
    refusal: Any = None
    annotations: Any = None

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise _Invalid("must be a string or a list of text parts")
        return "\n".join(_text_part(i, part) for i, part in enumerate(v))

    @model_validator(mode="after")
    def _plain(self):
        for name in ("function_call", "audio", "refusal", "annotations"):
            if getattr(self, name) not in (None, [], ""):
                raise _Unsupported(name, "send messages with a role, text content and (assistant) tool_calls")
        if self.tool_calls not in (None, []) and self.role != "assistant":
            raise _Invalid("only an assistant message carries tool_calls")
        if self.role == "tool" and not isinstance(self.tool_call_id, str):
            raise _Invalid("a tool message needs the tool_call_id (a string) of the call it answers")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise _Invalid("content is required (a string)")
        return self

    def as_prompt(self) -> dict:
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.content or ""}
        if self.tool_calls:
            out["tool_calls"] = [_call_for_template(i, c) for i, c in enumerate(self.tool_calls)]
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
            if isinstance(self.name, str):
                out["name"] = self.name
        return out


def _call_for_template(i: int, call) -> dict:
    """An OpenAI tool call (arguments as JSON text) as chat templates read it (arguments as an object)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise _Invalid(f"tool_calls[{i}] must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}")
    args = fn.get("arguments", "{}")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        raise _Invalid(f"tool_calls[{i}].function.arguments is not valid JSON") from None
    return {"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}


def _text_part(i: int, part) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str) and set(part) <= {"type", "text"}:
        return part["text"]
    if kind in ("image_url", "input_image", "image", "input_audio", "audio", "file", "video_url"):
        raise _Unsupported(str(i), f"content parts of type {kind!r}: the served models read text only; "
                                   "send text parts or a string")
    raise _Invalid(f'part {i} must be a text part (type "text" with a string "text")')


class ChatRequest(_Request):
    HANDLED: ClassVar[frozenset] = frozenset({"tools", "tool_choice", "logprobs", "top_logprobs", "response_format"})
    messages: list[Message]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    function_call: Any = None
    top_logprobs: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    parallel_tool_calls: Any = None

    @field_validator("messages")
    @classmethod
    def _some(cls, v):
        if not v:
            raise _Invalid("the list is empty: send at least one message")
        return v

    def prompt(self, system: str | None = None) -> list[dict]:
        msgs = [m.as_prompt() for m in self.messages]
        if system and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system})
        return msgs

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: Any
    best_of: Any = None
    echo: Any = None
    suffix: Any = None

    @field_validator("prompt")
    @classmethod
    def _one_text(cls, v):
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
            v = v[0]
        if not isinstance(v, str):
            raise _Invalid("must be a string (one prompt per request)")
        if not v:
            raise _Invalid("the prompt is empty: give some text to continue")
        return v
