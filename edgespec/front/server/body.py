"""A request body, read and parsed with limits: its size (413), UTF-8 (400), JSON (400), how deeply it
nests (400, checked before parsing: a 100k-deep body never reaches the parser's recursion), and its
strings (a lone surrogate such as "\\ud800", which JSON can carry but no tokenizer can encode, is a
400 naming the field where it sits).
"""
from __future__ import annotations

import json
import re

from fastapi import Request

from edgespec.front.server.protocol import ApiError

MAX_DEPTH = 64  # nested arrays/objects in a request (a chat request needs about 6)
_STRING = re.compile(rb'"(?:[^"\\]+|\\.)*"', re.DOTALL)
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")  # every byte but brackets (deleted by translate)
_SURROGATE = re.compile("[\ud800-\udfff]")


async def read(request: Request, limit: int) -> bytes:
    """The body, or a 413 as soon as it passes `limit` bytes."""
    size = request.headers.get("content-length", "")
    too_big = ApiError(413, f"the request body is over the server's limit of {limit} bytes: send a shorter "
                            "prompt (or start the server with a larger --max-body-mb)", code="body_too_large")
    if size.isdigit() and int(size) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def parse_body(raw: bytes) -> dict:
    """Bytes → a JSON object, or an ApiError saying what is wrong with them."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (bad byte at offset {e.start}): "
                            "send JSON encoded as UTF-8") from None
    if too_deep(raw):
        raise ApiError(400, f"the request body nests arrays/objects more than {MAX_DEPTH} deep: send a "
                            "shallower JSON object", code="too_deep")
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"malformed JSON in the request body: {e.msg} at line {e.lineno} "
                            f"column {e.colno}") from None
    except RecursionError:  # (nesting() counts every bracket outside strings, so this should not happen)
        raise ApiError(400, f"the request body nests too deeply: at most {MAX_DEPTH} levels", code="too_deep") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(obj).__name__}")
    if "\\u" in text:  # (only an escape can carry a lone surrogate into valid UTF-8)
        lone_surrogates(obj)
    return obj


def too_deep(raw: bytes) -> bool:
    """Whether the JSON text's arrays and objects nest more than MAX_DEPTH deep (brackets inside strings
    not counted), found in C-speed passes that each drop the innermost pairs; an unbalanced text stops
    where no pass helps (the parser then says what is wrong with it)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return False
    brackets = _STRING.sub(b"", raw).translate(None, _BRACKETS).replace(b"{", b"[").replace(b"}", b"]")
    if b"[" * (MAX_DEPTH + 1) in brackets:
        return True
    for _ in range(MAX_DEPTH):
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            return False
        brackets = shorter
    return b"[" in brackets


def lone_surrogates(obj, path: str = "") -> None:
    """A 400 naming the first string (value or key) holding half of a UTF-16 surrogate pair."""
    stack = [(obj, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                param = where or None
                raise ApiError(400, f"{where or 'the body'}: the text holds a lone surrogate "
                                    f"({_SURROGATE.search(item).group()!r}, half of a UTF-16 pair): send the whole "
                                    "character, or valid UTF-8", param)
        elif isinstance(item, dict):
            for k, v in item.items():
                stack.append((k, where))
                stack.append((v, f"{where}.{k}" if where else str(k)))
        elif isinstance(item, list):
            stack.extend((v, f"{where}.{i}") for i, v in enumerate(item))


def _no_constant(name: str):
    raise ApiError(400, f"malformed JSON in the request body: {name} is not a JSON number")
