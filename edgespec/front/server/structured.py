"""Structured output over the OpenAI API: `response_format`, `tools` + `tool_choice`, and log-probabilities.

`response_format` {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}
becomes a grammar (edgespec/core/grammar.py) the answer follows exactly. `tools` are rendered by the
model's own chat template (`apply_chat_template(tools=...)`), and a tool call is generated under a
grammar built from the tools' parameters in the template's own call format — `<tool_call>{"name": ...,
"arguments": {...}}</tool_call>`, as Qwen2.5/Qwen3 and Hermes-style templates write them — then parsed
into `tool_calls`. tool_choice "required" or a named function: the answer is a call; "auto": text or
calls (text that does not open with the call tag); "none": plain text, the tools still described.
Everything wrong with these fields is an ApiError (400) naming the field.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from edgespec.base.errors import GrammarError
from edgespec.core.grammar import Grammar
from edgespec.front.server.protocol import ApiError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL_JSON = {"whitespace_pattern": "[ ]?"}  # a call is one line: json.dumps' spacing or none
_CALLS = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)


@dataclass
class Structure:
    """What a chat request asks beyond text: the grammar its answer follows, the tools its prompt
    describes (None: none), whether tool calls are parsed out of the answer, and log-probabilities."""

    grammar: Grammar | None = None
    tools: list | None = None
    calls: bool = False  # parse <tool_call> blocks out of the answer into tool_calls
    logprobs: int | None = None  # top alternatives per token (None: no log-probabilities)
    names: list[str] = field(default_factory=list)
    param: str | None = None  # the request field the grammar came from (named when it cannot compile)


def response_grammar(fmt) -> Grammar | None:
    """`response_format` → a Grammar (None for text)."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise ApiError(400, 'response_format must be {"type": "text"}, {"type": "json_object"} or '
                            '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}',
                       "response_format")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return Grammar.json_object()
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise ApiError(400, "response_format.json_schema must be an object with a \"schema\" object",
                       "response_format.json_schema")
    schema = spec.get("schema", {})
    if spec.get("strict") is True:
        schema = closed(schema)
    return _grammar(lambda: Grammar.json_schema(schema), "response_format.json_schema.schema")


