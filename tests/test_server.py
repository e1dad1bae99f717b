"""`edgespec serve`: a real uvicorn server on 127.0.0.1 (port 0, in a thread of this process), driven by
the official `openai` client (and httpx for raw bytes), over a tiny random model with a real word-level
tokenizer. Every answer is checked token for token against `Engine.generate` on an identical engine."""
from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest

from edgespec import Engine
from edgespec.front import cli
from edgespec.front.server import ServerConfig, bind, create_app, exposure_warning, uvicorn_server
from edgespec.front.server.worker import StopHoldback
from tests.conftest import tiny_engine

KEY = "sk-test-key"


class Served:
    """A uvicorn server for `app` on 127.0.0.1, port 0, in a daemon thread; stopped on exit."""

    def __init__(self, app):
        self.app, self.sock = app, bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn_server(app, log_level="warning")

    def __enter__(self):
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()

    def client(self, api_key: str = "none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kw)

    @property
    def metrics(self):
        return self.app.state.metrics


@pytest.fixture(scope="module")
def served():
    app = create_app(tiny_engine(), ServerConfig(model_id="tiny", max_body_bytes=1 << 16))
    with Served(app) as s:
        yield s


@pytest.fixture(scope="module")
def reference() -> Engine:
    return tiny_engine()


def chat(text: str) -> list[dict]:
    return [{"role": "system", "content": "you are helpful"}, {"role": "user", "content": text}]


def streamed(stream) -> tuple[str, list, object]:
    """(joined content, finish reasons seen, usage of the final chunk) of a chat stream."""
    text, finish, usage = "", [], None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.finish_reason:
                finish.append(choice.finish_reason)
        usage = chunk.usage or usage
    return text, finish, usage


# ---- answers equal generate ------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["what is the capital of france", "hello world the cat and the dog"])
def test_chat_equals_generate(served, reference, text):
    want = reference.generate(chat(text), max_new_tokens=10)
    r = served.client().chat.completions.create(model="tiny", messages=chat(text), max_tokens=10)
    assert r.choices[0].message.content == want.text and want.text
    assert r.choices[0].finish_reason == "length" and r.object == "chat.completion"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(reference.encode(chat(text))), len(want.ids))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    s = served.client().chat.completions.create(model="tiny", messages=chat(text), max_tokens=10, stream=True,
                                                stream_options={"include_usage": True})
    got, finish, usage = streamed(s)
    assert got == want.text and finish == ["length"]
    assert (usage.prompt_tokens, usage.completion_tokens) == (r.usage.prompt_tokens, len(want.ids))


def test_completion_equals_generate(served, reference):
    prompt = "the capital of france is"
    want = reference.generate(prompt, max_new_tokens=9)
    r = served.client().completions.create(model="tiny", prompt=prompt, max_tokens=9)
    assert r.choices[0].text == want.text and r.object == "text_completion"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(reference.encode(prompt)), len(want.ids))
    pieces = [c.choices[0].text for c in served.client().completions.create(
        model="tiny", prompt=prompt, max_tokens=9, stream=True) if c.choices]
    assert "".join(pieces) == want.text and len([p for p in pieces if p]) > 1  # streamed in several pieces


def test_seed_gives_the_same_answer(served, reference):
    kw = dict(temperature=0.9, top_p=0.95, seed=11)
    want = reference.generate(chat("one two three"), max_new_tokens=10, **kw)
    greedy = reference.generate(chat("one two three"), max_new_tokens=10)
    client = served.client()
    answers = [client.chat.completions.create(model="tiny", messages=chat("one two three"), max_tokens=10, **kw)
               .choices[0].message.content for _ in range(2)]
    got, _, _ = streamed(client.chat.completions.create(model="tiny", messages=chat("one two three"),
                                                        max_tokens=10, stream=True, **kw))
    assert answers == [want.text, want.text] and got == want.text
    assert want.text != greedy.text  # the sampling settings reached the engine


def test_stop_cuts_where_generate_cuts(served, reference):
    msgs = chat("blue sky and green sea")
    full = reference.generate(msgs, max_new_tokens=16).text.split(" ")
    stop = " ".join(full[4:6])  # two words: the stop string spans stream pieces
    want = reference.generate(msgs, max_new_tokens=16, stop=[stop, "never seen"])
    assert want.stats.stop_reason == "stop" and len(want.text) < len(" ".join(full))
    client = served.client()
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, stop=[stop, "never seen"])
    assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(want.ids)
    got, finish, _ = streamed(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16,
                                                             stop=stop, stream=True))
    assert got == want.text and finish == ["stop"]


