"""The HTTP side of the server: FastAPI routes for the Responses API and Chat Completions.

    app = create_app(engine, model_id="gpt-oss-20b")     # an ASGI app for any ASGI server
    serve(model, model_id="gpt-oss-20b", port=8000)      # a loaded model: start the engine, run uvicorn

Safe by default: loopback only unless an API key is set, no CORS unless an origin is named,
bodies and replies bounded, every error an OpenAI error object (never a traceback or a path).
The event loop never waits on the model: jobs are read with ``job.aevents()`` and a client that
goes away cancels its job.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine
from .schemas import APIError, ChatRequest, InputItem, ResponsesRequest
from .translate import (
    ChatBuilder,
    ResponseBuilder,
    chat_to_harmony,
    responses_items,
    responses_to_harmony,
    sse,  # fmt: skip
)

log = logging.getLogger("mlx_gptoss.server")

MAX_BODY_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_TOKENS = 4096  # when a request names none (and the context allows it)
STORE_SIZE = 256  # stored responses for previous_response_id, least recently used dropped


class _Guard:
    """ASGI middleware: the API key (Bearer, compared in constant time) and the body-size limit.

    The body is read here, up to the limit, so a huge upload is refused before any parsing."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.key, self.max_body = app, api_key.encode() if api_key else None, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        if self.key is not None:
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if not auth:
                return await _send_error(send, APIError(401, "missing API key: send it as 'Authorization: Bearer KEY'",
                                                        code="missing_api_key"))  # fmt: skip
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                return await _send_error(send, APIError(401, "incorrect API key", code="invalid_api_key"))
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _send_error(send, _too_large(self.max_body))
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await _send_error(send, _too_large(self.max_body))
            if not msg.get("more_body"):
                break
        replayed = False

        async def replay():  # the body once, then the client's own messages (disconnect)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body larger than this server's limit of {limit // (1024 * 1024)} MB", code="request_too_large")


