"""The OpenAI API's answer objects for one request: a whole chat.completion / text_completion, or its
stream chunks (chat.completion.chunk), with one id and creation time, finish reasons and usage."""
from __future__ import annotations

import time
import uuid

# the engine's stop reasons as OpenAI finish reasons (the context window ending an answer is "length")
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "stop",
          "tool_calls": "tool_calls"}


class Answer:
    """Builds one request's answer objects (whole, or as stream chunks) with one id and time."""

    def __init__(self, chat: bool, model: str, include_usage: bool = False):
        self.chat, self.model, self.include_usage = chat, model, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, stream: bool) -> dict:
        obj = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str | None, stop_reason: str, prompt_tokens: int, completion_tokens: int,
              tool_calls: list | None = None, logprobs: list | None = None) -> dict:
        finish = FINISH.get(stop_reason, "stop")
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if self.chat
                  else {"index": 0, "text": text})
        if tool_calls:
            choice["message"]["tool_calls"] = tool_calls
        choice.update(logprobs=None if logprobs is None else {"content": logprobs}, finish_reason=finish)
        return {**self._head(False), "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None = None, stop_reason: str | None = None, role: bool = False,
              tool_calls: list | None = None, logprobs: list | None = None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            if tool_calls:  # each call whole in one delta, indexed as the openai client accumulates them
                delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(tool_calls)]
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice.update(logprobs=None if logprobs is None else {"content": logprobs},
                      finish_reason=FINISH.get(stop_reason, "stop") if stop_reason else None)
        out = {**self._head(True), "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self._head(True), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