def test_stop_holdback_adds_up_to_the_answer():
    for final in ("a b c d x c d", "a b c d x "):  # ended by length, or the engine cut at "c d e"
        hold = StopHoldback(["c d e"])
        shown = [hold.feed(p) for p in ["a b", " c", " d", " x c", " d"]]
        assert shown == ["a b", " ", "", "c d x ", ""]  # "c d" could have become the stop string until " x"
        assert "".join(shown) + hold.finish(final) == final


def test_raw_stream_is_server_sent_events(served):
    body = {"model": "tiny", "messages": chat("hello"), "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_models_health_metrics(served):
    models = served.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(served.url + "/health").json()["status"] == "ok"
    served.client().chat.completions.create(model="tiny", messages=chat("red"), max_tokens=3)
    text = httpx.get(served.url + "/metrics").text
    sample = re.compile(r"^edgespec_[a-z_]+(\{[a-z]+=\"[^\"]*\"\})? -?[0-9.e+-]+$")
    assert all(sample.match(line) for line in text.splitlines() if not line.startswith("#")), text
    for name in ("tokens_per_second", "accepted_tokens_per_pass", "tree_size_bucket", "pass_seconds_sum",
                 "draft_seconds_sum", "queue_length", "completion_tokens_total"):
        assert f"edgespec_{name}" in text
    tokens = float(re.search(r"^edgespec_completion_tokens_total (\S+)$", text, re.M).group(1))
    assert tokens == served.metrics.counters["completion_tokens_total"] >= 3


# ---- multi-turn: the cached prefix is reused ----------------------------------------------------------
def test_second_turn_reuses_the_cached_prefix(served, reference):
    client = served.client()
    convo = chat("what is the capital of france")

    def turn():
        start, first, text = time.perf_counter(), None, ""
        for chunk in client.chat.completions.create(model="tiny", messages=convo, max_tokens=8, stream=True):
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece and first is None:
                first = time.perf_counter() - start
            text += piece or ""
        return text, first, served.app.state.worker.last

    one, ttft1, gen1 = turn()
    assert one == reference.generate(convo, max_new_tokens=8).text
    convo += [{"role": "assistant", "content": one}, {"role": "user", "content": "and the capital of the sea"}]
    two, ttft2, gen2 = turn()
    assert two == reference.generate(convo, max_new_tokens=8).text
    prompt2 = len(reference.encode(convo))
    # the first target pass of turn 2 holds only what the cache lacked: not the whole conversation again
    assert gen2.stats.steps[0].verify_tokens - gen2.stats.steps[0].tree_size < prompt2 // 2
    print(f"\ntime to first token: turn 1 {ttft1 * 1e3:.1f} ms, turn 2 {ttft2 * 1e3:.1f} ms "
          f"({prompt2} prompt tokens, {gen2.stats.steps[0].verify_tokens - gen2.stats.steps[0].tree_size} new)")


# ---- cancellation ------------------------------------------------------------------------------------
def test_run_cancel_stops_before_the_next_step():
    run = tiny_engine().run("the cat and the dog", max_new_tokens=100)
    run.cancel = threading.Event()
    pieces = iter(run)
    next(pieces)
    run.cancel.set()
    assert list(pieces) == [] and len(run.result.stats.steps) == 1 and run.result.stats.stop_reason == "cancelled"


def test_closing_a_stream_cancels_its_generation(served):
    client, m = served.client(), served.metrics
    before = (m.requests["cancelled"], m.counters["target_passes_total"])
    stream = client.chat.completions.create(model="tiny", messages=chat("the sky is blue and the sea"),
                                            max_tokens=200, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    deadline = time.monotonic() + 20
    while m.requests["cancelled"] == before[0]:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.02)
    gen = served.app.state.worker.last
    assert gen.stats.stop_reason == "cancelled" and len(gen.ids) < 200
    # a client that gives up on a whole (non-streamed) answer cancels it too
    with pytest.raises(httpx.ReadTimeout):
        post(served, "chat", {**GOOD, "max_tokens": 200}, timeout=0.3)
    while m.requests["cancelled"] == before[0] + 1:
        assert time.monotonic() < deadline + 20, "the whole answer was not cancelled"
        time.sleep(0.02)
    assert served.app.state.worker.last.stats.stop_reason == "cancelled"
    # the next answers (same conversation: the cache's prefix is reused; and a longer one) equal a fresh engine's
    fresh = tiny_engine()
    for msgs in (chat("the sky is blue and the sea"), chat("the sky is blue and the sea") + chat("yes")[1:]):
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12)
        assert r.choices[0].message.content == fresh.generate(msgs, max_new_tokens=12).text