async def _send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    """The clearest error of a request that failed validation, and the field it names."""
    errors = e.errors(include_url=False)
    err = next((x for x in errors if x["type"] == "value_error"), errors[0])  # ours say what to do
    loc = [p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    msg = err["msg"].removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:  # a body nested deeper than the parser's stack is hostile, not a server fault
        raise APIError(400, "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        message, param = _validation_message(e)
        raise APIError(400, message, param=param) from None


class _Store:
    """Conversations of stored responses (for ``previous_response_id``): bounded, least recently used out."""

    def __init__(self, size: int):
        self.size, self.items = size, OrderedDict()

    def get(self, rid: str) -> list[InputItem]:
        if rid not in self.items:
            raise APIError(400, f"previous response {rid!r} not found (responses are kept in memory, the last "
                                f"{self.size}, and only with store=true)", param="previous_response_id",
                           code="previous_response_not_found")  # fmt: skip
        self.items.move_to_end(rid)
        return list(self.items[rid])

    def put(self, rid: str, items: list[InputItem]) -> None:
        self.items[rid] = items
        while len(self.items) > self.size:
            self.items.popitem(last=False)


def create_app(engine, *, model_id: str, api_key: str | None = None, cors_origin: str | None = None,
               max_tokens: int | None = None, max_body_bytes: int = MAX_BODY_BYTES, store_size: int = STORE_SIZE) -> FastAPI:  # fmt: skip
    """The ASGI app serving ``engine`` (see :mod:`mlx_gptoss.server`) as model ``model_id``.

    Args:
        engine: the model side (``Engine``): ``submit(messages, **options)`` returns a job with
            ``aevents()`` and ``cancel()``; raises ``QueueFull`` at its bound (answered 429).
        model_id: the name clients use in ``model`` and that ``/v1/models`` lists.
        api_key: when set, every /v1 request needs ``Authorization: Bearer <api_key>``.
        cors_origin: the one browser origin allowed to call the API (default: none).
        max_tokens: the most tokens one reply may have (default: half the model's context).
        max_body_bytes: larger request bodies are refused with 413.
        store_size: how many responses ``previous_response_id`` can refer to.
    """
    model = getattr(engine, "model", None)
    encoding = getattr(getattr(model, "tokenizer", None), "encoding", None)
    if max_tokens is None:  # half the context the engine's session allows, so a prompt has room too
        context = getattr(getattr(engine, "session", None), "context_size", None)
        max_tokens = context // 2 if context else DEFAULT_MAX_TOKENS
    default_tokens = min(DEFAULT_MAX_TOKENS, max_tokens)
    store = _Store(store_size)
    app = FastAPI(title="mlx-gptoss", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        what = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return JSONResponse(APIError(e.status_code, what.get(e.status_code, str(e.detail))).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")  # the details stay in the server's log
        return JSONResponse(APIError(500, "internal server error", type="server_error").body(), status_code=500)

    def check_model(name: str) -> None:
        if name != model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_id!r}", param="model",
                           code="model_not_found")  # fmt: skip

    def tokens(n: int | None, param: str) -> int:
        if n is not None and n > max_tokens:
            raise APIError(400, f"{param}: {n} exceeds this server's limit of {max_tokens} tokens", param=param)
        return n or default_tokens

    async def submit(messages: list, **options: Any):
        try:  # in a thread: rendering a long conversation takes milliseconds the event loop should not wait
            return await asyncio.to_thread(engine.submit, messages, **{k: v for k, v in options.items() if v is not None})
        except (ValueError, TypeError) as e:  # a conversation that cannot be rendered, or does not fit
            raise APIError(400, str(e)) from None
        except RuntimeError as e:  # matched by name: the app takes any engine with this contract
            if type(e).__name__ == "QueueFull":
                raise APIError(429, "the server is busy (its request queue is full); retry shortly",
                               type="rate_limit_error", code="queue_full") from None  # fmt: skip
            if type(e).__name__ == "EngineClosed":
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down") from None
            raise

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "mlx-gptoss"}]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> dict:
        check_model(name)
        return {"id": model_id, "object": "model", "created": created, "owned_by": "mlx-gptoss"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatRequest = await _parse(request, ChatRequest)
        check_model(req.model)
        n = tokens(
            req.max_completion_tokens or req.max_tokens, "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        )
        job = await submit(chat_to_harmony(req), max_tokens=n, temperature=_temp(req.temperature), top_p=req.top_p,
                     seed=req.seed, stop=[req.stop] if isinstance(req.stop, str) else req.stop)  # fmt: skip
        builder = ChatBuilder(model_id, encoding)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if not req.stream:
            reply = await _collect(request, job, builder.add)
            return builder.completion(reply)

        async def chunks() -> AsyncIterator[str]:
            yield sse([builder.start()], named=False)
            try:
                async for reply, ev in _run(job):
                    if reply is not None:
                        yield sse(builder.end(reply, include_usage), named=False)
                    else:
                        yield sse(builder.add(ev), named=False)
            except Exception as e:  # noqa: BLE001 - the stream has begun: report the failure in it
                yield sse([_stream_error(e)], named=False)
            yield "data: [DONE]\n\n"

        return _streaming(chunks())

    @app.post("/v1/responses")
    async def responses(request: Request):
        req: ResponsesRequest = await _parse(request, ResponsesRequest)
        check_model(req.model)
        n = tokens(req.max_output_tokens, "max_output_tokens")
        items = (store.get(req.previous_response_id) if req.previous_response_id else []) + responses_items(req)
        if not items:
            raise APIError(400, "input: empty, and no previous_response_id: there is nothing to answer", param="input")
        job = await submit(responses_to_harmony(req, items), max_tokens=n, temperature=_temp(req.temperature), top_p=req.top_p)
        builder = ResponseBuilder(req, model_id, encoding)

        def keep() -> None:
            if req.store:
                store.put(builder.response["id"], items + [InputItem.model_validate(o) for o in builder.response["output"]])

        if not req.stream:
            reply = await _collect(request, job, builder.add)
            builder.finish(reply)
            keep()
            return builder.response

        async def events() -> AsyncIterator[str]:
            yield sse(builder.start(), named=True)
            try:
                async for reply, ev in _run(job):
                    if reply is not None:
                        out = builder.finish(reply)
                        keep()
                        yield sse(out, named=True)
                    else:
                        yield sse(builder.add(ev), named=True)
            except Exception as e:  # noqa: BLE001 - the stream has begun: report the failure in it
                yield sse([builder.failed(_stream_error(e)["error"]["message"])], named=True)

        return _streaming(events())

    app.add_middleware(_Guard, api_key=api_key, max_body=max_body_bytes)
    if cors_origin:  # outermost, so that browsers' preflight requests are answered before the key check
        app.add_middleware(CORSMiddleware, allow_origins=[cors_origin], allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])  # fmt: skip
    return app


def _temp(t: float | None) -> float:
    return 1.0 if t is None else t  # OpenAI's default, and gpt-oss's recommended temperature


def _streaming(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _stream_error(e: Exception) -> dict:
    if isinstance(e, APIError):
        return e.body()
    if isinstance(e, ValueError):
        return APIError(400, str(e)).body()
    log.error("generation failed", exc_info=e)
    return APIError(500, "generation failed (see the server log)", type="server_error").body()


async def _run(job) -> AsyncIterator[tuple[Any, Any]]:
    """``(None, event)`` per engine event, then ``(reply, None)``; a consumer that goes away
    (a client disconnect cancels the streaming task) cancels the job."""
    finished = False
    try:
        async for ev in job.aevents():
            reply = getattr(ev, "reply", None)  # the engine's Done(reply) ends the job
            if reply is not None:
                finished = True
                yield reply, None
                return
            yield None, ev
    finally:
        if not finished:
            job.cancel()


async def _collect(request: Request, job, on_event) -> Any:
    """Run a job to its reply, feeding ``on_event``; a client that disconnects first cancels it."""

    async def consume():
        async for reply, ev in _run(job):
            if reply is not None:
                return reply
            on_event(ev)
        raise RuntimeError("the job ended without its reply")

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(consume()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            job.cancel()
            work.cancel()
    if not work.done():
        raise APIError(499, "the client closed the connection")
    try:
        return work.result()
    except ValueError as e:
        raise APIError(400, str(e)) from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def model_name(model: str) -> str:
    """The id clients use: a folder's name (never its path), or the Hugging Face repo id."""
    path = Path(model).expanduser()
    return path.name if path.exists() else model


def serve(model: Any, *, model_id: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_queue: int = 16, cors_origin: str | None = None, max_tokens: int | None = None,
          log_level: str = "info") -> None:  # fmt: skip
    """Serve a loaded ``model`` (``mlx_gptoss.load``: memory budget and adapter are chosen there) over
    HTTP as ``model_id`` until interrupted (see :func:`create_app`).

    Raises ValueError for a non-loopback ``host`` without ``api_key``."""
    import uvicorn  # the ASGI server is needed only to run the app, not to build or test it

    if not is_loopback(host) and not api_key:
        raise ValueError(f"--host {host} is reachable from other machines: set --api-key too (or serve on 127.0.0.1)")
    engine = Engine(model, max_queue=max_queue)
    try:
        app = create_app(engine, model_id=model_id, api_key=api_key, cors_origin=cors_origin, max_tokens=max_tokens)
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        engine.close()
