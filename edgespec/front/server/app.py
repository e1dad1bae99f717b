"""The HTTP side: FastAPI routes over one generation worker, and running them under uvicorn.

    POST /v1/chat/completions   the target's chat template; stream: true → chat.completion.chunk events
    POST /v1/completions        a raw prompt
    GET  /v1/models             the served model (and its drafter)
    GET  /health                {"status": "ok"}, never behind the API key
    GET  /metrics               Prometheus text

Handlers only parse, queue and relay: the worker thread runs the engine, so the event loop never
waits on a generation. A client that disconnects (while queued, waiting or streaming) cancels its job.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import socket
import time
import weakref
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import StarletteHTTPException
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event

from edgespec.base import checks
from edgespec.base.errors import EdgespecError, InvalidArgumentError
from edgespec.engine.face import FrontEnd
from edgespec.front.server.metrics import Metrics
from edgespec.front.server.protocol import SAMPLER_FIELDS, ApiError, ChatRequest, CompletionRequest, check
from edgespec.front.server.answer import Answer
from edgespec.front.server import body
from edgespec.front.server.structured import Structure, plan, render
from edgespec.front.server.worker import Job, Worker


@dataclass
class ServerConfig:
    model_id: str = "edgespec"  # the name /v1/models lists and requests may ask for
    drafter_id: str | None = None
    api_key: str | None = None  # set: /v1/* and /metrics need "Authorization: Bearer <key>"
    max_body_bytes: int = 4 << 20
    max_queue: int = 256  # waiting requests beyond this get a 503
    max_tokens: int | None = None  # a request without max_tokens: this, else up to the context window
    defaults: dict = field(default_factory=dict)  # sampler settings (SAMPLER_FIELDS) for requests that leave them out
    system: str | None = None  # system message for conversations that bring none

    def __post_init__(self):
        if self.max_tokens is not None:
            checks.integer("max_tokens", self.max_tokens, lo=1, fix=" (None: up to the context window)")
        checks.integer("max_body_bytes", self.max_body_bytes, lo=1024)
        checks.integer("max_queue", self.max_queue, lo=1)
        if unknown := sorted(set(self.defaults) - set(SAMPLER_FIELDS)):
            raise InvalidArgumentError(f"server default {unknown[0]!r} is not a sampling setting: the settings are "
                                       f"{list(SAMPLER_FIELDS)}")


def create_app(engine: FrontEnd, config: ServerConfig | None = None) -> FastAPI:
    """A FastAPI app serving `engine` (ready, loaded); its worker thread runs while the app is served."""
    config = config or ServerConfig()
    metrics = Metrics()
    worker = Worker(engine, metrics, config.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="edgespec", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.metrics, app.state.config = worker, metrics, config
    _error_handlers(app)
    auth = [Depends(_key_check(config.api_key))]

    _status_routes(app, engine, worker, metrics, config, auth)

    def checked(raw: bytes, chat: bool):
        req = check(ChatRequest if chat else CompletionRequest, body.parse_body(raw))
        if req.model not in (None, config.model_id):
            raise ApiError(404, f"model {req.model!r} is not served here: this server serves {config.model_id!r} "
                                "(GET /v1/models lists it)", "model", "model_not_found")
        return req

    async def answer(request: Request, chat: bool):
        try:
            req = checked(await body.read(request, config.max_body_bytes), chat)
            shape = plan(req, engine.tokenizer) if chat else Structure()
            prompt = req.prompt(config.system) if chat else req.prompt
            if shape.tools is not None:
                prompt = _rendered(engine.tokenizer, prompt, shape.tools)
        except ApiError:
            metrics.finished("rejected")
            raise
        sampling = {**config.defaults, **req.sampling()}
        job = Job(prompt, req.max_new_tokens() or config.max_tokens, sampling, req.stop, asyncio.get_running_loop(),
                  param="messages" if chat else "prompt", grammar=shape.grammar, logprobs=shape.logprobs,
                  calls=shape.names if shape.calls else None, grammar_param=shape.param)
        return await _relay(request, job, worker, Answer(chat, config.model_id, req.include_usage()), req.stream)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request):
        return await answer(request, chat=True)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request):
        return await answer(request, chat=False)

    return app


def _rendered(tokenizer, messages: list[dict], tools: list) -> list[int]:
    """The conversation and its tools through the model's chat template (its own errors as a 400)."""
    try:
        return render(tokenizer, messages, tools)
    except Exception as e:  # noqa: BLE001 - a template that cannot render these messages: the client's to fix
        raise ApiError(400, f"the model's chat template could not render these messages with tools: "
                            f"{type(e).__name__}: {e}", "messages") from None


def _status_routes(app: FastAPI, engine: FrontEnd, worker: Worker, metrics: Metrics, config: ServerConfig, auth) -> None:
    """GET /health (open), /metrics and /v1/models (behind the key, if any)."""
    started = int(time.time())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_id, "queue_length": worker.queue_length}

    @app.get("/metrics", dependencies=auth)
    async def prometheus():
        text = metrics.render(worker.queue_length, worker.busy)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=auth)
    async def models():
        info = {"target": config.model_id, "drafter": config.drafter_id, "context_window": engine.max_context}
        if engine.self_draft is not None:  # the target drafts for itself: its layout and plan
            info["self_draft"] = engine.self_draft.describe()
        return {"object": "list", "data": [{"id": config.model_id, "object": "model", "created": started,
                                            "owned_by": "edgespec", "edgespec": info}]}