# ---- load --------------------------------------------------------------------------------------------
def test_load_8_clients_25_requests(served, reference):
    variants = [(chat(f"w{k} is the capital of w{k + 10}"), {"temperature": 0.8, "seed": k} if k % 2 else {})
                for k in range(10)]
    want = [reference.generate(msgs, max_new_tokens=6, **kw).text for msgs, kw in variants]
    proc = psutil.Process()

    def client_run(i: int, n: int) -> list[tuple[int, str, str]]:
        client, out = served.client(), []
        for j in range(n):
            k = (i + 3 * j) % len(variants)
            msgs, kw = variants[k]
            if j % 2:
                text, _, _ = streamed(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6,
                                                                     stream=True, **kw))
                out.append((k, text, f"stream-{i}-{j}"))
            else:
                r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, **kw)
                out.append((k, r.choices[0].message.content, r.id))
        return out

    def load(n: int) -> list:
        with ThreadPoolExecutor(8) as pool:
            return [a for f in [pool.submit(client_run, i, n) for i in range(8)] for a in f.result(timeout=300)]

    load(4)  # warm-up: connections, allocator pools, every variant's code path
    rss0, ok0, t0 = proc.memory_info().rss, served.metrics.requests["ok"], time.perf_counter()
    answers = load(25)
    took, rss1 = time.perf_counter() - t0, proc.memory_info().rss
    print(f"\nload: 200 requests in {took:.1f} s; RSS after warm-up {rss0 / 2**20:.1f} MiB, "
          f"after the load {rss1 / 2**20:.1f} MiB ({(rss1 - rss0) / 2**20:+.1f} MiB)")
    assert len(answers) == 200 and len({a[2] for a in answers}) == 200  # none lost, none duplicated
    assert served.metrics.requests["ok"] - ok0 == 200
    assert [text for _, text, _ in answers] == [want[k] for k, _, _ in answers]
    assert rss1 - rss0 < 64 * 2**20 and took < 240


