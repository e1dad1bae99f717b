"""One generation worker: requests queue in arrival order behind one thread that owns the engine.

The HTTP side (asyncio) never runs the engine: it submits a `Job` and reads the job's events
("started" with the prompt's token count, "piece" with text the client may see and its tokens'
log-probabilities, then "done" with a Finished answer or "error" with an ApiError), posted thread-safely onto its event loop. Setting
`job.cancel` (a client went away) ends the generation before its next step; the engine's caches
then hold the committed tokens, consistent for the next request, which reuses their common prefix.
"""
from __future__ import annotations

import asyncio
import queue
import sys
import threading
import traceback
from dataclasses import dataclass, field

from edgespec.base.errors import ContextLengthError, EdgespecError, GrammarError, NonFiniteLogitsError, OutOfMemoryError
from edgespec.engine.face import FrontEnd
from edgespec.front.server.metrics import Metrics
from edgespec.front.server.protocol import SAMPLER_FIELDS, ApiError
from edgespec.front.server.structured import logprobs_content, parse_calls


@dataclass
class Job:
    prompt: str | list[dict]  # raw text, or chat messages for the target's chat template
    max_new_tokens: int | None  # None: up to the end of the context window
    sampling: dict  # the sampling settings by SamplingConfig field, and "seed" (the rest: the engine's defaults)
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    param: str = "messages"  # the request field the prompt came from (named in its errors)
    grammar: object = None  # core.grammar.Grammar the answer follows (None: free text)
    logprobs: int | None = None  # top alternatives per token's log-probability (None: none)
    calls: list[str] | None = None  # tool names: the answer's <tool_call> blocks become tool_calls
    grammar_param: str | None = None  # the request field the grammar came from (named if it cannot compile)

    def post(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self.cancel.set()


@dataclass
class Finished:
    """A job's answer: the Generation, its content (None when it is only tool calls), the tool calls
    parsed out of it, the log-probabilities as the API's entries (None: not asked for), the stop reason."""

    gen: object
    text: str | None
    tool_calls: list
    logprobs: list | None
    stop_reason: str


class Worker:
    """The thread that runs every generation, one at a time, in submission order."""

    def __init__(self, engine: FrontEnd, metrics: Metrics, max_queue: int = 256):
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.busy = False
        self._running_cancel: threading.Event | None = None  # the generating job's cancel flag
        self.last = None  # the last run's Generation (its stats: what /metrics summarises)

    @property
    def queue_length(self) -> int:
        """Requests waiting for the engine (the one generating excluded)."""
        return self._jobs.qsize()

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._serve, name="edgespec-generate", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is queued and running, and end the thread."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
                job.post("error", ApiError(503, "the server is shutting down", kind="server_error"))
        if (running := self._running_cancel) is not None:
            running.set()
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        if self._jobs.qsize() >= self.max_queue:
            raise ApiError(503, f"the server is busy ({self.max_queue} requests waiting): retry later",
                           code="queue_full", kind="server_error")
        self._jobs.put(job)

    # ---- the thread ------------------------------------------------------------------------------
    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancel.is_set():  # its client left while it waited
                self.metrics.finished("cancelled")
                continue
            self.busy, self._running_cancel = True, job.cancel
            try:
                self._run(job)
            finally:
                self.busy, self._running_cancel = False, None

    def _run(self, job: Job) -> None:
        try:
            ids = self.engine.encode(job.prompt)
            if job.grammar is not None:  # compiled before the answer starts: a bad one is a 400, not a broken stream
                self.engine.constraint(job.grammar)
            job.post("started", len(ids))
            gen = self._generate(job, ids)
        except GrammarError as e:
            self.metrics.finished("rejected")
            job.post("error", ApiError(400, f"{job.grammar_param}: {e}", job.grammar_param, "invalid_schema"))
            return
        except EdgespecError as e:
            self.metrics.finished("error")
            job.post("error", api_error(e, job.param))
            return
        except Exception as e:  # a bug, not bad input: say so, log it, keep serving
            traceback.print_exc(file=sys.stderr)
            self.metrics.finished("error")
            job.post("error", ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error"))
            return
        self.last = gen
        self.metrics.observe(len(ids), gen.stats, self.engine.scheduler.stats())
        self.metrics.finished("cancelled" if gen.stats.stop_reason == "cancelled" else "ok")
        job.post("done", self._finished(job, gen))

    def _generate(self, job: Job, ids: list[int]):
        max_new = job.max_new_tokens or max(1, self.engine.max_context - len(ids))
        settings = dict(job.sampling)
        seed = settings.pop("seed", None)
        run = self.engine.run(ids, max_new_tokens=max_new, stop=job.stop, seed=seed, sampling=settings,
                              grammar=job.grammar, logprobs=job.logprobs)
        run.cancel = job.cancel  # checked by the engine before every step
        shown, sent = StopHoldback(job.stop), 0
        pieces = iter(run)
        try:
            for piece in pieces:
                if job.calls is None and (text := shown.feed(piece)):  # (tool calls: parsed when done)
                    lps = run.logprobs[sent:] if run.logprobs is not None else None
                    sent += len(lps or ())
                    job.post("piece", (text, self._entries(lps)))
        finally:
            pieces.close()
        gen = run.result
        if job.calls is None and (rest := shown.finish(gen.text)):
            job.post("piece", (rest, self._entries(gen.logprobs[sent:] if gen.logprobs is not None else None)))
        return gen

    def _entries(self, logprobs) -> list | None:
        return None if logprobs is None else logprobs_content(self.engine.tokenizer, logprobs)

    def _finished(self, job: Job, gen) -> Finished:
        reason, text, calls = gen.stats.stop_reason, gen.text, []
        if job.calls is not None:
            tok = self.engine.tokenizer
            full = tok.decode([t for t in gen.ids if t not in self.engine.eos_ids], skip_special_tokens=False)
            content, calls = parse_calls(full, job.calls)
            text = content if calls else text
            reason = "tool_calls" if calls and reason == "eos" else reason
        return Finished(gen, text, calls, self._entries(gen.logprobs), reason)


class StopHoldback:
    """The part of a growing text a stream may show: a tail that could still become a stop string is
    held back (the engine cuts the answer where a stop string begins), and `finish` sends the rest of
    the final text, so the pieces always add up to exactly the answer."""

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.seen, self.sent = "", 0

    def feed(self, piece: str) -> str:
        self.seen += piece
        safe = len(self.seen) - self._open_tail(self.seen)
        out = self.seen[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out

    def finish(self, final: str) -> str:
        out = final[self.sent:]
        self.sent = len(final)
        return out

    def _open_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


def api_error(err: EdgespecError, param: str | None = None) -> ApiError:
    """An engine error as an HTTP error: bad input is a 400 naming the prompt's field."""
    if isinstance(err, ContextLengthError):
        return ApiError(400, str(err), param, "context_length_exceeded")
    if isinstance(err, OutOfMemoryError):
        return ApiError(503, str(err), None, "out_of_memory", kind="server_error")
    if isinstance(err, NonFiniteLogitsError):  # the model's fault, not the request's
        return ApiError(500, str(err), None, "non_finite_logits", kind="server_error")
    msg, arg = str(err), getattr(err, "argument", None)  # (InvalidArgumentError names it)
    if arg == "prompt":
        return ApiError(400, msg, param)
    named = arg or next((f for f in SAMPLER_FIELDS if msg.startswith(f)), None)  # "top_p must be in (0, 1], got 2"
    return ApiError(400, msg, named or (param if "prompt" in msg.lower() else None))