# ---- one request ---------------------------------------------------------------------------------
async def _relay(request: Request, job: Job, worker: Worker, ans: Answer, stream: bool) -> Response:
    """Queue the job; answer as soon as it starts (stream) or ends (whole); cancel it if the client leaves."""
    worker.submit(job)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        kind, value = await _next(job, gone)
        if kind == "error":
            raise value
        prompt_tokens = value
        if stream:
            events = _events(job, ans, prompt_tokens)
            weakref.finalize(events, job.cancel.set)  # also if the stream never starts (the client left at once)
            return EventSourceResponse(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        while (event := await _next(job, gone))[0] == "piece":
            pass
        kind, value = event
        if kind == "error":
            raise value
        return JSONResponse(ans.whole(value.text, value.stop_reason, prompt_tokens, len(value.gen.ids),
                                      value.tool_calls, value.logprobs))
    except _ClientGone:
        return Response(status_code=499)  # nobody reads it
    finally:
        gone.cancel()
        if not stream:
            job.cancel.set()  # (a no-op once the job is done)


class _ClientGone(Exception):
    pass


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: receive() only reports that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next(job: Job, gone: asyncio.Future):
    get = asyncio.ensure_future(job.events.get())
    done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    job.cancel.set()
    raise _ClientGone


async def _events(job: Job, ans: Answer, prompt_tokens: int):
    """The server-sent events of one streamed answer; leaving early (a disconnect) cancels the job."""
    try:
        if ans.chat:
            yield _sse(ans.chunk(role=True))
        while True:
            kind, value = await job.events.get()
            if kind == "piece":
                yield _sse(ans.chunk(value[0], logprobs=value[1]))
                continue
            if kind == "error":
                yield _sse(value.body())
            else:
                if job.calls is not None and (value.text or value.tool_calls):  # held until parsed
                    yield _sse(ans.chunk(value.text, tool_calls=value.tool_calls, logprobs=value.logprobs))
                yield _sse(ans.chunk(stop_reason=value.stop_reason))
                if ans.include_usage:
                    yield _sse(ans.usage_chunk(prompt_tokens, len(value.gen.ids)))
            yield format_sse_event(data_str="[DONE]")
            return
    finally:
        job.cancel.set()


def _sse(obj: dict) -> bytes:
    return format_sse_event(data_str=json.dumps(obj, ensure_ascii=False))


# ---- errors and the key ----------------------------------------------------------------------------
def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)  # (the router's 404 and 405 too)
    async def http_error(_request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(err.status_code, str(err.detail), kind=kind).body(), status_code=err.status_code,
                            headers=getattr(err, "headers", None))


def _key_check(api_key: str | None):
    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                                "server's --api-key", code="invalid_api_key")

    return require_key


# ---- names and addresses ----
def served_name(spec: str | None) -> str:
    """The model name /v1/models shows for a --target: the embedded default's, a file's or folder's
    name, or the hub id."""
    from pathlib import Path

    from edgespec.loading.resolve import EMBEDDED, EMBEDDED_FILE

    if spec in (None, "", EMBEDDED):
        return EMBEDDED_FILE.split(".")[0]
    path = Path(spec)
    if path.suffix == ".gguf":
        return path.stem
    return path.name if path.exists() else spec


# ---- serving -------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The one-line warning for a server reachable from other machines without a key."""
    if is_loopback(host) or api_key:
        return None
    return (f"edgespec: warning: serving on {host} without an API key: anyone who can reach this machine "
            "can use the model (set --api-key or EDGESPEC_API_KEY, or bind to 127.0.0.1)")


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to the address (port 0: any free port), or an EdgespecError naming it; it listens
    once served (while the models load, clients are refused rather than left waiting)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise EdgespecError(f"port must be an integer from 0 to 65535 (0: any free port), got {port!r}: choose "
                            "another --port")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise EdgespecError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port "
                            "or --host") from None
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app: FastAPI, log_level: str = "info"):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5))


def serve(engine: FrontEnd, config: ServerConfig, host: str = "127.0.0.1", port: int = 8080, sock: socket.socket | None = None,
          log_level: str = "info") -> int:
    """Serve until Ctrl-C (the `edgespec serve` command); `sock`: already bound to host:port."""
    import sys

    sock = sock or bind(host, port)
    sock.listen(128)  # from here connections wait for uvicorn instead of being refused
    if warning := exposure_warning(host, config.api_key):
        print(warning, file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    print(f"edgespec: serving {config.model_id} at http://{shown}:{sock.getsockname()[1]}/v1 (OpenAI API); "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    uvicorn_server(create_app(engine, config), log_level).run(sockets=[sock])
    return 0