# ---- bad input ---------------------------------------------------------------------------------------
GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
LONG = " ".join(["the cat"] * 200)  # 400 tokens: over the tiny model's 256-token window
BAD = [  # (what is wrong, body (dict: JSON; bytes: as is), endpoint, status, words the message must hold, param)
    ("malformed JSON", b'{"model": "tiny", "messages": [', "chat", 400, "malformed JSON", None),
    ("NaN", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "chat", 400, "NaN", None),
    ("not UTF-8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "chat", 400, "UTF-8", None),
    ("not an object", b"[1, 2]", "chat", 400, "JSON object", None),
    ("body too large", {**GOOD, "messages": [{"role": "user", "content": "a " * 40000}]}, "chat", 413, "limit", None),
    ("prompt too long", {**GOOD, "messages": [{"role": "user", "content": LONG}]}, "chat", 400, "context window",
     "messages"),
    ("empty messages", {**GOOD, "messages": []}, "chat", 400, "at least one message", "messages"),
    ("no messages", {"model": "tiny"}, "chat", 400, "messages is required", "messages"),
    ("wrong type", {**GOOD, "temperature": "hot"}, "chat", 400, "valid number", "temperature"),
    ("max_tokens as text", {**GOOD, "max_tokens": "5"}, "chat", 400, "valid integer", "max_tokens"),
    ("max_tokens < 1", {**GOOD, "max_tokens": 0}, "chat", 400, "greater than or equal to 1", "max_tokens"),
    ("max_completion_tokens < 1", {**GOOD, "max_completion_tokens": -3}, "chat", 400, "greater than or equal to 1",
     "max_completion_tokens"),
    ("temperature < 0", {**GOOD, "temperature": -0.5}, "chat", 400, "greater than or equal to 0", "temperature"),
    ("top_p > 1", {**GOOD, "top_p": 1.5}, "chat", 400, "less than or equal to 1", "top_p"),
    ("n = 2", {**GOOD, "n": 2}, "chat", 400, "one answer per request", "n"),
    ("tools, a template without tool support", {**GOOD, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "chat", 400, "chat template has no tool support", "tools"),
    ("top_logprobs > 20", {**GOOD, "logprobs": True, "top_logprobs": 21}, "chat", 400, "from 0 to 20", "top_logprobs"),
    ("top_logprobs without logprobs", {**GOOD, "top_logprobs": 2}, "chat", 400, "needs logprobs", "top_logprobs"),
    ("image", {**GOOD, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "chat", 400, "'image_url'", "messages.0.content.1"),
    ("tool message without its call's id", {**GOOD, "messages": [{"role": "tool", "content": "42"}]}, "chat", 400,
     "tool_call_id", "messages.0"),
    ("unknown model", {**GOOD, "model": "gpt-4o"}, "chat", 404, "'gpt-4o' is not served", "model"),
    ("unknown field", {**GOOD, "frobnicate": 1}, "chat", 400, "unrecognized request argument", "frobnicate"),
    ("stop not text", {**GOOD, "stop": 5}, "chat", 400, "string or a list of strings", "stop"),
    ("empty stop", {**GOOD, "stop": [""]}, "chat", 400, "empty stop string", "stop"),
    ("two prompts", {"model": "tiny", "prompt": ["a", "b"]}, "completions", 400, "one prompt per request", "prompt"),
    ("echo", {"model": "tiny", "prompt": "a", "echo": True}, "completions", 400, "echo", "echo"),
]


def post(served, endpoint: str, body, headers=None, timeout: float = 30) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{served.url}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}",
                      content=raw, headers={"Content-Type": "application/json", **(headers or {})}, timeout=timeout)


def test_bad_input_table(served, reference):
    rejected, failed = served.metrics.requests["rejected"], served.metrics.requests["error"]
    for what, body, endpoint, status, words, param in BAD:
        r = post(served, endpoint, body)
        err = r.json()["error"]
        assert r.status_code == status, (what, r.status_code, err)
        assert words in err["message"] and set(err) == {"message", "type", "param", "code"}, (what, err)
        assert err["param"] == param, (what, err)
    with pytest.raises(openai.BadRequestError, match="n is not supported"):  # as the client sees it
        served.client().chat.completions.create(model="tiny", messages=GOOD["messages"], n=2)
    # each counted once: the prompt too long for the window by the worker (it tokenizes), the rest before queueing
    assert served.metrics.requests["rejected"] - rejected == len(BAD) and served.metrics.requests["error"] == failed + 1
    r = served.client().chat.completions.create(model="tiny", messages=GOOD["messages"], max_tokens=5)
    assert r.choices[0].message.content == reference.generate(GOOD["messages"], max_new_tokens=5).text


def test_sampler_extras_reach_the_engine(served, reference):
    """top_k / min_p / repetition_penalty as extra request fields: the answer is generate's with them."""
    msgs = chat("the cat and the dog and the cat")
    client = served.client()
    for extra in ({"top_k": 3}, {"min_p": 0.2}, {"repetition_penalty": 1.5}, {"top_k": 5, "min_p": 0.05}):
        kw = {"temperature": 0.9, "seed": 2, **extra}
        want = reference.generate(msgs, max_new_tokens=10, **kw).text
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, extra_body=extra,
                                           temperature=0.9, seed=2)
        assert r.choices[0].message.content == want, extra
    greedy = reference.generate(msgs, max_new_tokens=10, temperature=0).text
    penalised = reference.generate(msgs, max_new_tokens=10, temperature=0, repetition_penalty=1.5).text
    assert greedy != penalised  # the option changes the answer, so the equality above could fail
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                       extra_body={"repetition_penalty": 1.5})
    assert r.choices[0].message.content == penalised
    for bad in ({"top_k": -1}, {"min_p": 2}, {"repetition_penalty": 0}):
        assert post(served, "chat", {**GOOD, **bad}).json()["error"]["param"] == next(iter(bad))


def test_only_the_sampler_fields_a_request_sets_reach_engine_run():
    class Recording(Engine):
        """Records the sampling settings and seed each run gets."""

        def run(self, prompt, max_new_tokens=256, *, seed=None, sampling=None, **kw):
            self.given = {"temperature": None, "top_p": None, "seed": seed, **(sampling or {})}
            return super().run(prompt, max_new_tokens, seed=seed, sampling=sampling, **kw)

    base = tiny_engine()
    engine = Recording(base.target, base.drafter, base.tokenizer, budget=4)
    with Served(create_app(engine, ServerConfig(model_id="tiny", defaults={"top_p": 0.9}))) as s:
        r = post(s, "chat", {**GOOD, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "seed": 4})
        assert r.status_code == 200, r.text
        assert engine.given == dict(temperature=None, top_p=0.9, seed=4, top_k=5, min_p=0.1, repetition_penalty=1.2)
        assert post(s, "chat", {**GOOD, "temperature": 0.5, "top_p": 0.5}).status_code == 200
        assert engine.given == dict(temperature=0.5, top_p=0.5, seed=None)  # the rest: the engine's defaults