def closed(schema):
    """A copy of `schema` whose objects admit only their listed properties, as OpenAI's strict mode
    means it (`"additionalProperties": false` wherever a schema leaves it unsaid)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _grammar(build, param: str) -> Grammar:
    try:
        return build()
    except GrammarError as e:
        raise ApiError(400, f"{param}: {e}", param, "invalid_schema") from None


def tool_names(tools) -> list[str]:
    """Check `tools` (OpenAI's [{"type": "function", "function": {"name", "parameters", ...}}]) and
    return the function names."""
    if not isinstance(tools, list) or not tools:
        raise ApiError(400, "tools must be a non-empty list of {\"type\": \"function\", \"function\": {...}}", "tools")
    names = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ApiError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", f"tools[{i}]")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise ApiError(400, f"tools[{i}].function.name is required: a name of letters, digits, _ . or - "
                                "(at most 64)", f"tools[{i}].function.name")
        if not isinstance(fn.get("parameters", {}), dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema object",
                           f"tools[{i}].function.parameters")
        names.append(name)
    return names


def chosen(tool_choice, names: list[str]) -> tuple[str, list[str]]:
    """(mode, the functions a call may name): mode "none", "auto" or "required"."""
    if tool_choice in (None, "auto"):
        return "auto", names
    if tool_choice in ("none", "required"):
        return tool_choice, names
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise ApiError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", '
                            '"function": {"name": ...}}', "tool_choice")
    if name not in names:
        raise ApiError(400, f"tool_choice names the function {name!r}, which is not among tools ({', '.join(names)})",
                       "tool_choice")
    return "required", [name]


def call_grammar(tools: list, allowed: list[str], required: bool, tags: dict, many: bool = True) -> Grammar:
    """The grammar of an answer that is tool calls (`required`) or either text or tool calls: each call
    `<tool_call>\\n{"name": <one of allowed>, "arguments": <its parameters' schema>}\\n</tool_call>`, one
    or (`many`) several. `tags`: each tag's grammar literal (tag_literals)."""
    variants = []
    for tool in tools:
        fn = tool["function"]
        if fn["name"] in allowed:
            params = fn.get("parameters") or {"type": "object", "properties": {}}
            variants.append({"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                             "properties": {"name": {"const": fn["name"]}, "arguments": params}})
    schema = {"anyOf": variants} if len(variants) > 1 else dict(variants[0])
    schema["x-guidance"] = CALL_JSON
    calls = (f'calls: ({tags[OPEN]} "\\n" call "\\n" {tags[CLOSE]} "\\n"?){"+" if many else ""}\n'
             f'call: %json {json.dumps(schema)}\n')
    start = "start: calls\n" if required else "start: calls | free\nfree: /[^<](?s:.*)/\n"
    return Grammar.lark(start + calls)


def tag_literals(tokenizer) -> dict:
    """<tool_call> and </tool_call> as grammar literals: `<[id]>` where the tokenizer has the tag as one
    added token (special or not: the grammar engine's token table holds every added token as a special
    token without bytes, so the tag spelled as text would refuse the very token the model writes), else
    the tag as text."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    out = {}
    for tag in (OPEN, CLOSE):
        tid = tokenizer.convert_tokens_to_ids(tag)
        one = isinstance(tid, int) and str(added.get(tid, "")) == tag  # (an unknown token maps to <unk>)
        out[tag] = f"<[{tid}]>" if one else json.dumps(tag)
    return out


def plan(req, tokenizer) -> Structure:
    """The Structure of a chat request (`req`: a protocol.ChatRequest)."""
    out = Structure(grammar=response_grammar(req.response_format), logprobs=_logprobs(req),
                    param="response_format.json_schema.schema")
    if req.tools in (None, []):
        if req.tool_choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice needs tools: send the tools the model may call", "tool_choice")
        return out
    names = tool_names(req.tools)
    mode, allowed = chosen(req.tool_choice, names)
    check_template(tokenizer)
    out.tools, out.names = req.tools, names
    if mode == "none":
        return out
    if out.grammar is not None:
        raise ApiError(400, "response_format and tools cannot be combined: a tool call has its own format",
                       "response_format")
    many = len(allowed) > 1 and req.parallel_tool_calls is not False  # a named function: one call
    out.grammar = call_grammar(req.tools, allowed, mode == "required", tag_literals(tokenizer), many)
    out.calls, out.param = True, "tools"
    return out


def _logprobs(req) -> int | None:
    if req.logprobs in (None, False):
        if req.top_logprobs not in (None, 0):
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return None
    if req.logprobs is not True:
        raise ApiError(400, "logprobs must be true or false", "logprobs")
    n = 0 if req.top_logprobs is None else req.top_logprobs
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 20:
        raise ApiError(400, "top_logprobs must be an integer from 0 to 20", "top_logprobs")
    return n


def check_template(tokenizer) -> None:
    """Refuse a chat template that cannot describe tools or has no <tool_call> format."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if "tools" not in template or OPEN not in template:
        raise ApiError(400, "this model's chat template has no tool support (it does not render `tools` and "
                            f"{OPEN} calls): serve a model whose template does (Qwen2.5 / Qwen3 Instruct, "
                            "Hermes-style), or describe the tools in a system message and leave tools out",
                       "tools", "unsupported_parameter")


def render(tokenizer, messages: list[dict], tools: list | None) -> list[int]:
    """The conversation as prompt ids through the model's template, with `tools` described."""
    ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
    return ids["input_ids"] if not isinstance(ids, list) else ids


def parse_calls(text: str, names: list[str]) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of an answer whose text (special tokens kept) may hold <tool_call> blocks."""
    calls = []
    for body in _CALLS.findall(text):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and obj.get("name") in names:
            calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                          "function": {"name": obj["name"], "arguments": json.dumps(obj.get("arguments", {}))}})
    if not calls:
        return text, []
    rest = _CALLS.sub("", text).strip()
    return rest or None, calls


def logprobs_content(tokenizer, logprobs) -> list[dict]:
    """Chat `logprobs.content` entries for core.logprobs.TokenLogprob values."""
    def entry(tok: int, lp: float) -> dict:
        text = tokenizer.decode([tok])
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs]
