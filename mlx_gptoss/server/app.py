"""The HTTP side of the server: FastAPI routes for the Responses API and Chat Completions.

    app = create_app(engine, model_id="gpt-oss-20b")     # an ASGI app for any ASGI server
    serve(model, model_id="gpt-oss-20b", port=8000)      # a loaded model: start the engine, run uvicorn

Safe by default: loopback only unless an API key is set; only loopback Host names answered (a
web page cannot reach the server through DNS rebinding) and only bodies declared as JSON (a web
page cannot post a form or text/plain to it); no CORS unless an origin is named (``*`` only with
a key); bodies and replies bounded; every error an OpenAI error object (never a traceback or a path).
The event loop never waits on the model: jobs are read with ``job.aevents()`` and a client that
goes away cancels its job.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..memory import GB
from .engine import Engine
from .schemas import APIError, ChatRequest, InputItem, ResponsesRequest
from .translate import (
    ChatBuilder,
    ResponseBuilder,
    chat_texts,
    chat_to_harmony,
    check_cost,
    responses_items,
    responses_texts,
    responses_to_harmony,
    sse,  # fmt: skip
)

log = logging.getLogger("mlx_gptoss.server")

MAX_BODY_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_TOKENS = 4096  # when a request names none (and the context allows it)
STORE_SIZE = 256  # stored responses for previous_response_id, least recently used dropped
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # the Host names always answered (any port)
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?)(:[0-9]{1,5})?")  # name or IP (v6 in brackets), port


def _host_name(host: str) -> str:
    """A Host header's (or an --allowed-host value's) name: lower case, port and final dot dropped."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    try:
        return f"[{ipaddress.IPv6Address(host)}]"  # an IPv6 address given without brackets
    except ValueError:
        pass
    return host.rsplit(":", 1)[0].removesuffix(".") if ":" in host else host.removesuffix(".")


def check_exposure(*, api_key: str | None, cors_origin: str | None = None, allowed_hosts: Iterable[str] = ()) -> list[str]:
    """The allowed Host names (normalized; ``["*"]`` for any), refusing what would let any web page
    use a server without a key: ``--cors-origin '*'`` and ``--allowed-host '*'``. ValueError naming
    the option."""
    if isinstance(allowed_hosts, str):
        allowed_hosts = [allowed_hosts]
    names = []
    for value in allowed_hosts:
        name = _host_name(value) if isinstance(value, str) else ""
        raw = value.strip().lower() if isinstance(value, str) else ""
        if name != "*" and not (_HOST.fullmatch(raw) or (name.startswith("[") and not raw.startswith("["))):  # or bare IPv6
            raise ValueError(f"--allowed-host {value!r}: an allowed host is a name or an IP address (e.g. box.local, "
                             f"192.168.1.5), without a scheme, path or space")  # fmt: skip
        names.append(name)
    if not api_key and "*" in names:
        raise ValueError("--allowed-host '*' lets any web page reach this server through DNS rebinding: set --api-key too, "
                         "or name the hosts")  # fmt: skip
    if not api_key and cors_origin == "*":
        raise ValueError("--cors-origin '*' lets any web page call this server: set --api-key too, or name the one origin "
                         "allowed (e.g. --cors-origin http://localhost:3000)")  # fmt: skip
    return ["*"] if "*" in names else list(dict.fromkeys([*LOOPBACK_HOSTS, *names]))


