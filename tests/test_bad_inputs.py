"""Every misuse is a clear error (issue 24): a table of bad inputs to the Python API, the command line and
the HTTP server, each refused with its error type (an InvalidArgumentError naming the argument; HTTP: a
400 with a JSON error body naming the field), after which the engine or server answers exactly as
before (the target's own greedy tokens). Also: a stop string stops as a whole, an answer never ends in
a broken character, the stats count the tokens kept."""
from __future__ import annotations

import json
import math

import httpx
import pytest
import torch

from edgespec.base.errors import InvalidArgumentError, InvalidPromptError
from edgespec.front import cli
from edgespec.front.server import ServerConfig, create_app
from tests.conftest import Fixed, greedy_reference, noisy_copy, tiny_engine, tiny_model
from tests.test_server import Served

MSGS = [{"role": "user", "content": "what is the capital of france"}]
SURROGATE = "\ud800"


def msg(**fields) -> list[dict]:
    return [{"role": "user", **fields}]


# ---- the Python API ------------------------------------------------------------------------------
# (what, prompt, options, error type, argument named (the error's .argument and in its message), word in it)
API = [
    ("prompt None", None, {}, InvalidPromptError, "prompt", "got NoneType"),
    ("prompt int", 5, {}, InvalidPromptError, "prompt", "got int"),
    ("prompt dict", {"role": "user", "content": "hi"}, {}, InvalidPromptError, "prompt", "got dict"),
    ("message without content", msg(), {}, InvalidPromptError, "prompt", "no 'content'"),
    ("content None", msg(content=None), {}, InvalidPromptError, "prompt", "'content'"),
    ("content int", msg(content=5), {}, InvalidPromptError, "prompt", "'content'"),
    ("role wizard", [{"role": "wizard", "content": "hi"}], {}, InvalidPromptError, "prompt", "'wizard'"),
    ("no role", [{"content": "hi"}], {}, InvalidPromptError, "prompt", "'role'"),
    ("messages and ids", [MSGS[0], 3], {}, InvalidPromptError, "prompt", "mixes"),
    ("float ids", [1.5, 2.0], {}, InvalidPromptError, "prompt", "integer token id"),
    ("bool ids", [True, 2], {}, InvalidPromptError, "prompt", "integer token id"),
    ("id past the vocabulary", [1, 2, 999], {}, InvalidPromptError, "prompt", "[0, 64)"),
    ("negative id", [-1, 2], {}, InvalidPromptError, "prompt", "[0, 64)"),
    ("float tensor", torch.tensor([1.0, 2.0]), {}, InvalidPromptError, "prompt", "integers"),
    ("tensor id past the vocabulary", torch.tensor([1, 64]), {}, InvalidPromptError, "prompt", "[0, 64)"),
    ("lone surrogate in content", msg(content=SURROGATE), {}, InvalidPromptError, "prompt", "surrogate"),
    ("lone surrogate in text", "a" + SURROGATE, {}, InvalidPromptError, "prompt", "surrogate"),
    ("empty text", "", {}, InvalidPromptError, "prompt", "empty"),
    ("empty list", [], {}, InvalidPromptError, "prompt", "empty"),
    ("seed text", MSGS, {"seed": "abc"}, InvalidArgumentError, "seed", "'abc'"),
    ("seed float", MSGS, {"seed": 1.5}, InvalidArgumentError, "seed", "integer"),
    ("temperature text", MSGS, {"temperature": "hot"}, InvalidArgumentError, "temperature", "'hot'"),
    ("temperature inf", MSGS, {"temperature": math.inf}, InvalidArgumentError, "temperature", "finite"),
    ("temperature nan", MSGS, {"temperature": math.nan}, InvalidArgumentError, "temperature", "finite"),
    ("temperature negative", MSGS, {"temperature": -1}, InvalidArgumentError, "temperature", ">= 0"),
    ("temperature bool", MSGS, {"temperature": True}, InvalidArgumentError, "temperature", "True"),
    ("top_p 0", MSGS, {"top_p": 0.0}, InvalidArgumentError, "top_p", "(0, 1]"),
    ("top_p 1.5", MSGS, {"top_p": 1.5}, InvalidArgumentError, "top_p", "(0, 1]"),
    ("top_k 2.5", MSGS, {"top_k": 2.5}, InvalidArgumentError, "top_k", "integer"),
    ("top_k negative", MSGS, {"top_k": -1}, InvalidArgumentError, "top_k", ">= 0"),
    ("min_p 1", MSGS, {"min_p": 1.0}, InvalidArgumentError, "min_p", "[0, 1)"),
    ("repetition_penalty 0", MSGS, {"repetition_penalty": 0}, InvalidArgumentError, "repetition_penalty", "> 0"),
    ("repetition_penalty inf", MSGS, {"repetition_penalty": math.inf}, InvalidArgumentError, "repetition_penalty",
     "finite"),
    ("sampling not a mapping", MSGS, {"sampling": "greedy"}, InvalidArgumentError, None, "sampling must be"),
    ("unknown sampling setting", MSGS, {"frobnicate": 1}, InvalidArgumentError, None, "'frobnicate'"),
    ("stop [None]", MSGS, {"stop": [None]}, InvalidArgumentError, "stop", "list of strings"),
    ("stop int", MSGS, {"stop": 5}, InvalidArgumentError, "stop", "list of strings"),
    ("stop empty string", MSGS, {"stop": [""]}, InvalidArgumentError, "stop", "empty stop string"),
    ("17 stop strings", MSGS, {"stop": [f"s{i}" for i in range(17)]}, InvalidArgumentError, "stop", "at most 16"),
    ("max_new_tokens 0", MSGS, {"max_new_tokens": 0}, InvalidArgumentError, "max_new_tokens", ">= 1"),
    ("max_new_tokens 2.5", MSGS, {"max_new_tokens": 2.5}, InvalidArgumentError, "max_new_tokens", "2.5"),
    ("max_new_tokens True", MSGS, {"max_new_tokens": True}, InvalidArgumentError, "max_new_tokens", "True"),
    ("max_new_tokens text", MSGS, {"max_new_tokens": "10"}, InvalidArgumentError, "max_new_tokens", "'10'"),
    ("logprobs 21", MSGS, {"logprobs": 21}, InvalidArgumentError, "logprobs", "0 to 20"),
    ("logprobs True", MSGS, {"logprobs": True}, InvalidArgumentError, "logprobs", "True"),
]


