"""The chat session and the command line, on tiny random models with a tiny word-level tokenizer;
the embedded default through a real subprocess is marked slow."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgespec import Engine
from edgespec.front import cli
from edgespec.front.chat import ChatSession, repl
from tests.conftest import chat_session, greedy_reference, tiny_engine

ROOT = Path(__file__).resolve().parents[1]


def decode(engine, ids):
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


# ---- ChatSession --------------------------------------------------------------------------------
def test_multi_turn_keeps_history_and_answers_greedily():
    s, out, _ = chat_session()
    first = s.ask("hello world")
    assert [m["role"] for m in s.messages] == ["user", "assistant"] and s.messages[1]["content"] == first
    before = list(s.messages) + [{"role": "user", "content": "what is the capital of france"}]
    second = s.ask("what is the capital of france")
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]
    ids = s.engine.encode(before)  # the second prompt holds the whole first exchange
    assert decode(s.engine, greedy_reference(s.engine.target, ids, 12)) == second
    assert first in out.getvalue() and second in out.getvalue()


def test_system_message_reset_and_commands():
    s, out, err = chat_session(system="you are helpful")
    assert s.handle("hello") and s.handle("/help") and "/save" in out.getvalue()
    assert len(s.messages) == 3
    assert s.handle("/reset")
    assert s.messages == [{"role": "system", "content": "you are helpful"}] and s.engine.state.ids == []
    assert s.handle("/nonsense") and "unknown command" in err.getvalue()
    assert s.handle("") and not s.handle("/exit")


def test_save_then_load_restores_the_transcript(tmp_path):
    s, _, err = chat_session()
    s.handle("hello world")
    s.handle("the cat and the dog")
    saved = [dict(m) for m in s.messages]
    path = tmp_path / "chat.json"
    s.handle(f"/save {path}")
    assert json.loads(path.read_text()) == saved
    s.handle("/reset")
    assert s.messages == []
    s.handle(f"/load {path}")
    assert s.messages == saved
    s.handle("one two three")  # continues after the loaded turns
    assert s.messages[:4] == saved and len(s.messages) == 6
    bad = tmp_path / "bad.json"
    bad.write_text('{"role": "user"}')
    s.handle(f"/load {bad}")
    assert "not a transcript" in err.getvalue() and len(s.messages) == 6
    s.handle(f"/load {tmp_path / 'missing.json'}")
    assert "could not read" in err.getvalue()


def test_ctrl_c_in_the_engine_keeps_the_partial_answer():
    engine = tiny_engine(budget=1)
    s, out, _ = chat_session(engine, max_new_tokens=20)
    s.ask("hello world")
    real_step, calls = engine.stepper.step, []

    def step(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    engine.stepper.step = step
    partial = s.ask("the cat")
    assert "[interrupted]" in out.getvalue()
    assert s.messages[-1] == {"role": "assistant", "content": partial} and len(s.messages) == 4
    assert s.last.stop_reason == "interrupted" and 1 <= s.last.new_tokens < 20
    assert len(engine.state.ids) <= len(engine.encode(s.messages[:3])) + s.last.new_tokens
    engine.stepper.step = real_step
    s.ask("one two")  # the conversation goes on
    assert len(s.messages) == 6


def test_ctrl_c_while_printing_keeps_the_partial_answer():
    class Out(io.StringIO):
        writes = 0

        def write(self, text):
            if text and text not in ("\n", " [interrupted]"):
                Out.writes += 1
                if Out.writes == 3:
                    raise KeyboardInterrupt
            return super().write(text)

    engine = tiny_engine(budget=1)
    s = ChatSession(engine, out=Out(), err=io.StringIO(), max_new_tokens=20)
    answer = s.ask("hello world")
    assert s.messages[-1] == {"role": "assistant", "content": answer}
    assert s.last is not None and s.last.new_tokens < 20


def test_an_error_in_one_turn_keeps_earlier_turns():
    s, _, err = chat_session()
    s.ask("hello world")
    kept = list(s.messages)
    assert s.ask(" ".join(["cat"] * 400)) is None  # longer than the tiny model's context window
    assert "edgespec: error:" in err.getvalue() and "context window" in err.getvalue()
    assert s.messages == kept
    s.ask("one two")
    assert len(s.messages) == 4


def test_stats_prints_numbers():
    s, out, _ = chat_session(tiny_engine(offload=True))
    s.handle("/stats")
    assert "none yet" in out.getvalue()
    s.handle("hello world")
    s.handle("/stats")
    text = out.getvalue()
    assert "tokens/s" in text and "accepted/pass" in text and "scheduler:" in text and "offload:" in text
    assert s.last.new_tokens > 0 and s.totals.new_tokens == s.last.new_tokens


def test_repl_reads_a_pipe_until_eof():
    s, out, _ = chat_session(prefix="assistant: ")
    assert cli_repl(s, "hello world\n\n/stats\nthe cat\n") == 0
    assert out.getvalue().count("assistant: ") == 2 and len(s.messages) == 4


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def scripted(*events):
    """A prompt reader that returns each line, or raises each exception class, in turn."""
    it = iter(events)

    def read():
        e = next(it)
        if isinstance(e, type):
            raise e
        return e
    return read


def test_ctrl_c_at_the_prompt_keeps_the_chat_and_twice_quits():
    # a Ctrl-C meant to stop an answer that had just ended lands at the prompt: the chat goes on
    s, out, err = chat_session()
    read = scripted("hello world", KeyboardInterrupt, "the cat", KeyboardInterrupt, KeyboardInterrupt, "never read")
    assert repl(s, Terminal(), read=read) == 0
    assert [m["role"] for m in s.messages] == ["user", "assistant"] * 2 and s.messages[2]["content"] == "the cat"
    assert err.getvalue().count("Ctrl-C again") == 2
    s2, _, _ = chat_session()
    assert repl(s2, Terminal(), read=scripted(KeyboardInterrupt, "hi", KeyboardInterrupt, EOFError)) == 0
    assert len(s2.messages) == 2  # a line between two Ctrl-Cs disarms the quit


def cli_repl(s, text: str) -> int:
    from edgespec.front.chat import repl

    return repl(s, io.StringIO(text))


# ---- main([...]) ---------------------------------------------------------------------------------
@pytest.fixture
def injected(monkeypatch):
    engine = tiny_engine(budget=4, offload=True)
    monkeypatch.setattr(cli, "make_engine", lambda args: engine)
    return engine


def test_generate_json(injected, capsys):
    assert cli.main(["generate", "what is the capital of france", "--json", "--max-new-tokens", "10"]) == 0
    data = json.loads(capsys.readouterr().out)
    ids = injected.encode([{"role": "user", "content": "what is the capital of france"}])
    assert data["ids"] == greedy_reference(injected.target, ids, 10)
    assert data["text"] == decode(injected, data["ids"])
    assert data["stats"]["new_tokens"] == 10 and len(data["steps"]) == data["stats"]["steps"] > 0
    assert {"accepted", "tree_size", "draft_time", "verify_time"} <= set(data["steps"][0])
    assert "offload" in data and "scheduler" in data
    if any(s["tree_size"] for s in data["steps"]):  # every tree tests the drafter's top token under the root
        assert data["hit_rates"]["top"] and all(0 <= rate <= 1 for _, rate, _ in data["hit_rates"]["top"])


def test_generate_raw_from_stdin(injected, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("the cat and the dog"))
    assert cli.main(["generate", "--raw", "--max-new-tokens", "6"]) == 0
    ids = injected.encode("the cat and the dog")
    assert capsys.readouterr().out == decode(injected, greedy_reference(injected.target, ids, 6)) + "\n"


def test_user_errors_exit_2_without_traceback(injected, capsys):
    assert cli.main(["generate", "hello", "--temperature", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgespec: error: --temperature must be") and "Traceback" not in err
    assert cli.main(["generate", "   "]) == 2
    assert "the prompt is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "hello", "--budget", "lots"])
    assert e.value.code == 2


# ---- the embedded default, as a user runs it ------------------------------------------------------
def run_cli(*args, stdin: str = "", **env_extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env_extra}
    return subprocess.run([sys.executable, "-m", "edgespec.front.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=900, check=False)


@pytest.mark.slow
def test_chat_on_the_embedded_default_through_a_pipe():
    proc = run_cli("chat", "--max-new-tokens", "16", stdin="What is the capital of France?\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer = proc.stdout.split("assistant: ", 1)[1].strip()
    assert answer, proc.stdout


@pytest.mark.slow
def test_generate_prints_the_targets_greedy_answer(real_pair, tmp_path):
    """From an empty cache (the target drafting for itself: its streamed layers' low-bit copies made from the
    GGUF's blocks, no de-quantized copy written; scheduler calibrated: progress on stderr), stdout is
    exactly the target's greedy answer."""
    target, _, tok = real_pair
    question = "What is the capital of France?"
    proc = run_cli("generate", question, "--max-new-tokens", "24", "--temperature", "0", EDGESPEC_CACHE=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    expected = tok.decode(greedy_reference(target, ids, 24), skip_special_tokens=True)
    assert proc.stdout == expected + "\n"
    assert "copies of the streamed layers" in proc.stderr
    copies = [p.name for p in tmp_path.iterdir() if p.name.startswith("SmolLM2") and not p.name.endswith(
        ("-index", "-tokenizer"))]
    assert "de-quantizing" not in proc.stderr and not copies, copies


def test_every_model_option_sets_a_config_field():
    """The CLI's model options are the configs' fields (or named CLI-only): none is lost on the way."""
    from dataclasses import fields

    from edgespec.base.config import DraftConfig, LoadConfig
    from edgespec.core.sampling import SamplingConfig

    configs = {c.__name__: {f.name for f in fields(c)} for c in (LoadConfig, DraftConfig, SamplingConfig)}
    options = {a.dest for a in cli.model_options()._actions}
    assert options == set(cli.OPTION_FIELDS) | cli.CLI_ONLY
    for cls, field in cli.OPTION_FIELDS.values():
        assert field in configs[cls], (cls, field)


def test_model_options_reach_the_engine(monkeypatch):
    seen = {}
    monkeypatch.setattr(Engine, "from_pretrained", classmethod(lambda cls, *a, **kw: seen.update(kw) or "engine"))
    args = cli.build_parser().parse_args(["generate", "hi", "--stream-quant", "nf4", "--draft-quant", "int8",
                                          "--resident-layers", "3", "--link-delay", "0.01",
                                          "--draft-temperature", "0.5", "--tree-scores", "draft"])
    assert cli.make_engine(args) == "engine"
    assert seen["draft_temperature"] == 0.5 and seen["tree_scores"] == "draft"
    assert seen["stream_quant"] == "nf4" and seen["draft_quant"] == "int8"
    assert seen["resident_layers"] == 3 and seen["link_delay"] == 0.01


@pytest.mark.slow
def test_int8_streamed_target_answers_as_that_target(real_pair):
    """--stream-quant int8 on the embedded default: every streamed layer int8-encoded in host RAM; the
    engine's greedy answer is exactly the greedy answer of that (offloaded, int8) target."""
    _, _, tok = real_pair
    engine = Engine.from_pretrained(device="cpu", stream_quant="int8", budget=16, calibrate=False, progress=False)
    assert engine.offload.quantize == "int8" and engine.offload.streamed_layers > 0
    ids = engine.encode([{"role": "user", "content": "Name three rivers in Europe."}])
    out = engine.generate(ids, max_new_tokens=24, temperature=0)
    assert out.ids == greedy_reference(engine.target, ids, 24)


def test_streamed_pieces_never_show_what_a_stop_string_cuts():
    """A stop string that spans two steps' text: the piece streamed before it is complete holds back
    its start, so the pieces add up to exactly the result's text (which ends before the stop string)."""
    engine = tiny_engine(budget=1)  # one or two tokens a step
    prompt = [{"role": "user", "content": "the cat and the dog"}]
    free = list(engine.run(prompt, max_new_tokens=24, temperature=0))
    assert len(free) > 4, free
    before = "".join(free[:3])
    stop = before.split(" ")[-1] + free[3]  # the last word of the third piece, and the whole fourth
    run = engine.run(prompt, max_new_tokens=24, temperature=0, stop=[stop])
    pieces = list(run)
    assert "".join(pieces) == run.result.text and stop not in run.result.text
    assert run.result.text == before[: before.rindex(stop.split(" ")[0])] and run.result.stats.stop_reason == "stop"
