"""Arguments checked once, the same way for the Python API, the command line and the HTTP server.

Each check returns the value in the form the engine uses, or raises an InvalidArgumentError (a
subclass for prompts) whose message names the argument, what was given and the fix, and whose
`argument` attribute names the argument. Integers are integers (a bool or 2.5 is refused, not
rounded), numbers are finite real numbers (a string, inf or nan is refused), a stop string is one
string (never iterated as letters), and a prompt is text, chat messages or token ids in the vocabulary.
"""
from __future__ import annotations

import math
import numbers
import operator

from edgespec.base.errors import InvalidArgumentError, InvalidPromptError

ROLES = ("system", "user", "assistant", "tool")  # the roles a chat template reads
MAX_STOP = 16  # stop strings per generation


def integer(name: str, value, lo: int | None = None, hi: int | None = None, fix: str = "") -> int:
    """`value` as an int, refused unless it is an integer (a bool is not) within [lo, hi]."""
    if isinstance(value, bool) or isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        value_ok = False
    else:
        try:
            value, value_ok = operator.index(value), True
        except TypeError:
            value_ok = False
    if not value_ok or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InvalidArgumentError(f"{name} must be an integer{_range(lo, hi)}{fix}, got {value!r}", name)
    return value


def number(name: str, value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, fix: str = "") -> float:
    """`value` as a float, refused unless it is a finite real number (not a bool) in the range: [lo, hi],
    or open at the ends marked so."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        span = f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}" if lo is not None and hi is not None \
            else f" {'>' if lo_open else '>='} {lo:g}" if lo is not None else ""
        raise InvalidArgumentError(f"{name} must be a finite number{span}{fix}, got {value!r}", name)
    return float(value)


def _range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f" from {lo} to {hi}"
    return f" >= {lo}" if lo is not None else f" <= {hi}" if hi is not None else ""


def seed(value) -> int | None:
    """None (a fresh random seed) or an integer."""
    return None if value is None else integer("seed", value, fix=" (the same seed gives the same answer)")


def max_new_tokens(value, default: int | None = None) -> int:
    """The tokens to generate: an integer >= 1; None means `default` (0 is refused everywhere: it never
    means 'the default' or 'no limit')."""
    if value is None and default is not None:
        return default
    return integer("max_new_tokens", value, lo=1, fix=" (leave it out for the default)")


def stop_strings(value) -> list[str]:
    """None → []; one string → [it] (the whole string stops the answer, never each of its letters); a list
    or tuple of non-empty strings → a list."""
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise InvalidArgumentError(f"stop must be a string or a list of strings, got {value!r}", "stop")
    if len(stops) > MAX_STOP:
        raise InvalidArgumentError(f"stop takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise InvalidArgumentError("stop: an empty stop string would end every answer at once: remove it", "stop")
    for s in stops:
        text(s, "stop")
    return list(stops)


def text(value: str, name: str, argument: str | None = None) -> str:
    """A string the tokenizer can encode: UTF-8 text without lone surrogates (as "\\ud800" in JSON); `name`
    says where it sits, `argument` (default: `name`) the argument it belongs to."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidPromptError(f"{name} is not valid text: {value[e.start]!r} at character {e.start} is a lone "
                                 "surrogate (half of a UTF-16 pair): send the whole character", argument or name) from None
    return value


def messages(value: list, name: str = "prompt") -> list[dict]:
    """Chat messages: dicts with a role in ROLES and string content (an assistant message with tool_calls
    may leave content out: it is read as "")."""
    out = []
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise InvalidPromptError(f"{where} must be a message {{'role': ..., 'content': ...}}, got {m!r}", name)
        if m.get("role") not in ROLES:
            raise InvalidPromptError(f"{where}['role'] must be one of {', '.join(ROLES)}, got {m.get('role')!r}", name)
        content = m.get("content")
        if content is None and m["role"] == "assistant" and m.get("tool_calls"):
            m = {**m, "content": ""}
        elif not isinstance(content, str):
            raise InvalidPromptError(f"{where}['content'] must be a string (the message's text), got {content!r}"
                                     if "content" in m else f"{where} has no 'content': give the message's text "
                                     "as a string", name)
        text(m["content"], f"{where}['content']", name)
        out.append(m)
    return out


def token_ids(value, vocab: int | None, name: str = "prompt") -> list[int]:
    """Token ids: integers (not bools or floats) in [0, vocab)."""
    ids = []
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise InvalidPromptError(f"{name}[{i}] must be an integer token id, got {t!r}: give text, chat "
                                     "messages or a list of ints", name)
        if t < 0 or (vocab is not None and t >= vocab):
            raise InvalidPromptError(f"{name}[{i}] = {t} is not a token id of this model: ids are in "
                                     f"[0, {vocab})", name)
        ids.append(int(t))
    return ids


def prompt_kind(value) -> str:
    """"text", "messages" or "ids" for a list/str prompt (a tensor is "ids"), else InvalidPromptError."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(m, dict) for m in value):
            return "messages"
        if any(isinstance(m, dict) for m in value):
            raise InvalidPromptError("prompt mixes chat messages and other items: give a list of messages "
                                     "{'role', 'content'}, or token ids, not both", "prompt")
        return "ids"
    if hasattr(value, "dtype") and hasattr(value, "tolist"):  # a torch tensor or numpy array of ids
        if getattr(value.dtype, "is_floating_point", False) or str(value.dtype).startswith(("float", "torch.float")):
            raise InvalidPromptError(f"prompt: a tensor of token ids must hold integers, got {value.dtype}", "prompt")
        return "ids"
    raise InvalidPromptError(f"prompt must be a string, a list of chat messages {{'role', 'content'}} or a list of "
                             f"token ids, got {type(value).__name__}", "prompt")