class _Guard:
    """ASGI middleware: the Host name, the API key (Bearer, compared in constant time), the media
    type (JSON only) and the body-size limit; ``/health`` is open.

    The Host check stops DNS rebinding (a page whose name resolves to 127.0.0.1 sends its own
    name); JSON only stops cross-site form and text/plain posts, which browsers send without a
    CORS preflight. The body is read here, up to the limit, so a huge upload is refused before any parsing."""

    def __init__(self, app, api_key: str | None, max_body: int, allowed_hosts: list[str]):
        self.app, self.key, self.max_body = app, api_key.encode() if api_key else None, max_body
        self.hosts = None if "*" in allowed_hosts else set(allowed_hosts)

    def _foreign_host(self, headers: dict) -> APIError | None:
        host = headers.get(b"host")
        if self.hosts is None or host is None:  # no Host at all: not a browser (they always send it)
            return None
        name = _host_name(host.decode("latin-1"))
        if name in self.hosts:
            return None
        return APIError(403, f"the Host {name!r} is not one this server answers to ({', '.join(sorted(self.hosts))}); "
                             f"start it with --allowed-host {name} to allow it", code="host_not_allowed")  # fmt: skip

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        refused = self._foreign_host(headers)
        if refused is not None:
            return await _send_error(send, refused)
        if scope["method"] == "OPTIONS":  # a preflight the CORS middleware did not answer: the app says 405
            return await self.app(scope, receive, send)
        if self.key is not None:
            auth = headers.get(b"authorization", b"")
            if not auth:
                return await _send_error(send, APIError(401, "missing API key: send it as 'Authorization: Bearer KEY'",
                                                        code="missing_api_key"))  # fmt: skip
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                return await _send_error(send, APIError(401, "incorrect API key", code="invalid_api_key"))
        if scope["method"] in ("POST", "PUT", "PATCH"):
            ctype = headers.get(b"content-type", b"").decode("latin-1")
            if ctype.split(";")[0].strip().lower() != "application/json":
                got = f"Content-Type {ctype!r}" if ctype else "no Content-Type"
                return await _send_error(send, APIError(415, f"the request body must be JSON sent as Content-Type: "
                                                             f"application/json ({got} was sent)",
                                                        code="unsupported_media_type"))  # fmt: skip
        length = headers.get(b"content-length")
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


class _CORS(CORSMiddleware):
    """Starlette's CORS middleware, with a refused preflight answered as an OpenAI error object
    (Starlette answers plain text) that says what was refused."""

    def preflight_response(self, request_headers):
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        origin, method = request_headers["origin"], request_headers["access-control-request-method"]
        if not self.is_allowed_origin(origin=origin):
            why = f"the origin {origin!r} may not call this server (allowed: {', '.join(self.allow_origins)})"
        elif method not in self.allow_methods:
            why = f"the method {method!r} is not allowed (allowed: {', '.join(self.allow_methods)})"
        else:
            why = f"the headers {request_headers.get('access-control-request-headers')!r} are not allowed " \
                  f"(allowed: {', '.join(sorted(self.allow_headers))})"  # fmt: skip
        keep = {k: v for k, v in response.headers.items() if k.lower() not in ("content-type", "content-length")}
        return JSONResponse(APIError(400, f"CORS preflight refused: {why}", code="cors_refused").body(), status_code=400,
                            headers=keep)  # fmt: skip


_BRANCH_TAGS = {"str", "int", "float", "bool", "dict", "list"}  # how pydantic names a union's branches in ``loc``
_ACCEPTS = {"string_type": "a string", "list_type": "a list", "dict_type": "an object", "model_type": "an object",
            "model_attributes_type": "an object", "int_type": "an integer", "int_parsing": "an integer",
            "float_type": "a number", "float_parsing": "a number", "bool_type": "a boolean", "bool_parsing": "a boolean"}  # fmt: skip


def _fields(loc: tuple) -> list:
    """An error's location without the union-branch tags pydantic puts in it ("str", "list[...]", "InputItem")."""
    return [p for p in loc if not (isinstance(p, str) and (p in _BRANCH_TAGS or "[" in p or p.startswith("function-")
                                                           or p[:1].isupper()))]  # fmt: skip


def _path(parts: Iterable) -> str | None:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or None


