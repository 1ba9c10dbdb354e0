"""The HTTP side of ``mlx-gptoss serve``: a real uvicorn server on 127.0.0.1, the official openai
client parsing both APIs with its own types, the bad-request matrix, limits, disconnects, load.

Most tests inject a scripted engine (the HTTP layer's whole contract with the model side is
``submit`` -> job with ``aevents()``/``cancel()``); the end-to-end tests at the bottom run the real
engine on a tiny model rigged so that greedy decoding writes a chosen harmony reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402

from mlx_gptoss.chat import Done, Reply  # noqa: E402
from mlx_gptoss.chat.reply import accumulate as _accumulate  # noqa: E402
from mlx_gptoss.harmony import (  # noqa: E402
    FinalDelta,
    ReasoningDelta,
    ToolCall,
    ToolCallCompleted,
    ToolCallDelta,
    ToolCallStarted,  # fmt: skip
)
from mlx_gptoss.server.app import create_app  # noqa: E402
from mlx_gptoss.testing import rig  # noqa: E402

MODEL = "tiny-gptoss"


class QueueFull(RuntimeError):
    """What the engine raises at its bound (matched by name, like the real engine's)."""


class FakeJob:
    def __init__(self, events: list, delay: float, finish: str, forever: bool = False):
        self.script, self.delay, self.finish, self.forever = events, delay, finish, forever
        self.cancelled = threading.Event()
        self.done = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    async def aevents(self):
        reply = Reply(finish_reason=self.finish)
        reply.stats.prompt_tokens, reply.stats.prefill_tokens, reply.stats.generation_tokens = 40, 30, 7
        i = 0
        try:
            while i < len(self.script) or self.forever:
                if self.cancelled.is_set():
                    reply.finish_reason = "cancelled"
                    break
                await asyncio.sleep(self.delay)
                ev = self.script[i] if i < len(self.script) else FinalDelta("x")
                i += 1
                _accumulate(reply, ev)  # the reply the real session builds from the same events
                yield ev
            yield Done(reply)
        finally:
            self.done.set()


class FakeEngine:
    """Replays a script per request; at most ``max_jobs`` jobs at once (QueueFull beyond)."""

    def __init__(self, events=(), *, delay: float = 0.0, finish: str = "stop", max_jobs: int = 100, forever=False):
        self.events, self.delay, self.finish, self.max_jobs, self.forever = list(events), delay, finish, max_jobs, forever
        self.submitted: list[tuple[list, dict]] = []
        self.jobs: list[FakeJob] = []

    def submit(self, messages, **options):
        if sum(not j.done.is_set() for j in self.jobs) >= self.max_jobs:
            raise QueueFull("full")
        self.submitted.append((json.loads(json.dumps([m.to_dict() for m in messages], default=lambda o: o.value)), options))
        job = FakeJob(self.events, self.delay, self.finish, self.forever)
        self.jobs.append(job)
        return job


@contextlib.contextmanager
def running(app):
    """A real uvicorn server on 127.0.0.1 (a free port), in a thread; stopped after."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=20)


ANSWER = [ReasoningDelta("Think"), ReasoningDelta("ing."), FinalDelta("Hello"), FinalDelta(" there")]


def tool_events(args: str = '{"city": "Paris"}') -> list:
    call = ToolCall("call_1", "get_weather", "functions.get_weather", args, json.loads(args))
    return [ReasoningDelta("Need weather."), ToolCallStarted("call_1", "get_weather"),
            ToolCallDelta("call_1", args[:5]), ToolCallDelta("call_1", args[5:]), ToolCallCompleted(call)]  # fmt: skip


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
WEATHER_R = {"type": "function", **WEATHER["function"]}


def test_chat_completions_streamed_and_not_parse_with_the_sdk():
    engine = FakeEngine(ANSWER)
    with running(create_app(engine, model_id=MODEL, max_tokens=100)) as url:
        c = client(url)
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                                             {"role": "user", "content": "Hi"}],
                                      reasoning_effort="low", max_completion_tokens=50, temperature=0, seed=3, stop=["END"])  # fmt: skip
        msg = r.choices[0].message
        assert (msg.content, r.choices[0].finish_reason) == ("Hello there", "stop")
        assert msg.model_extra["reasoning"] == msg.model_extra["reasoning_content"] == "Thinking."
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.prompt_tokens_details.cached_tokens) == (40, 7, 10)
        messages, opts = engine.submitted[-1]
        assert opts == {"max_tokens": 50, "temperature": 0, "seed": 3, "stop": ["END"]}
        assert messages[0]["content"][0]["reasoning_effort"] == "Low"
        assert messages[1]["content"][0]["instructions"] == "Be brief."
        assert (messages[-1]["role"], messages[-1]["content"]) == ("user", [{"type": "text", "text": "Hi"}])

        chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True,
                                                stream_options={"include_usage": True}))  # fmt: skip
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        reasoning = "".join((ch.choices[0].delta.model_extra or {}).get("reasoning", "") for ch in chunks if ch.choices)
        assert (text, reasoning) == ("Hello there", "Thinking.")
        assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].usage.prompt_tokens_details.cached_tokens == 10


def test_responses_streamed_and_not_parse_with_the_sdk():
    engine = FakeEngine(ANSWER)
    with running(create_app(engine, model_id=MODEL, max_tokens=100)) as url:
        c = client(url)
        r = c.responses.create(model=MODEL, input="Hi", instructions="Be brief.", reasoning={"effort": "high"},
                               max_output_tokens=20, include=["reasoning.encrypted_content"])  # fmt: skip
        assert r.output_text == "Hello there" and r.status == "completed"
        assert [o.type for o in r.output] == ["reasoning", "message"]
        assert r.output[0].content[0].text == "Thinking." and r.output[0].content[0].type == "reasoning_text"
        assert r.output[0].encrypted_content == "Thinking."  # plain, as the README says
        assert (r.usage.input_tokens, r.usage.input_tokens_details.cached_tokens, r.usage.output_tokens) == (40, 10, 7)
        assert engine.submitted[-1][1]["max_tokens"] == 20

        events = list(c.responses.create(model=MODEL, input="Hi", stream=True))
        kinds = [e.type for e in events]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
        assert kinds.count("response.reasoning_text.delta") == 2 and kinds.count("response.output_text.delta") == 2
        for k in ("response.output_item.added", "response.content_part.added", "response.reasoning_text.done",
                  "response.output_text.done", "response.content_part.done", "response.output_item.done"):  # fmt: skip
            assert k in kinds
        assert events[-1].response.output_text == "Hello there"
        # a follow-up on the stored response sees the whole conversation, reasoning of the answered turn dropped
        c.responses.create(model=MODEL, input="And?", previous_response_id=events[-1].response.id)
        roles = [(m["role"], m.get("channel")) for m in engine.submitted[-1][0]]
        assert roles == [("system", None), ("user", None), ("assistant", "final"), ("user", None)]


def test_an_answer_cut_by_max_output_tokens_is_marked_incomplete():
    # OpenAI marks the response and its last item "incomplete"; clients read either
    with running(create_app(FakeEngine(ANSWER, finish="length"), model_id=MODEL, max_tokens=100)) as url:
        r = client(url).responses.create(model=MODEL, input="Hi", max_output_tokens=5)
        assert (r.status, r.incomplete_details.reason) == ("incomplete", "max_output_tokens")
        assert [o.status for o in r.output] == ["completed", "incomplete"]


def test_tool_round_trip_both_apis():
    engine = FakeEngine(tool_events(), finish="tool_calls")
    with running(create_app(engine, model_id=MODEL, max_tokens=100)) as url:
        c = client(url)
        msgs = [{"role": "user", "content": "Weather in Paris?"}]
        r = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER])
        call = r.choices[0].message.tool_calls[0]
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        streamed = list(c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], stream=True))
        args = "".join(tc.function.arguments or "" for ch in streamed for tc in (ch.choices[0].delta.tool_calls or []))
        assert args == '{"city": "Paris"}' and streamed[-1].choices[0].finish_reason == "tool_calls"
        assigned = r.choices[0].message.model_extra["reasoning"]
        msgs += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()], "reasoning": assigned},
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]  # fmt: skip
        engine.events = ANSWER
        assert c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER]).choices[0].message.content == "Hello there"
        sent = engine.submitted[-1][0]
        dev = sent[1]["content"][0]
        assert "get_weather" in json.dumps(dev["tools"])
        # the reasoning before the call is kept while the last assistant message is a tool call
        assert [(m["name"] or m["role"], m.get("channel"), m.get("recipient")) for m in sent[2:]] == [
            ("user", None, None), ("assistant", "analysis", None), ("assistant", "commentary", "functions.get_weather"),
            ("functions.get_weather", "commentary", "assistant")]  # fmt: skip
        assert sent[-1]["content"][0]["text"] == '{"temp": 21}'

        engine.events = tool_events()
        r = c.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER_R])
        fc = [o for o in r.output if o.type == "function_call"][0]
        assert (fc.name, json.loads(fc.arguments)) == ("get_weather", {"city": "Paris"})
        events = list(c.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER_R], stream=True))
        deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        assert deltas == '{"city": "Paris"}'
        assert [e.arguments for e in events if e.type == "response.function_call_arguments.done"] == ['{"city": "Paris"}']
        engine.events = ANSWER
        r2 = c.responses.create(model=MODEL, previous_response_id=r.id, tools=[WEATHER_R],
                                input=[{"type": "function_call_output", "call_id": fc.call_id, "output": '{"temp": 21}'}])  # fmt: skip
        assert r2.output_text == "Hello there"
        sent = engine.submitted[-1][0]
        assert [m["name"] or m["role"] for m in sent[-4:]] == ["user", "assistant", "assistant", "functions.get_weather"]


def _error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text and "/tmp" not in r.text and "site-packages" not in r.text
    for w in words:
        assert w in err["message"], err
    return err


def test_arguments_completed_without_deltas_still_reach_the_client():
    call = ToolCall("call_1", "get_weather", "functions.get_weather", '{"city": "Rome"}', {"city": "Rome"})
    engine = FakeEngine([ToolCallStarted("call_1", "get_weather"), ToolCallCompleted(call)], finish="tool_calls")
    with running(create_app(engine, model_id=MODEL, max_tokens=10)) as url:
        c = client(url)
        for stream in (False, True):
            if stream:
                chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True))
                args = "".join(t.function.arguments or "" for ch in chunks for t in ch.choices[0].delta.tool_calls or [])
            else:
                args = (
                    c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
                    .choices[0]
                    .message.tool_calls[0]
                    .function.arguments
                )
            assert args == '{"city": "Rome"}'
        events = list(c.responses.create(model=MODEL, input="x", stream=True))
        assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == '{"city": "Rome"}'
        assert events[-1].response.output[0].arguments == '{"city": "Rome"}'


def test_bad_requests_get_clear_openai_errors():
    engine = FakeEngine(ANSWER)
    with running(create_app(engine, model_id=MODEL, api_key="sekret", max_tokens=100, max_body_bytes=1 << 20)) as url:
        h = {"Authorization": "Bearer sekret", "Content-Type": "application/json"}  # raw bodies below are declared JSON
        chat, resp = f"{url}/v1/chat/completions", f"{url}/v1/responses"
        ok = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
        with httpx.Client(timeout=20) as x:
            _error(x.post(chat, content=b'{"model": ', headers=h), 400, "not valid JSON")
            _error(x.post(chat, content=b"[1]", headers=h), 400, "JSON object")
            assert _error(x.post(chat, json={**ok, "messages": "Hi"}, headers=h), 400)["param"] == "messages"
            assert _error(x.post(chat, json={**ok, "temperature": "hot"}, headers=h), 400)["param"] == "temperature"
            assert _error(x.post(chat, json={**ok, "messages": [{"role": "robot", "content": "x"}]}, headers=h),
                          400)["param"] == "messages[0].role"  # fmt: skip
            _error(x.post(chat, content=b"{" + b" " * (2 << 20) + b"}", headers=h), 413, "larger than")
            assert _error(x.post(chat, json={**ok, "model": "gpt-5"}, headers=h), 404, "gpt-5")["code"] == "model_not_found"
            assert _error(x.post(chat, json=ok), 401, "API key")["code"] == "missing_api_key"
            assert _error(x.post(chat, json=ok, headers={"Authorization": "Bearer nope"}), 401)["code"] == "invalid_api_key"
            _error(x.get(f"{url}/v1/models"), 401)
            bad_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
            assert "parameters" in _error(x.post(chat, json={**ok, "tools": [bad_tool]}, headers=h), 400, '"object"')["param"]
            _error(
                x.post(chat, json={**ok, "tools": [{"type": "function", "function": {"name": "bad name"}}]}, headers=h),
                400,
                "bad name",
            )
            _error(x.post(chat, json={**ok, "tool_choice": "required"}, headers=h), 400, "tool_choice")
            _error(x.post(chat, json={**ok, "max_tokens": 101}, headers=h), 400, "limit of 100")
            _error(x.post(chat, json={**ok, "n": 2}, headers=h), 400, "n=1")
            _error(x.post(chat, json={**ok, "response_format": {"type": "json_schema"}}, headers=h), 400, "json_schema")
            _error(
                x.post(resp, json={"model": MODEL, "input": "x", "text": {"format": {"type": "json_object"}}}, headers=h),
                400,
                "json_object",
            )
            _error(
                x.post(chat, json={**ok, "messages": [{"role": "tool", "tool_call_id": "c9", "content": "1"}]}, headers=h),
                400,
                "c9",
            )
            _error(
                x.post(chat, json={**ok, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, headers=h),
                400,
                "text",
            )
            err = _error(
                x.post(resp, json={"model": MODEL, "input": "x", "previous_response_id": "resp_nope"}, headers=h),
                400,
                "resp_nope",
            )
            assert err["param"] == "previous_response_id"
            _error(
                x.post(resp, json={"model": MODEL, "input": "x", "tools": [{"type": "web_search"}]}, headers=h),
                400,
                "function tools",
            )
            _error(x.post(resp, json={"model": MODEL, "input": [{"type": "function_call_output", "call_id": "c1", "output": "1"}]},
                          headers=h), 400, "c1")  # fmt: skip
            _error(x.post(resp, json={"model": MODEL, "input": "x", "max_output_tokens": 0}, headers=h), 400, "max_output_tokens")
            for empty in ([], ""):
                assert (
                    _error(x.post(resp, json={"model": MODEL, "input": empty}, headers=h), 400, "nothing to answer")["param"]
                    == "input"
                )
            _error(x.post(chat, json={**ok, "messages": []}, headers=h), 400)
            _error(x.get(f"{url}/v1/nothing", headers=h), 404)
            assert x.get(f"{url}/health").json()["status"] == "ok"  # health needs no key
            assert x.get(f"{url}/v1/models", headers=h).json()["data"][0]["id"] == MODEL
            assert "access-control-allow-origin" not in x.options(chat, headers={"Origin": "http://evil.example",
                                                                                "Access-Control-Request-Method": "POST"}).headers  # fmt: skip
        # the SDK raises its own typed errors from these bodies
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client(url, "sekret").chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])


def test_cors_only_for_the_named_origin():
    with running(create_app(FakeEngine(ANSWER), model_id=MODEL, cors_origin="http://localhost:3000", max_tokens=10)) as url:
        pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        r = httpx.options(f"{url}/v1/chat/completions", headers={"Origin": "http://localhost:3000", **pre})
        assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = httpx.options(f"{url}/v1/chat/completions", headers={"Origin": "http://evil.example", **pre})
        assert "access-control-allow-origin" not in r.headers


def test_queue_bound_answers_429():
    engine = FakeEngine(ANSWER, delay=0.2, max_jobs=1)
    with running(create_app(engine, model_id=MODEL, max_tokens=10)) as url:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
        with httpx.Client(timeout=20) as x:
            first = threading.Thread(target=x.post, args=(f"{url}/v1/chat/completions",), kwargs={"json": body})
            first.start()
            while not engine.jobs:
                time.sleep(0.01)
            err = _error(x.post(f"{url}/v1/chat/completions", json=body), 429, "busy")
            assert err["type"] == "rate_limit_error"
            first.join()
        with pytest.raises(openai.RateLimitError):  # what the SDK makes of it (and would retry)
            engine.max_jobs = 0
            client(url).responses.create(model=MODEL, input="x")


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_generation(stream):
    engine = FakeEngine([], delay=0.01, forever=True)
    with running(create_app(engine, model_id=MODEL, max_tokens=10)) as url:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": stream}
        with httpx.Client(timeout=20) as x:
            if stream:
                with x.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    next(r.iter_lines())  # the stream is running
            else:
                with pytest.raises(httpx.ReadTimeout):
                    x.post(f"{url}/v1/chat/completions", json=body, timeout=0.5)
        assert engine.jobs[0].cancelled.wait(5)
        assert engine.jobs[0].done.wait(5)


def test_health_answers_while_a_long_generation_runs():
    engine = FakeEngine([], delay=0.01, forever=True)
    with running(create_app(engine, model_id=MODEL, max_tokens=10)) as url:
        with httpx.Client(timeout=20) as x, x.stream("POST", f"{url}/v1/responses",
                                                     json={"model": MODEL, "input": "x", "stream": True}) as r:  # fmt: skip
            lines = r.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)
            t0 = time.monotonic()
            assert httpx.get(f"{url}/health", timeout=2).status_code == 200
            assert time.monotonic() - t0 < 1
            assert not engine.jobs[0].done.is_set()


def test_serve_command_refuses_an_open_host_without_a_key():
    out = subprocess.run([sys.executable, "-m", "mlx_gptoss.cli", "serve", "-m", "/nonexistent/secret/model", "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode != 0 and "--api-key" in out.stderr and "Traceback" not in out.stderr


# -- the real engine, on a tiny model ---------------------------------------------------------------

TOOL_REPLY = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
FINAL_REPLY = "<|channel|>final<|message|>It is 21 C in Paris.<|return|>"


@pytest.fixture(scope="module")
def served(vocab_model_dir):
    """A real engine on a tiny model (rigged per test), served by uvicorn."""
    from mlx_gptoss import load
    from mlx_gptoss.server.engine import Engine

    model = load(vocab_model_dir)
    rig(model, FINAL_REPLY)
    engine = Engine(model, max_queue=2)
    try:
        with running(create_app(engine, model_id=MODEL)) as url:
            yield model, engine, url
    finally:
        engine.close()


def test_real_engine_tool_round_trip_both_apis_with_the_prompt_cache(served):
    model, engine, url = served
    c = client(url)
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    rig(model, TOOL_REPLY)
    r = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], temperature=0, max_tokens=40)
    call = r.choices[0].message.tool_calls[0]
    assert (r.choices[0].finish_reason, call.function.name, json.loads(call.function.arguments)) == \
        ("tool_calls", "get_weather", {"city": "Paris"})  # fmt: skip
    rig(model, FINAL_REPLY)
    msgs += [
        r.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    r2 = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], temperature=0, max_tokens=40)
    assert (r2.choices[0].message.content, r2.choices[0].finish_reason) == ("It is 21 C in Paris.", "stop")
    # the stateless client resent the conversation: its prefix came from the prompt cache (all of the
    # first prompt but the last token; harmony re-renders a call's header in another order than written)
    assert r2.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 1

    rig(model, TOOL_REPLY)
    events = list(c.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER_R], temperature=0, stream=True))
    done = events[-1].response
    fc = done.output[-1]
    assert (done.status, fc.type, fc.name, json.loads(fc.arguments)) == (
        "completed",
        "function_call",
        "get_weather",
        {"city": "Paris"},
    )
    rig(model, FINAL_REPLY)
    r3 = c.responses.create(model=MODEL, previous_response_id=done.id, tools=[WEATHER_R], temperature=0,
                            input=[{"type": "function_call_output", "call_id": fc.call_id, "output": '{"temp": 21}'}])  # fmt: skip
    assert r3.output_text == "It is 21 C in Paris." and r3.usage.input_tokens_details.cached_tokens >= done.usage.input_tokens - 1


def test_real_engine_greedy_text_over_http_equals_the_chat_session(served):
    from mlx_gptoss.chat import ChatSession

    model, engine, url = served
    rig(model, "<|channel|>final<|message|>Counting one two three four five.<|return|>")
    want = ChatSession(model, instructions="Count.", reasoning_effort="low").send("Go", max_tokens=30)
    c = client(url)
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Count."}, {"role": "user", "content": "Go"}],
                                     reasoning_effort="low", temperature=0, max_tokens=30)  # fmt: skip
    resp = c.responses.create(model=MODEL, instructions="Count.", input="Go", reasoning={"effort": "low"}, temperature=0,
                              max_output_tokens=30)  # fmt: skip
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Count."}, {"role": "user", "content": "Go"}],
        reasoning_effort="low", temperature=0, max_tokens=30, stream=True) if ch.choices)  # fmt: skip
    assert want.final == chat.choices[0].message.content == resp.output_text == streamed == "Counting one two three four five."
    assert chat.usage.prompt_tokens == resp.usage.input_tokens == want.stats.prompt_tokens
    assert chat.usage.completion_tokens == want.stats.generation_tokens


def test_real_engine_disconnect_cancels_and_health_answers_meanwhile(served):
    model, engine, url = served
    rig(model, "<|channel|>final<|message|> la", loop=True)  # never ends by itself
    with httpx.Client(timeout=20) as x, x.stream("POST", f"{url}/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Sing"}], "stream": True, "max_tokens": 2000}) as r:  # fmt: skip
        lines = r.iter_lines()
        assert any(" la" in line for line in lines if line.startswith("data:"))  # generating
        t0 = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=2).status_code == 200 and time.monotonic() - t0 < 1
        assert engine._running is not None
    deadline = time.monotonic() + 3  # 2000 tokens would take far longer
    while engine._running is not None:
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.02)
    rig(model, FINAL_REPLY)
    assert client(url).responses.create(model=MODEL, input="x", temperature=0).output_text == "It is 21 C in Paris."


def test_real_engine_under_load_completes_or_refuses_every_request(served):
    model, engine, url = served
    rig(model, FINAL_REPLY)
    results: list = []

    def one(i: int) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Weather {i}?"}], "temperature": 0, "max_tokens": 20}
        try:
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            results.append((r.status_code, r.json()))
        except Exception as e:  # noqa: BLE001 - counted as a failure below
            results.append((None, repr(e)))

    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 50 and time.monotonic() - t0 < 60
    codes = sorted(code for code, _ in results)
    assert set(codes) <= {200, 429} and codes.count(200) >= 1 and codes.count(429) >= 1, codes
    for code, body in results:
        if code == 200:
            assert body["choices"][0]["message"]["content"] == "It is 21 C in Paris."
        else:
            assert body["error"]["type"] == "rate_limit_error"
    assert engine.queued == 0


def test_serve_command_serves_the_model_by_its_folder_name(vocab_model_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlx_gptoss.cli", "serve", "-m", str(vocab_model_dir), "--port", str(port),
                             "--api-key", "k"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stdout.read() if proc.poll() is not None else "no start"
            )
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        models = client(f"http://127.0.0.1:{port}", "k").models.list()
        assert [m.id for m in models.data] == [vocab_model_dir.name]  # the folder's name, never its path
    finally:
        proc.terminate()
        proc.wait(20)


def test_hostile_bodies_get_400_not_500():
    engine = FakeEngine(ANSWER)
    with running(create_app(engine, model_id=MODEL)) as url, httpx.Client(timeout=20) as x:
        chat = f"{url}/v1/chat/completions"
        ok = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
        deep = (
            b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": ' + b"[" * 5000 + b"]" * 5000 + b"}]}"
        )
        j = {"Content-Type": "application/json"}
        _error(x.post(chat, content=deep, headers=j), 400, "nested too deeply")
        assert _error(x.post(chat, json={**ok, "seed": 2**80}), 400)["param"] == "seed"  # beyond mx.random.seed's uint64
        assert _error(x.post(chat, json={**ok, "seed": -1}), 400)["param"] == "seed"
        _error(x.post(chat, content=b'{"model": "x", "messages": "\xff\xfe"}', headers=j), 400, "not valid JSON")
        assert x.post(chat, json={**ok, "seed": 2**64 - 1}).status_code == 200  # and the server still serves
    assert engine.submitted[-1][1]["seed"] == 2**64 - 1
