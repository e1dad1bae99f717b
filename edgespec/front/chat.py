"""Terminal chat over an Engine: history, slash commands, streamed answers.

`ChatSession` holds the messages and the engine and knows the commands; it reads nothing itself,
so tests drive it with `session.handle(line)`. `repl()` feeds it lines from a terminal or a pipe.
The engine keeps the conversation's KV cache and reuses the common prefix each turn, so a turn
only pays for its new tokens.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

from edgespec.base import checks
from edgespec.base.errors import EdgespecError, InvalidArgumentError
from edgespec.base.stats import Totals
from edgespec.core.sampling import SamplingConfig
from edgespec.engine.face import FrontEnd

HELP = """commands:
  /stats       last answer's and the session's speed, the scheduler's and the offload's stats
  /reset       forget the conversation
  /save PATH   write the transcript (JSON list of messages)
  /load PATH   replace the conversation with a saved transcript
  /help        this text
  /exit        quit (also Ctrl-D, or Ctrl-C twice at the prompt; Ctrl-C once stops an answer)"""


class ChatSession:
    def __init__(self, engine: FrontEnd, *, system: str | None = None, max_new_tokens: int = 256,
                 sampling: SamplingConfig | Mapping | None = None, seed: int | None = None, out=None, err=None,
                 prefix: str = ""):
        """`sampling`: the sampling settings given (a SamplingConfig, or a mapping of some of its fields:
        temperature, top_p, top_k, min_p, repetition_penalty); the others are the engine's defaults
        (`engine.sampling`)."""
        self.engine, self.system = engine, system
        self.max_new_tokens, self.seed, self.sampling = max_new_tokens, seed, sampling
        self.no_tree_said = False  # the scheduler's "no speculation here" line is said once
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.prefix = prefix  # printed before each answer ("assistant: " when not on a terminal)
        self.messages: list[dict] = []
        self.last = None  # RunStats of the last answer
        self.totals = Totals()  # over the session's answers
        self.reset()

    # ---- input -------------------------------------------------------------------------------
    def handle(self, line: str) -> bool:
        """One line from the user: a /command or a question. Returns False when the chat should end."""
        line = line.strip()
        if not line:
            return True
        if line.startswith("/"):
            return self.command(line)
        try:
            self.ask(line)
        except KeyboardInterrupt:  # a second Ctrl-C while the turn was being wound up: the turn is kept
            self.out.write("\n")
        return True

    def command(self, line: str) -> bool:
        name, _, arg = line.partition(" ")
        actions = {"/stats": lambda: self.print(self.stats_text()), "/reset": self.reset,
                   "/help": lambda: self.print(HELP), "/save": lambda: self.save(arg.strip()),
                   "/load": lambda: self.load(arg.strip())}
        if name in ("/exit", "/quit"):
            return False
        if name not in actions:
            self.error(f"unknown command {name}: /help lists the commands")
            return True
        try:
            actions[name]()
        except EdgespecError as e:
            self.error(str(e))
        return True

    # ---- a turn ------------------------------------------------------------------------------
    def ask(self, text: str) -> str | None:
        """Stream an answer to `text`. Ctrl-C (at any instant of the turn) keeps the partial answer; an
        error drops the turn (an unexpected one is named, and the chat goes on)."""
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        box: dict = {}
        try:
            self._turn(pieces, box)
        except KeyboardInterrupt:
            box["interrupted"] = True
        except Exception as e:  # noqa: BLE001 — the engine keeps its conversation consistent whatever fails
            box["error"] = e
        finally:  # the history stays user/assistant pairs whatever happened (and wherever a Ctrl-C fell)
            if "error" in box:
                self.messages.pop()
            else:
                self.messages.append({"role": "assistant", "content": "".join(pieces)})
        if "error" in box:
            e = box["error"]
            self.out.write("\n")
            self.error(str(e) if isinstance(e, EdgespecError) else f"internal error: {type(e).__name__}: {e}")
            return None
        self.out.write(" [interrupted]\n" if "interrupted" in box else "\n")
        self.out.flush()
        self._after(box.get("run"))
        return "".join(pieces)

    def _after(self, run) -> None:
        """Record the answer's stats and say what the user should know about it."""
        stats = run.result.stats if run is not None and run.result is not None else None
        self._record(stats)
        self._say_no_tree()
        if stats is not None and stats.stop_reason == "context":  # say why the answer ends early
            self.err.write(f"edgespec: the answer stopped at the context window ({self.engine.max_context} tokens): "
                           "/reset starts a new conversation\n")

    def _turn(self, pieces: list[str], box: dict) -> None:
        self.out.write(self.prefix)
        self.out.flush()
        box["run"] = run = self.engine.run(self.messages, self.max_new_tokens, seed=self.seed, sampling=self.sampling)
        self._stream(run, pieces)

    def _say_no_tree(self) -> None:
        reason = self.engine.scheduler.no_tree_reason()
        if reason and not self.no_tree_said:
            self.err.write(f"edgespec: {reason}\n")
            self.err.flush()
            self.no_tree_said = True

    def _stream(self, run, pieces: list[str]) -> None:
        it = iter(run)
        try:
            for piece in it:
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
        finally:
            it.close()  # ends the run (Ctrl-C, an error): the engine keeps the tokens accepted so far

    def _record(self, stats) -> None:
        if stats is None:
            return
        self.last = stats
        self.totals.add(stats)

    # ---- commands ----------------------------------------------------------------------------
    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.last = None
        self.engine.reset()

    def save(self, path: str) -> None:
        if not path:
            raise InvalidArgumentError("/save needs a file name: /save chat.json")
        try:
            Path(path).expanduser().write_text(json.dumps(self.messages, indent=2, ensure_ascii=False) + "\n")
        except OSError as e:
            raise EdgespecError(f"could not write {path}: {e.strerror}") from None
        self.print(f"saved {len(self.messages)} messages to {path}")

    def load(self, path: str) -> None:
        if not path:
            raise InvalidArgumentError("/load needs a file name: /load chat.json")
        self.messages = read_transcript(path)
        self.last = None
        self.print(f"loaded {len(self.messages)} messages from {path}")

    def stats_text(self) -> str:
        lines = [self._last_line(), self._session_line(),
                 "sampling: " + self.engine.sampling_for(self.sampling).describe()]
        lines.append("scheduler: " + _flat(self.engine.scheduler.stats()))
        if self.engine.offload is not None:
            lines.append(offload_line(self.engine.offload))
        if self.engine.self_draft is not None:
            lines.append(self.engine.self_draft.line())
        return "\n".join(lines)

    def _last_line(self) -> str:
        s = self.last
        if s is None:
            return "last answer: none yet"
        return f"last answer: {Totals.of([s]).line()}, stop: {s.stop_reason or '-'}; sampling: {s.sampling or '-'}"

    def _session_line(self) -> str:
        return f"session: {self.totals.answers} answers, {self.totals.line()}"

    # ---- output ------------------------------------------------------------------------------
    def print(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def error(self, text: str) -> None:
        self.err.write(f"edgespec: error: {text}\n")
        self.err.flush()


def read_transcript(path: str) -> list[dict]:
    """A saved transcript: a JSON list of {"role", "content"} messages."""
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except OSError as e:
        raise EdgespecError(f"could not read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise EdgespecError(f"{path} is not JSON ({e.msg}, line {e.lineno}): give a file written by /save") from None
    ok = isinstance(data, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in data)
    if not ok:
        raise EdgespecError(f"{path} is not a transcript: expected a JSON list of {{\"role\", \"content\"}} messages")
    try:  # roles a chat template reads, text it can encode (what a turn would refuse later)
        return [{"role": m["role"], "content": m["content"]} for m in checks.messages(data, path)]
    except InvalidArgumentError as e:
        raise EdgespecError(f"{path} is not a transcript: {e}") from None


def offload_line(handle) -> str:
    total = handle.stats.total
    layers = max(total.layers, 1)
    return (f"offload: {handle.streamed_layers} streamed / {handle.resident_layers} resident layers, "
            f"{total.passes} passes, {total.bytes / 1e9:.2f} GB streamed, per layer: transfer "
            f"{1e3 * total.transfer_time / layers:.2f} ms, wait {1e3 * total.wait_time / layers:.2f} ms; "
            f"compute {total.compute_time:.2f} s, overlap {total.overlap:.2f}")


def _flat(d: dict) -> str:
    """Scalars of a stats dict as `key value` pairs (nested dicts flattened as key.sub)."""
    parts = []
    for k, v in d.items():
        if isinstance(v, dict):
            parts += [f"{k}.{k2} {_fmt(v2)}" for k2, v2 in v.items() if not isinstance(v2, (dict, list))]
        elif not isinstance(v, list):
            parts.append(f"{k} {_fmt(v)}")
    return ", ".join(parts)


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def repl(session: ChatSession, stdin=None, read=None) -> int:
    """Read lines until /exit or EOF: a prompt on a terminal, plain lines from a pipe (`read`: the line
    reader, default input("> ") on a terminal). On a terminal a Ctrl-C at the prompt only clears the
    line — a Ctrl-C meant to stop an answer that had just ended must not end the chat and lose the
    conversation — and a second one in a row quits."""
    stdin = stdin or sys.stdin
    tty = stdin.isatty()
    if tty:
        _readline()
        session.err.write("edgespec chat: type a message, /help for commands, /exit or Ctrl-D to quit\n")
    read = read or ((lambda: input("> ")) if tty else stdin.readline)
    armed = False  # the last prompt ended in a Ctrl-C
    while True:
        try:
            line = read()
        except EOFError:
            session.out.write("\n" if tty else "")
            return 0
        except KeyboardInterrupt:
            session.out.write("\n" if tty else "")
            if armed or not tty:
                return 0
            armed = True
            session.err.write("edgespec: the conversation is kept; Ctrl-C again, Ctrl-D or /exit quits\n")
            continue
        armed = False
        if not tty and line == "":
            return 0
        if not session.handle(line):
            return 0


def _readline() -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