def test_api_key():
    app = create_app(tiny_engine(), ServerConfig(model_id="tiny", api_key=KEY))
    with Served(app) as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = post(s, "chat", GOOD, headers)
            assert r.status_code == 401 and "API key" in r.json()["error"]["message"], headers
            assert httpx.get(s.url + "/metrics", headers=headers).status_code == 401
            assert httpx.get(s.url + "/v1/models", headers=headers).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").chat.completions.create(model="tiny", messages=GOOD["messages"])
        assert httpx.get(s.url + "/health").status_code == 200
        assert httpx.get(s.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        r = s.client(api_key=KEY).chat.completions.create(model="tiny", messages=GOOD["messages"], max_tokens=3)
        assert r.usage.completion_tokens == 3


# ---- the command -------------------------------------------------------------------------------------
def test_serve_command(monkeypatch):
    from edgespec.front import server

    seen = {}
    engine = tiny_engine()
    monkeypatch.setattr(cli, "make_engine", lambda args: engine)
    monkeypatch.setattr(server, "serve", lambda engine, config, host, port, sock: seen.update(
        engine=engine, config=config, host=host, port=port) or sock.close() or 0)
    monkeypatch.setenv("EDGESPEC_API_KEY", "from-env")
    assert cli.main(["serve", "--port", "0", "--max-new-tokens", "64", "--seed", "3"]) == 0
    cfg = seen["config"]
    assert (seen["host"], cfg.api_key, cfg.model_id) == ("127.0.0.1", "from-env", "SmolLM2-135M-Instruct")
    assert cfg.max_tokens == 64 and cfg.defaults == {"seed": 3} and seen["engine"] is engine
    assert cli.main(["serve", "--port", "0", "--top-k", "7", "--temperature", "0.6"]) == 0
    assert seen["config"].defaults == {"top_k": 7, "temperature": 0.6}
    assert cli.main(["serve", "--port", "0", "--api-key", "k"]) == 0 and seen["config"].api_key == "k"
    args = cli.build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8080, None)  # loopback by default


def test_exposure_warning():
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None
    assert exposure_warning("0.0.0.0", "key") is None
    line = exposure_warning("0.0.0.0", None)
    assert "\n" not in line and "without an API key" in line and "--api-key" in line


def test_port_in_use_is_a_clear_error():
    from edgespec.base.errors import EdgespecError

    held = bind("127.0.0.1", 0)
    held.listen()
    with pytest.raises(EdgespecError, match="cannot listen on 127.0.0.1"):
        bind("127.0.0.1", held.getsockname()[1])
    held.close()


# ---- the embedded default, as a user starts it -----------------------------------------------------------
SYSTEM = ("You are a concise geography tutor. Answer in one short sentence, name the country and the city, and "
          "do not add lists, caveats or follow-up questions. When the user asks about a capital, give the capital.")


@pytest.mark.slow
def test_embedded_default_serves_offline(tmp_path):
    """`edgespec serve` with no model arguments in a subprocess; a conversation sent turn by turn with the
    openai client; prints the time to first token of each turn (turn 2 reuses the cached prefix)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "EDGESPEC_API_KEY": ""}
    proc = subprocess.Popen([sys.executable, "-m", "edgespec.front.cli", "serve", "--port", "0", "--budget", "16"],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        url = _served_url(proc)
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
        [model] = [m.id for m in client.models.list().data]
        client.completions.create(model=model, prompt="Once upon a time", max_tokens=4)  # warm-up, unrelated cache
        convo = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the capital of France?"}]
        one, ttft1 = _timed_turn(client, model, convo)
        assert "Paris" in one
        convo += [{"role": "assistant", "content": one}, {"role": "user", "content": "And of Italy?"}]
        two, ttft2 = _timed_turn(client, model, convo)
        assert "Rome" in two
        print(f"\nembedded default: time to first token, turn 1 {ttft1 * 1e3:.0f} ms, turn 2 {ttft2 * 1e3:.0f} ms")
    finally:
        proc.terminate()
        proc.wait(30)


def _served_url(proc) -> str:
    for line in proc.stderr:
        if found := re.search(r"serving \S+ at (http://\S+/v1)", line):
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining the log
            return found.group(1)
    raise AssertionError(f"edgespec serve exited with {proc.wait()} before serving")


def _timed_turn(client, model, convo) -> tuple[str, float]:
    start, first, text = time.perf_counter(), None, ""
    for chunk in client.chat.completions.create(model=model, messages=convo, max_tokens=24, stream=True,
                                                temperature=0):  # greedy: the answer is known
        piece = chunk.choices[0].delta.content if chunk.choices else None
        if piece and first is None:
            first = time.perf_counter() - start
        text += piece or ""
    return text, first