def _json_kind(value: Any) -> str:
    kinds = ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "a list"), (dict, "an object"))
    return next((name for t, name in kinds if isinstance(value, t)), "null")


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    """The clearest error of a request that failed validation, and the field it names.

    Ours (value errors) say what to do. Otherwise a union reports one error per branch, including
    the branches of other JSON types ("input.str: Input should be a valid string" for a list): the
    deepest field is where the value sent went wrong, and its branches together say what is accepted."""
    errors = e.errors(include_url=False)
    ours = [x for x in errors if x["type"] == "value_error"]
    if ours:
        param, msg = _path(_fields(ours[0]["loc"])), ours[0]["msg"].removeprefix("Value error, ")
        return (f"{param}: {msg}" if param else msg), param
    deepest = max(len(_fields(x["loc"])) for x in errors)
    at = [x for x in errors if len(_fields(x["loc"])) == deepest]
    param = _path(_fields(at[0]["loc"]))
    at = [x for x in at if _path(_fields(x["loc"])) == param]
    if len(at) == 1:
        msg = at[0]["msg"]
    else:
        accepted = list(dict.fromkeys(_ACCEPTS.get(x["type"], x["msg"].removeprefix("Input should be ")) for x in at))
        sep = ", or " if any(" or " in a for a in accepted) else " or "
        msg = f"must be {sep.join(accepted)} (got {_json_kind(at[0]['input'])})"
    return (f"{param}: {msg}" if param else msg), param


