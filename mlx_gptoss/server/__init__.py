"""A local OpenAI-compatible server: ``mlx-gptoss serve`` (Responses API and Chat Completions).

Two layers, each owned by its module, meeting in one small interface:

``engine.py`` — the model side. One worker thread owns the model (MLX evaluates an array only in
the thread that built it) and runs requests in order from a bounded queue; a prompt cache keeps
the KV state of recent conversations (memory-bounded, least recently used) and each request
computes only the tokens after the longest reusable prefix (the same KV-reuse piece chat
sessions use: :mod:`mlx_gptoss.kvreuse`)::

    engine = Engine(model, max_queue=16, cache_bytes=...)
    job = engine.submit(messages, max_tokens=..., temperature=..., top_p=..., seed=..., stop=[...])
        # messages: the whole conversation as openai-harmony Messages (system message with the
        # reasoning effort, developer message with instructions + tools, user/assistant/tool
        # messages); raises QueueFull when the queue is at its bound
    for ev in job.events(): ...        # blocking; or ``async for ev in job.aevents()``
        # harmony events (ReasoningDelta, FinalDelta, CommentaryDelta, ToolCallStarted,
        # ToolCallDelta, ToolCallCompleted) and last Done(reply): reply.final, .reasoning,
        # .tool_calls, .finish_reason, .stats.prompt_tokens, .stats.prefill_tokens (cached =
        # prompt_tokens - prefill_tokens)
    job.cancel()                       # from any thread; generation stops within a token
    engine.close()

``app.py`` / ``schemas.py`` / ``translate.py`` — the HTTP side (FastAPI + uvicorn): typed
requests, Chat Completions and Responses translated to and from harmony messages and events,
server-sent events, errors as OpenAI error objects, API key, Host and media-type checks, CORS,
limits (text too costly to tokenize is refused before the engine sees it).
"""

__all__ = ["create_app", "serve"]


def __getattr__(name: str):
    if name in __all__:
        from . import app  # the HTTP stack (FastAPI, ~1 s to import) only when asked for: the engine does not need it

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