def test_python_api_bad_input_table():
    engine = tiny_engine()
    ids = engine.encode(MSGS)
    want = greedy_reference(engine.target, ids, 8)
    assert engine.generate(MSGS, max_new_tokens=8).ids == want
    for what, prompt, options, kind, argument, words in API:
        with pytest.raises(kind) as err:
            engine.generate(prompt, **{"max_new_tokens": 4, **options})
        assert type(err.value) is kind, (what, type(err.value))
        if argument is not None:
            assert err.value.argument == argument and argument in str(err.value), (what, str(err.value))
        assert words in str(err.value), (what, str(err.value))
    for stream in (engine.stream, engine.run):  # refused before a single step (a generator: when started)
        with pytest.raises(InvalidArgumentError, match="temperature"):
            list(stream(MSGS, 4, temperature=math.inf))
    assert len(API) >= 40
    assert engine.generate(MSGS, max_new_tokens=8).ids == want  # answers exactly as before
    ok = [{"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]}, *MSGS]
    assert engine.encode(ok)  # an assistant message that only calls tools may leave content out


# ---- the command line ----------------------------------------------------------------------------
CLI = [  # (arguments, the option named in the message)
    (["generate", "hello", "--temperature", "inf"], "--temperature"),
    (["generate", "hello", "--temperature", "nan"], "--temperature"),
    (["generate", "hello", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["chat", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["serve", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["bench", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["serve", "--port", "99999"], "--port"),
    (["serve", "--port", "-1"], "--port"),
    (["serve", "--max-body-mb", "0"], "--max-body-mb"),
    (["serve", "--max-body-mb", "nan"], "--max-body-mb"),
    (["generate", "hello", "--top-p", "2"], "--top-p"),
    (["generate", "hello", "--top-k", "-1"], "--top-k"),
    (["generate", "hello", "--min-p", "1"], "--min-p"),
    (["generate", "hello", "--repetition-penalty", "0"], "--repetition-penalty"),
    (["generate", "hello", "--link-delay", "-1"], "--link-delay"),
    (["generate", "hello", "--draft-temperature", "0"], "--draft-temperature"),
    (["bench", "--n-prompts", "0"], "--n-prompts"),
]


def test_command_line_bad_input_table(monkeypatch, capsys):
    engine, built = tiny_engine(), []
    monkeypatch.setattr(cli, "make_engine", lambda args: built.append(args) or engine)
    for argv, option in CLI:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"edgespec: error: {option} ") and "Traceback" not in err, (argv, err)
    assert not built, "refused before any model loads"
    assert cli.main(["generate", "what is the capital of france", "--json", "--max-new-tokens", "6"]) == 0
    ids = engine.encode(MSGS)
    assert json.loads(capsys.readouterr().out)["ids"] == greedy_reference(engine.target, ids, 6)


# ---- HTTP ------------------------------------------------------------------------------------------
GOOD = {"model": "tiny", "messages": MSGS, "max_tokens": 3}
DEEP = b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
HTTP = [  # (what, body (dict: JSON; bytes: as is), endpoint, the field named, word in the message)
    ("lone surrogate in content", {**GOOD, "messages": msg(content=SURROGATE)}, "chat", "messages.0.content",
     "surrogate"),
    ("lone surrogate, streamed", {**GOOD, "stream": True, "messages": msg(content=SURROGATE)}, "chat",
     "messages.0.content", "surrogate"),
    ("lone surrogate in a text part", {**GOOD, "messages": msg(content=[{"type": "text", "text": SURROGATE}])},
     "chat", "messages.0.content.0.text", "surrogate"),
    ("lone surrogate in a prompt", {"model": "tiny", "prompt": "a" + SURROGATE}, "completions", "prompt", "surrogate"),
    ("lone surrogate in stop", {**GOOD, "stop": [SURROGATE]}, "chat", "stop.0", "surrogate"),
    ("100k-deep JSON", DEEP, "chat", None, "more than 64 deep"),
    ("temperature 1e400", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}', "chat",
     "temperature", "finite"),
    ("top_p 1e400", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 1e400}', "chat", "top_p", ""),
    ("max_tokens 0", {**GOOD, "max_tokens": 0}, "chat", "max_tokens", "greater than or equal to 1"),
    ("max_tokens 2.5", {**GOOD, "max_tokens": 2.5}, "chat", "max_tokens", "integer"),
    ("max_tokens true", {**GOOD, "max_tokens": True}, "chat", "max_tokens", "integer"),
    ("seed text", {**GOOD, "seed": "abc"}, "chat", "seed", "integer"),
    ("role wizard", {**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}, "chat", "messages.0.role", "'user'"),
    ("message without content", {**GOOD, "messages": [{"role": "user"}]}, "chat", "messages.0", "content"),
    ("stop [null]", {**GOOD, "stop": [None]}, "chat", "stop", "list of strings"),
    ("temperature text", {**GOOD, "temperature": "hot"}, "chat", "temperature", "number"),
]


@pytest.fixture(scope="module")
def served_4mb():
    with Served(create_app(tiny_engine(), ServerConfig(model_id="tiny"))) as s:
        yield s


def test_http_bad_input_table(served_4mb):
    reference = tiny_engine()
    with httpx.Client(base_url=served_4mb.url + "/v1", timeout=60) as client:  # one keep-alive connection
        for what, body, endpoint, param, words in HTTP:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = client.post("/chat/completions" if endpoint == "chat" else "/completions", content=raw,
                            headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), (what, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, (what, err)
            assert words in err["message"], (what, err)
            assert r.headers.get("connection", "").lower() != "close", (what, "keep-alive kept")
        r = client.post("/chat/completions", json={**GOOD, "max_tokens": 6})
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == reference.generate(MSGS, max_new_tokens=6).text
    assert served_4mb.metrics.requests["error"] == 0  # no 500s


def test_server_refuses_nonsense_limits_at_start():
    from edgespec.front.server import bind

    for bad in ({"max_tokens": 0}, {"max_tokens": 2.5}, {"max_body_bytes": 0}, {"max_queue": 0}):
        with pytest.raises(InvalidArgumentError, match=next(iter(bad))):
            ServerConfig(**bad)
    for port in (99999, -1, 65536):
        with pytest.raises(Exception, match="port must be an integer from 0 to 65535"):
            bind("127.0.0.1", port)


# ---- stop strings, broken characters, stats ----------------------------------------------------------
def test_a_stop_string_stops_as_a_whole():
    engine = tiny_engine()
    full = engine.generate(MSGS, max_new_tokens=12).text
    word = next(w for w in full.split()[1:] if len(w) > 1 and min(map(full.find, w)) < full.index(w))
    cut = engine.generate(MSGS, max_new_tokens=12, stop=word)  # a letter of it comes earlier: cutting there
    assert cut.text == full[:full.index(word)] and cut.stats.stop_reason == "stop", (full, word, cut.text)
    assert "".join(engine.stream(MSGS, 12, stop=word)) == cut.text
    assert engine.generate(MSGS, max_new_tokens=12, stop=(word, "zzz")).text == cut.text


def byte_tokenizer():
    """A byte-level tokenizer of 256 single-byte tokens (GPT-2's byte alphabet): a multi-byte character
    takes several tokens, so a token limit can cut one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk)


def test_an_answer_never_ends_in_a_broken_character():
    from edgespec import Engine

    target = tiny_model("llama", init=0.5, vocab=256, seed=3)
    engine = Engine(target, noisy_copy(target, scale=0.002), byte_tokenizer(), budget=4)
    tok, prompt, cut = engine.tokenizer, [200, 201, 202, 203], 0
    for n in range(1, 25):
        out = engine.generate(prompt, max_new_tokens=n)
        raw = tok.decode(out.ids)
        cut += raw.endswith("\ufffd")
        assert not out.text.endswith("\ufffd") and raw.startswith(out.text), (n, raw, out.text)
        assert raw.rstrip("\ufffd") == out.text
        assert "".join(engine.stream(prompt, n)) == out.text, n
    assert cut, "no limit cut a character: the test could not fail"


class Recording(Fixed):
    """A fixed plan that records how many tokens each verified step accepted."""

    def __init__(self, plan):
        super().__init__(plan)
        self.accepted = []

    def observe(self, step):
        self.accepted.append(step.accepted)


def test_stats_count_the_tokens_kept_and_time_the_prefill():
    from edgespec import Engine
    from edgespec.base.stats import Plan

    base = tiny_engine()
    full = base.generate(MSGS, max_new_tokens=12)
    sched = Recording(Plan(8, 8, 4, 16))
    engine = Engine(base.target, base.drafter, base.tokenizer, scheduler=sched)
    engine.eos_ids = frozenset({full.ids[1]})  # the answer ends at its 2nd token (or sooner)
    out = engine.generate(MSGS, max_new_tokens=12)
    end = full.ids.index(full.ids[1]) + 1
    assert out.ids == full.ids[:end] and out.stats.stop_reason == "eos"
    assert sum(s.accepted for s in out.stats.steps) == len(out.ids) == out.stats.new_tokens
    assert sum(sched.accepted) > len(out.ids), "the steps accepted past the end: the test can fail"
    assert out.stats.summary()["accepted_per_pass"] == round(len(out.ids) / len(out.stats.steps), 3)
    stop = full.text.split()[2]
    out = engine.generate(MSGS, max_new_tokens=12, stop=stop)  # a stop string cuts tokens too
    assert sum(s.accepted for s in out.stats.steps) == len(out.ids)
    long = base.generate(list(range(4, 60)) * 3, max_new_tokens=4)
    assert long.stats.prefill_time > 0 and long.stats.prefill_time == long.stats.steps[0].step_time


@pytest.mark.slow
def test_stop_paris_on_the_embedded_default(real_pair):
    from edgespec import Engine

    target, drafter, tok = real_pair
    engine = Engine(target, drafter, tok, budget=8)
    q = [{"role": "user", "content": "What is the capital of France?"}]
    full = engine.generate(q, max_new_tokens=24, temperature=0).text
    assert "Paris" in full and full.index("Paris") > 0, full
    out = engine.generate(q, max_new_tokens=24, temperature=0, stop="Paris")
    assert out.text == full[:full.index("Paris")] and out.stats.stop_reason == "stop"


def test_chat_load_refuses_a_transcript_a_turn_would_refuse(tmp_path):
    from tests.conftest import chat_session

    s, out, err = chat_session(max_new_tokens=6)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"role": "wizard", "content": "hi"}]))
    s.handle(f"/load {path}")
    assert "is not a transcript" in err.getvalue() and "'wizard'" in err.getvalue() and s.messages == []
    answer = s.ask("what is the capital of france")
    ids = s.engine.encode(MSGS)
    assert answer == s.engine.tokenizer.decode(greedy_reference(s.engine.target, ids, 6), skip_special_tokens=True)