def _lone_surrogate(body: Any) -> APIError | None:
    """A string of the body holding half a UTF-16 pair (JSON lets ``"\\ud800"`` through; harmony's
    renderer cannot take it), as a 400 naming its field."""
    stack: list[tuple[tuple, Any]] = [((), body)]
    while stack:  # not recursive: the body may be nested as deep as the JSON parser allowed
        parts, value = stack.pop()
        texts: list[tuple[str, str]] = []
        if isinstance(value, str):
            texts = [(value, "the text")]
        elif isinstance(value, dict):
            texts = [(k, f"the key {k!r}") for k in value]
        for text, what in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                param = _path(parts) or "the body"
                return APIError(400, f"{param}: {what} holds a lone UTF-16 surrogate (U+{ord(text[err.start]):04X} at character "
                                     f"{err.start}), which is not a character: send valid Unicode (a character beyond "
                                     f"U+FFFF as a pair of \\u escapes, or as UTF-8)", param=_path(parts))  # fmt: skip
        if isinstance(value, dict):
            stack.extend(((*parts, k), v) for k, v in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend(((*parts, i), v) for i, v in reversed(list(enumerate(value))))
    return None


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:  # a body nested deeper than the parser's stack is hostile, not a server fault
        raise APIError(400, "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    refused = _lone_surrogate(body)
    if refused is not None:
        raise refused
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
               allowed_hosts: Iterable[str] = (), max_tokens: int | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               store_size: int = STORE_SIZE) -> FastAPI:  # fmt: skip
    """The ASGI app serving ``engine`` (see :mod:`mlx_gptoss.server`) as model ``model_id``.

    Args:
        engine: the model side (``Engine``): ``submit(messages, **options)`` returns a job with
            ``aevents()`` and ``cancel()``; raises ``QueueFull`` at its bound (answered 429).
        model_id: the name clients use in ``model`` and that ``/v1/models`` lists.
        api_key: when set, every /v1 request needs ``Authorization: Bearer <api_key>``.
        cors_origin: the one browser origin allowed to call the API (default: none); ``"*"``
            (any) only with ``api_key``.
        allowed_hosts: Host names answered besides localhost, 127.0.0.1 and [::1] (any port;
            others get 403); ``"*"`` (any) only with ``api_key``.
        max_tokens: the most tokens one reply may have (default: half the model's context).
        max_body_bytes: larger request bodies are refused with 413.
        store_size: how many responses ``previous_response_id`` can refer to.

    Raises ValueError for ``"*"`` in ``cors_origin``/``allowed_hosts`` without ``api_key``, or a
    malformed allowed host.
    """
    hosts = check_exposure(api_key=api_key, cors_origin=cors_origin, allowed_hosts=allowed_hosts)
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

    def prompt(translate, *args: Any) -> list:
        try:  # a request harmony cannot take (odd text, a tool schema) is the client's to fix
            return translate(*args)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e)) from None

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
        # before any tokenizing (text too costly to encode would stall the server); a thread lets /health in meanwhile
        await asyncio.to_thread(check_cost, chat_texts(req))
        job = await submit(prompt(chat_to_harmony, req), max_tokens=n, temperature=_temp(req.temperature), top_p=req.top_p,
                     seed=req.seed, stop=[req.stop] if isinstance(req.stop, str) else req.stop)  # fmt: skip
        builder = ChatBuilder(model_id)
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
        await asyncio.to_thread(check_cost, responses_texts(req, items))
        job = await submit(prompt(responses_to_harmony, req, items), max_tokens=n, temperature=_temp(req.temperature),
                           top_p=req.top_p)  # fmt: skip
        builder = ResponseBuilder(req, model_id)

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

    app.add_middleware(_Guard, api_key=api_key, max_body=max_body_bytes, allowed_hosts=hosts)
    if cors_origin:  # outermost: preflights are answered before the key check, and the guard's errors get CORS headers
        # private network: Chrome asks it of a public origin calling loopback; this origin was named on purpose
        app.add_middleware(_CORS, allow_origins=[cors_origin], allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_private_network=True)  # fmt: skip
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
          max_queue: int = 16, cors_origin: str | None = None, allowed_hosts: Iterable[str] = (),
          max_tokens: int | None = None, adapter: str | Path | None = None, log_level: str = "info") -> None:  # fmt: skip
    """Serve a loaded ``model`` (``mlx_gptoss.load``: memory budget and adapter are chosen there) over
    HTTP as ``model_id`` until interrupted (see :func:`create_app`).

    A specific address in ``host`` (not loopback, not 0.0.0.0/::) is answered as a Host name too.
    One line is logged before the server starts: the model id, the base URL, ``adapter`` (the
    folder ``model`` was loaded with, for the log only), the memory budget, the Host names, whether
    a key is required.

    Raises ValueError for a non-loopback ``host`` without ``api_key`` (and as :func:`create_app`),
    OSError when the server cannot start (e.g. the port is taken)."""
    import uvicorn  # the ASGI server is needed only to run the app, not to build or test it

    if not is_loopback(host) and not api_key:
        raise ValueError(f"--host {host} is reachable from other machines: set --api-key too (or serve on 127.0.0.1)")
    if not is_loopback(host) and host not in ("0.0.0.0", "::", ""):  # clients of that address send it as their Host
        allowed_hosts = [*allowed_hosts, host]
    hosts = check_exposure(api_key=api_key, cors_origin=cors_origin, allowed_hosts=allowed_hosts)  # before the engine
    engine = Engine(model, max_queue=max_queue)
    try:
        app = create_app(engine, model_id=model_id, api_key=api_key, cors_origin=cors_origin, allowed_hosts=hosts,
                         max_tokens=max_tokens)  # fmt: skip
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
        logging.getLogger("uvicorn.error").info(start_line(model, model_id=model_id, host=host, port=port, adapter=adapter,
                                                           hosts=hosts, api_key=api_key))  # fmt: skip
        server = uvicorn.Server(config)
        try:
            server.run()
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on: the way serve ends
            pass
        if not server.started:
            raise OSError(f"the server could not start on {host}:{port} (see the log above)")
    finally:
        engine.close()


def start_line(model: Any, *, model_id: str, host: str, port: int, adapter: str | Path | None, hosts: list[str],
               api_key: str | None) -> str:  # fmt: skip
    """What ``serve`` logs before it starts: what is served, where, and to whom."""
    url_host = f"[{host}]" if ":" in host else host
    parts = [f"adapter {adapter}"] if adapter else []
    plan = getattr(model, "memory_plan", None)
    if plan is not None and plan.budget:
        parts.append(f"memory budget {plan.budget / GB:.1f} GB")
    parts.append("any Host" if hosts == ["*"] else f"Host {', '.join(hosts)}")
    parts.append("API key required" if api_key else "no API key")
    return f"mlx-gptoss: serving {model_id} at http://{url_host}:{port}/v1 ({'; '.join(parts)})"
