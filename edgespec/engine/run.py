"""A generation in progress: iterate a `Run` for its text as the target accepts tokens; `.result` holds
the `Generation` when it ends. It stops on an end-of-sequence token, a stop string, the tokens asked
for, the context window, or a cancel event, and says which (`stats.stop_reason`). When it ends, for
whatever reason (an exception, Ctrl-C, a closed iterator), the conversation keeps exactly the prompt
and the tokens accepted so far, and both caches are trimmed to them. Under a grammar constraint the run
carries the grammar state after its accepted tokens into each step; an answer the grammar had not
completed when the tokens ran out ends with stop reason "length" (partial, not claimed valid).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from edgespec.base.clock import WallClock
from edgespec.base.errors import InvalidArgumentError
from edgespec.base.stats import RunStats


@dataclass
class Generation:
    text: str
    ids: list[int]  # new tokens (an end-of-sequence token included, as transformers' generate does)
    stats: RunStats = field(default_factory=RunStats)
    logprobs: list | None = None  # one core.logprobs.TokenLogprob per new token, when asked for


class Run:
    """`stepper` (edgespec/engine/step.py) advances `conv` (edgespec/engine/conversation.py) from `prompt_ids`,
    each step planned by `scheduler`; `tokenizer` turns the new tokens into text (None: no text);
    `calibration` is the tree-score calibration the steps use and teach (None: raw scores); `constraint`
    the compiled grammar the answer must follow (edgespec/core/grammar.py; None: none); `logprobs` how
    many top alternatives each new token's log-probability comes with (None: no log-probabilities);
    `clock` says the run's seconds (edgespec/base/clock.py; None: the wall clock's)."""

    def __init__(self, stepper, scheduler, conv, prompt_ids: list[int], max_new_tokens: int, sampler, *,
                 tokenizer=None, eos_ids=frozenset(), max_context: int, stop: list[str] | None = None,
                 calibration=None, constraint=None, logprobs: int | None = None, clock=None):
        if max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.stepper, self.scheduler, self.conv = stepper, scheduler, conv
        self.prompt_ids, self.max_new = prompt_ids, max_new_tokens
        self.sampler, self.calibration = sampler, calibration
        self.stop = [stop] if isinstance(stop, str) else list(stop or [])
        self.tokenizer, self.eos_ids, self.max_context = tokenizer, eos_ids, max_context
        self.constraint, self.top_logprobs = constraint, logprobs
        self.clock = clock or WallClock()
        self.grammar = None  # the grammar state after the accepted tokens (set when the run starts)
        self.logprobs: list | None = [] if logprobs is not None else None
        self.new: list[int] = []
        self.stats = RunStats()
        self.result: Generation | None = None
        self.text = ""  # the text so far, cut at a stop string
        self._sent = 0  # characters of `text` already yielded
        self.cancel: threading.Event | None = None  # once set, the run ends before its next step ("cancelled")

    def __iter__(self) -> Iterator[str]:
        self.conv.sync(self.prompt_ids)
        self.grammar = self.constraint.start() if self.constraint is not None else None
        start = time.perf_counter()
        try:
            yield from self._loop()
            self.text = whole_text(self.text)
            if self._sent < len(self.text):  # held back as a possible stop string's start: it was not one
                yield self.text[self._sent:]
                self._sent = len(self.text)
        except KeyboardInterrupt:
            self.stats.stop_reason = "interrupted"
            raise
        finally:
            self._finish(time.perf_counter() - start)

    def _finish(self, seconds: float) -> None:
        self.conv.keep(len(self.prompt_ids) + len(self.new))
        self.stats.wall_time = self.clock.run_time(seconds, self.stats.steps)
        self.stats.new_tokens = len(self.new)
        self.text = whole_text(self.text)
        calib = self.calibration
        self.stats.hit_rates = calib.state() if calib is not None and calib.trees else None
        self.result = Generation(self.text, list(self.new), self.stats, self.logprobs)

    def _loop(self) -> Iterator[str]:
        while True:
            if self.cancel is not None and self.cancel.is_set():
                self.stats.stop_reason = "cancelled"
                return
            done = self.stepper.advance(self.conv, self.scheduler, self.max_new - len(self.new), self.max_context,
                                        self.sampler, self.calibration, self.grammar, self.top_logprobs,
                                        after=self._take)
            if done is None:
                self.stats.stop_reason = "length" if len(self.new) >= self.max_new else "context"
                return
            self._record(done[1])  # the step's stats whole: its rest is timed after the run took the step
            piece, finished = done[2]
            if piece:
                yield piece
            if finished:
                return

    def _take(self, verdict, step) -> tuple[str, bool]:
        """A step's outcome into the run: its tokens, text and stop strings; (the text piece to yield,
        whether the run ends here). The stepper times it as the step's "text" part."""
        self.grammar = verdict.grammar
        ended = self._commit(verdict.tokens, verdict.logprobs)
        stopped = self._decode()
        return self._piece(final=ended or stopped), ended or stopped

    def _commit(self, tokens: list[int], logprobs=None) -> bool:
        """Append accepted tokens (and their log-probabilities) up to EOS / max_new_tokens; True when
        generation must stop."""
        for i, tok in enumerate(tokens):
            self.new.append(tok)
            if self.logprobs is not None:
                self.logprobs.append(logprobs[i])
            if tok in self.eos_ids:
                self.stats.stop_reason = "eos"
                return True
            if len(self.new) >= self.max_new:
                self.stats.stop_reason = "length"
                return True
        return False

    def _decode(self) -> bool:
        """Bring `text` up to the new tokens; True when a stop string was reached (text cut before it)."""
        if self.tokenizer is None:
            return False
        text = self.tokenizer.decode([t for t in self.new if t not in self.eos_ids], skip_special_tokens=True)
        hit = min((i for i in (text.find(s) for s in self.stop if s) if i >= 0), default=-1)
        if hit >= 0:
            self.text = text[:hit]
            self.stats.stop_reason = "stop"
            self._drop_after_stop()
            return True
        self.text = text
        return False

    def _piece(self, final: bool) -> str:
        """The text not yet yielded, less what may still turn out to be a stop string's start (unless
        the run ends here) and a trailing incomplete multi-byte character."""
        if final:
            self.text = whole_text(self.text)
        end = len(self.text)
        if not final:
            end -= _stop_prefix(self.text, self.stop)
            if self.text[:end].endswith("\ufffd"):
                return ""
        piece = self.text[self._sent:end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return piece

    def _record(self, step) -> None:
        """The step's stats with `accepted` = the tokens this answer kept of it (not those past an end of
        sequence, the tokens asked for or a stop string, which may also cut earlier steps' tokens): the
        steps' `accepted` add up to the new tokens. The first step, which takes the prompt's uncached
        tokens into both caches, is the prefill."""
        steps = self.stats.steps
        kept = len(self.new) - sum(s.accepted for s in steps)
        for i in range(len(steps) - 1, -1, -1):  # a stop string cut into tokens earlier steps kept
            if kept >= 0:
                break
            cut = min(steps[i].accepted, -kept)
            steps[i], kept = replace(steps[i], accepted=steps[i].accepted - cut), kept + cut
        steps.append(replace(step, accepted=max(kept, 0)))  # (the scheduler observed the step as verified)
        if len(steps) == 1:
            self.stats.prefill_time = step.step_time

    def _drop_after_stop(self) -> None:
        """Keep the fewest tokens whose text reaches past `text` (the one completing the stop string)."""
        for n in range(1, len(self.new) + 1):
            if len(self.tokenizer.decode(self.new[:n], skip_special_tokens=True)) > len(self.text):
                del self.new[n:]
                if self.logprobs is not None:
                    del self.logprobs[n:]
                return


def whole_text(text: str) -> str:
    """The text without a trailing U+FFFD: the replacement for a multi-byte character whose last bytes
    the answer ended before (held back while streaming, dropped when the answer ends)."""
    return text.rstrip("\ufffd")


def _stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (0 when none does)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
