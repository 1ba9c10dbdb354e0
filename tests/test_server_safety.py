"""The server against browsers and bad input: JSON bodies only, loopback Host names only (DNS
rebinding), CORS rules, errors that name the field, one tool validator shared with the Python API,
the start-up line, and text too costly to encode answered with a 400 while /health answers.

Scripted engines and the uvicorn-in-a-thread helper come from test_server_http.py; the end-to-end
tests run the real engine on a tiny model with the real tokenizer.
"""

from __future__ import annotations

import functools
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

from test_server_http import ANSWER, MODEL, FakeEngine, _error, client, running  # noqa: E402

from mlx_gptoss.harmony import FinalDelta  # noqa: E402
from mlx_gptoss.server.app import create_app, serve  # noqa: E402
from mlx_gptoss.tools import Tool, as_tool, tool_from_function, unique_tools  # noqa: E402

CLI = [sys.executable, "-m", "mlx_gptoss.cli"]
OK = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "server.md"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def one_error(proc: subprocess.CompletedProcess) -> str:
    """The single ``Error:`` line of a failed command (asserting there is one and no traceback)."""
    assert proc.returncode != 0, (proc.returncode, proc.stdout[-800:], proc.stderr[-800:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- item 13: JSON bodies only ----------------------------------------------------------------------


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None])
def test_a_body_that_is_not_declared_json_gets_415(ctype):
    engine = FakeEngine(ANSWER)
    with running(create_app(engine, model_id=MODEL, max_tokens=10)) as url, httpx.Client(timeout=20) as x:
        headers = {} if ctype is None else {"Content-Type": ctype}  # no Content-Type: what fetch() sends for a Blob
        for path in ("/v1/chat/completions", "/v1/responses"):
            body = OK if path.endswith("completions") else {"model": MODEL, "input": "Hi"}
            err = _error(x.post(url + path, content=json.dumps(body), headers=headers), 415, "application/json")
            assert err["code"] == "unsupported_media_type"
        ok = x.post(f"{url}/v1/chat/completions", content=json.dumps(OK),
                    headers={"Content-Type": "Application/JSON; charset=utf-8"})  # fmt: skip
        assert ok.status_code == 200, ok.text
    assert len(engine.submitted) == 1  # the model never saw the undeclared bodies


# -- item 13: loopback Host names only, unless allowed ----------------------------------------------


def test_a_foreign_host_header_is_refused_and_loopback_names_pass():
    engine = FakeEngine(ANSWER)
    with running(create_app(engine, model_id=MODEL, max_tokens=10)) as url, httpx.Client(timeout=20) as x:
        port = port_of(url)
        chat = f"{url}/v1/chat/completions"
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", "LocalHost:1", f"[::1]:{port}", "[::1]"):
            assert x.post(chat, json=OK, headers={"Host": host}).status_code == 200, host
        for host in ("evil.example.com", f"evil.example.com:{port}", "localhost.evil.example", "127.0.0.1.nip.io"):
            err = _error(x.post(chat, json=OK, headers={"Host": host}), 403, host.split(":")[0], "--allowed-host")
            assert err["code"] == "host_not_allowed"
        # the report's curl: a foreign name and a text body
        _error(x.post(chat, content=json.dumps(OK), headers={"Host": "evil.example.com", "Content-Type": "text/plain"}), 403)
        _error(x.get(f"{url}/v1/models", headers={"Host": "evil.example.com"}), 403)  # a rebound page cannot read either
        assert x.get(f"{url}/health", headers={"Host": "evil.example.com"}).status_code == 200  # /health stays open
    assert len(engine.submitted) == 6


def test_allowed_hosts_extend_the_loopback_names():
    engine = FakeEngine(ANSWER)
    app = create_app(engine, model_id=MODEL, max_tokens=10, allowed_hosts=["Box.Local", "10.0.0.7"])
    with running(app) as url, httpx.Client(timeout=20) as x:
        chat = f"{url}/v1/chat/completions"
        for host in ("box.local", "box.local:8000", "10.0.0.7:1234", "localhost"):
            assert x.post(chat, json=OK, headers={"Host": host}).status_code == 200, host
        _error(x.post(chat, json=OK, headers={"Host": "other.local"}), 403, "other.local")
    for bad in ("http://box.local", "", "a b", "box/x"):
        with pytest.raises(ValueError, match="allowed host"):
            create_app(engine, model_id=MODEL, allowed_hosts=[bad])


def test_any_host_and_cors_star_need_an_api_key():
    engine = FakeEngine(ANSWER)
    with pytest.raises(ValueError, match="api.key") as e:
        create_app(engine, model_id=MODEL, cors_origin="*")
    assert "--cors-origin" in str(e.value)
    with pytest.raises(ValueError, match="api.key"):
        create_app(engine, model_id=MODEL, allowed_hosts=["*"])
    with pytest.raises(ValueError, match="api.key"):  # refused before any engine is built
        serve(object(), model_id=MODEL, cors_origin="*")
    app = create_app(engine, model_id=MODEL, max_tokens=10, api_key="k", cors_origin="*", allowed_hosts=["*"])
    with running(app) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=OK, headers={"Host": "anything.example", "Authorization": "Bearer k",
                                                                    "Origin": "http://anything.example"})  # fmt: skip
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*", r.text


def test_serve_command_refuses_cors_star_without_a_key_before_loading():
    proc = subprocess.run([*CLI, "serve", "-m", "/nonexistent/model", "--cors-origin", "*"], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    line = one_error(proc)
    assert "--cors-origin" in line and "--api-key" in line and "/nonexistent" not in line, line


def test_serve_command_has_a_repeatable_allowed_host_option():
    proc = subprocess.run([*CLI, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--allowed-host" in proc.stdout, proc.stdout
    proc = subprocess.run([*CLI, "serve", "-m", "/nonexistent/model", "--allowed-host", "http://x"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert "--allowed-host" in one_error(proc)


# -- items 13 and 27: CORS ---------------------------------------------------------------------------


def test_the_allowed_origin_preflight_works_and_a_refused_one_gets_an_error_object():
    app = create_app(FakeEngine(ANSWER), model_id=MODEL, max_tokens=10, cors_origin="http://localhost:3000")
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    with running(app) as url, httpx.Client(timeout=20) as x:
        chat = f"{url}/v1/chat/completions"
        for extra in ({}, {"Access-Control-Request-Private-Network": "true"}):  # Chrome's private network access
            r = x.options(chat, headers={"Origin": "http://localhost:3000", **pre, **extra})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000", r.text
        r = x.post(chat, json=OK, headers={"Origin": "http://localhost:3000"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = x.post(chat, content="{}", headers={"Origin": "http://localhost:3000", "Content-Type": "text/plain"})
        _error(r, 415)  # the app can read why it was refused
        assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = x.options(chat, headers={"Origin": "http://evil.example", **pre})
        err = _error(r, 400, "http://evil.example", "http://localhost:3000")
        assert "access-control-allow-origin" not in r.headers and err["code"] == "cors_refused"
        r = x.options(chat, headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "DELETE"})
        _error(r, 400, "DELETE")


# -- item 27: errors that name the field ---------------------------------------------------------------


@pytest.mark.parametrize("item, param, accepted", [
    ({"type": "bogus", "role": "user", "content": "x"}, "input[0].type", "'function_call_output'"),
    ({"role": "tool", "content": "x"}, "input[0].role", "'developer'"),
    ({"type": "function_call_output", "call_id": "c1", "output": {"temp": 21}}, "input[0].output", "a string or a list"),
])  # fmt: skip
def test_responses_input_errors_name_the_field_and_what_is_accepted(item, param, accepted):
    engine = FakeEngine(ANSWER)
    with running(create_app(engine, model_id=MODEL, max_tokens=10)) as url:
        err = _error(httpx.post(f"{url}/v1/responses", json={"model": MODEL, "input": [item]}, timeout=20), 400, accepted)
    assert err["param"] == param and err["message"].startswith(f"{param}: "), err
    assert "input.str" not in err["message"]
    assert not engine.submitted


def test_union_errors_name_the_field_sent():
    with running(create_app(FakeEngine(ANSWER), model_id=MODEL, max_tokens=10)) as url, httpx.Client(timeout=20) as x:
        chat, resp = f"{url}/v1/chat/completions", f"{url}/v1/responses"
        err = _error(x.post(resp, json={"model": MODEL, "input": {"a": 1}}), 400, "a string or a list", "an object")
        assert err["param"] == "input"
        err = _error(x.post(chat, json={**OK, "messages": [{"role": "user", "content": 5}]}), 400, "a string or a list")
        assert err["param"] == "messages[0].content"
        err = _error(x.post(chat, json={**OK, "tool_choice": "sometimes"}), 400, "'auto'", "an object")
        assert err["param"] == "tool_choice"


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "x\udfff"}]}]}, "input[0].content[0].text"),
    ({"input": "ok", "metadata": {"k\ud800": "v"}}, "metadata"),
])  # fmt: skip
def test_a_lone_surrogate_is_named_with_its_param(body, param):
    engine = FakeEngine(ANSWER)
    raw = json.dumps({"model": MODEL, **body})  # ensure_ascii: the half pair goes out as its \u escape
    assert "\\ud" in raw
    path = "/v1/chat/completions" if "messages" in body else "/v1/responses"
    with running(create_app(engine, model_id=MODEL, max_tokens=10)) as url:
        r = httpx.post(url + path, content=raw.encode(), headers={"Content-Type": "application/json"}, timeout=20)
    err = _error(r, 400, "surrogate", param)
    assert err["param"] == param and "hex escape" not in err["message"], err
    assert not engine.submitted
    # a valid pair is one character, not an error
    with running(create_app(engine, model_id=MODEL, max_tokens=10)) as url:
        pair = json.dumps({**OK, "messages": [{"role": "user", "content": "\U0001f600"}]})  # -> "\ud83d\ude00"
        r = httpx.post(f"{url}/v1/chat/completions", content=pair.encode(), headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text


def test_a_value_error_while_translating_or_rendering_is_a_400(monkeypatch):
    from mlx_gptoss.server import app as app_mod
    from mlx_gptoss.tokenizer import TokenizerError

    def refuse(*args):
        raise TokenizerError("openai-harmony failed to render the tools (a panic)")

    with running(create_app(FakeEngine(ANSWER), model_id=MODEL, max_tokens=10)) as url, httpx.Client(timeout=20) as x:
        for name, path, body in (("chat_to_harmony", "/v1/chat/completions", OK),
                                 ("responses_to_harmony", "/v1/responses", {"model": MODEL, "input": "x"})):  # fmt: skip
            with monkeypatch.context() as m:
                m.setattr(app_mod, name, refuse)
                _error(x.post(url + path, json=body), 400, "render the tools")

    class Refusing(FakeEngine):
        def submit(self, messages, **options):
            raise TokenizerError("openai-harmony failed to render the conversation (a panic)")

    with running(create_app(Refusing(ANSWER), model_id=MODEL, max_tokens=10)) as url, httpx.Client(timeout=20) as x:
        _error(x.post(f"{url}/v1/chat/completions", json=OK), 400, "render the conversation")
        _error(x.post(f"{url}/v1/responses", json={"model": MODEL, "input": "x"}), 400, "render the conversation")


# -- item 19: one tool validator, duplicates refused -----------------------------------------------------


def _fn(name: str, description: str = "d", parameters: dict | None = None) -> dict:
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": parameters or {"type": "object", "properties": {}}}}  # fmt: skip


@pytest.mark.parametrize("names, bad", [(("f", "g", "f"), 2), (("f\n",), 0), (("ok", "f\n"), 1)],
                         ids=["duplicate", "trailing_newline", "trailing_newline_second"])  # fmt: skip
def test_server_refuses_duplicate_or_newline_tool_names(names, bad):
    engine = FakeEngine(ANSWER)
    with running(create_app(engine, model_id=MODEL, max_tokens=10)) as url, httpx.Client(timeout=20) as x:
        chat = {**OK, "tools": [_fn(n) for n in names]}
        err = _error(x.post(f"{url}/v1/chat/completions", json=chat), 400, repr(names[bad]))
        assert err["param"] == f"tools[{bad}].function.name", err
        resp = {"model": MODEL, "input": "x", "tools": [{"type": "function", **_fn(n)["function"]} for n in names]}
        err = _error(x.post(f"{url}/v1/responses", json=resp), 400, repr(names[bad]))
        assert err["param"] == f"tools[{bad}].name", err
        # still refused when the tools are hidden from the model
        assert x.post(f"{url}/v1/chat/completions", json={**chat, "tool_choice": "none"}).status_code == 400
    assert not engine.submitted


def _weather(city: str) -> str:
    """Weather in a city."""
    return city


BAD_PARAMETERS = [{"type": "string"}, [1], "abc", {"type": "object", "properties": {"x": 1}},
                  {"type": "object", "required": "x"}, {"type": "object", "properties": []}]  # fmt: skip


@pytest.mark.parametrize("parameters", BAD_PARAMETERS, ids=["string", "list", "str", "prop", "required", "props_list"])
def test_python_api_and_server_refuse_the_same_parameters(parameters):
    with pytest.raises(ValueError, match="'g'"):
        as_tool({"name": "g", "parameters": parameters})
    with pytest.raises(ValueError, match="'g'"):
        Tool("g", "d", parameters)
    engine = FakeEngine(ANSWER)
    with running(create_app(engine, model_id=MODEL, max_tokens=10)) as url, httpx.Client(timeout=20) as x:
        bad = {"type": "function", "function": {"name": "g", "parameters": parameters}}
        err = _error(x.post(f"{url}/v1/chat/completions", json={**OK, "tools": [_fn("f"), bad]}), 400)
        assert err["param"].startswith("tools[1].function.parameters"), err
        bad_r = {"type": "function", "name": "g", "parameters": parameters}
        err = _error(x.post(f"{url}/v1/responses", json={"model": MODEL, "input": "x", "tools": [bad_r]}), 400)
        assert err["param"].startswith("tools[0]"), err
    assert not engine.submitted


def test_python_api_tool_names_fullmatch_and_duplicates_are_refused():
    def f(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="'f\\\\n'"):
        as_tool({"name": "f\n", "parameters": {"type": "object", "properties": {}}})
    with pytest.raises(ValueError, match="'f\\\\n'"):
        Tool("f\n", "d", {"type": "object"})
    f.__name__ = "f\n"
    with pytest.raises(ValueError, match="'f\\\\n'"):
        as_tool(f)
    f.__name__ = "f"
    tools = unique_tools([f, {"type": "function", "function": {"name": "g", "description": None}}, Tool("h", "H", {})])
    assert [t.name for t in tools] == ["f", "g", "h"] and all(isinstance(t, Tool) for t in tools)
    assert tools[1].description == "g" and tools[1].parameters == {"type": "object", "properties": {}}
    with pytest.raises(ValueError, match="'f'") as e:
        unique_tools([f, {"name": "g"}, {"name": "f", "description": "another f"}])
    assert (e.value.name, e.value.index, e.value.first) == ("f", 2, 0)
    with pytest.raises(TypeError, match="list"):
        unique_tools({"name": "f"})  # one tool, not a list of them


class _CallableTool:
    def __call__(self, city: str) -> str:
        return city


def _unresolvable(x: Undefined) -> str:  # noqa: F821 - the point of the test
    """Doc."""
    return ""


@pytest.mark.parametrize("tool, named", [
    (functools.partial(_weather), "_weather"), (functools.partial(_weather, "Oslo"), "_weather"),
    (_CallableTool(), "_CallableTool"), (_unresolvable, "_unresolvable"), ({"name": "f", "parameters": [1]}, "'f'"),
    ({"name": "f", "parameters": "abc"}, "'f'"), ({"name": 5}, "5"), ({"name": "f", "description": 3}, "'f'"),
    ({"type": "function", "function": "f"}, "'f'"), (len, "len"),
], ids=["partial", "partial_bound", "callable_object", "unresolvable_hint", "parameters_list", "parameters_str",
        "name_int", "description_int", "function_str", "builtin"])  # fmt: skip
def test_bad_tools_give_a_clear_error_naming_the_tool(tool, named):
    for make in (as_tool, lambda t: unique_tools([t])):
        with pytest.raises((ValueError, TypeError)) as e:
            make(tool)
        assert type(e.value) in (ValueError, TypeError), f"{type(e.value).__name__}: {e.value}"
        assert "tool" in str(e.value) and named in str(e.value), str(e.value)
    if callable(tool) and not isinstance(tool, dict):
        with pytest.raises((ValueError, TypeError)):
            tool_from_function(tool)


# -- item 29a: message.reasoning is always there (null when there is none) ------------------------------


def test_message_reasoning_is_null_without_reasoning_and_the_docs_snippet_runs():
    import contextlib
    import io

    with running(create_app(FakeEngine([FinalDelta("Hello"), FinalDelta(" there")]), model_id=MODEL, max_tokens=50)) as url:
        msg = client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}]).choices[0].message
        assert (msg.content, msg.reasoning, msg.reasoning_content) == ("Hello there", None, None)
        blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
        snippet = next(b for b in blocks if "# Chat Completions" in b and "OpenAI(base_url=" in b)
        code = snippet.replace('"http://127.0.0.1:8000/v1"', repr(f"{url}/v1"))
        code = re.sub(r'^M = ".*"$', f"M = {MODEL!r}", code, flags=re.M)
        assert repr(f"{url}/v1") in code and f"M = {MODEL!r}" in code
        with contextlib.redirect_stdout(io.StringIO()) as out:
            exec(compile(code, str(DOCS), "exec"), {})  # noqa: S102 - the docs' own example
    assert "Hello there None" in out.getvalue()
    with running(create_app(FakeEngine(ANSWER), model_id=MODEL, max_tokens=50)) as url:
        msg = client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}]).choices[0].message
        assert msg.reasoning == msg.reasoning_content == "Thinking."


# -- item 7a: reasoning tokens counted from the stream, never re-encoded -----------------------------------


def test_reasoning_tokens_are_counted_from_the_stream_not_re_encoded():
    class Encoding:
        calls = 0

        def encode(self, *a, **k):
            Encoding.calls += 1
            return [0] * 1000

    engine = FakeEngine(ANSWER)  # two reasoning deltas: two generated tokens of reasoning
    engine.model = type("M", (), {"tokenizer": type("T", (), {"encoding": Encoding()})()})()
    with running(create_app(engine, model_id=MODEL, max_tokens=50)) as url:
        c = client(url)
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
        assert r.usage.completion_tokens_details.reasoning_tokens == 2
        chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True,
                                                stream_options={"include_usage": True}))  # fmt: skip
        assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 2
        assert c.responses.create(model=MODEL, input="Hi").usage.output_tokens_details.reasoning_tokens == 2
    assert Encoding.calls == 0


# -- the real engine: costly text, the start-up line -------------------------------------------------------


@pytest.fixture(scope="module")
def real(vocab_model_dir):
    from mlx_gptoss import load
    from mlx_gptoss.server.engine import Engine
    from mlx_gptoss.testing import rig

    model = load(vocab_model_dir)
    rig(model, "<|channel|>final<|message|>Fine.<|return|>")
    engine = Engine(model, max_queue=2)
    try:
        with running(create_app(engine, model_id=MODEL, max_tokens=20)) as url:
            yield url
    finally:
        engine.close()


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_text_too_costly_to_encode_is_a_400_while_health_answers(real, api):
    url = real
    if api == "chat":
        path, body, param = "/v1/chat/completions", {**OK, "messages": [{"role": "user", "content": "a" * 200_000}]}, \
            "messages[0].content"  # fmt: skip
    else:
        path, body, param = "/v1/responses", {"model": MODEL, "input": [{"role": "user", "content": "a" * 200_000}]}, \
            "input[0].content"  # fmt: skip
    answers: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
            answers.append(time.monotonic() - t0)
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        t0 = time.monotonic()
        r = httpx.post(url + path, json=body, timeout=10)
        took = time.monotonic() - t0
    finally:
        stop.set()
        poller.join(10)
    err = _error(r, 400)
    assert err["param"] == param, err
    assert took < 2, f"the refusal took {took:.1f} s"
    assert answers and max(answers) < 1, answers
    ok = httpx.post(f"{url}/v1/chat/completions", json={**OK, "temperature": 0}, timeout=30)  # and it still serves
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "Fine."


def test_serve_answers_its_bind_address_logs_the_budget_and_says_when_it_cannot_start(monkeypatch):
    import logging
    import types

    import uvicorn

    from mlx_gptoss.server import app as app_mod

    seen: dict = {}

    class Engine(FakeEngine):
        def __init__(self, model, **options):
            super().__init__(ANSWER)

        def close(self) -> None:
            seen["closed"] = True

    def run(self, sockets=None) -> None:  # as uvicorn does when the port is taken: returns, never started
        seen["app"] = self.config.app

    monkeypatch.setattr(app_mod, "Engine", Engine)
    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setattr(logging.getLogger("uvicorn.error"), "info", lambda msg, *a, **k: seen.setdefault("line", msg))
    model = types.SimpleNamespace(memory_plan=types.SimpleNamespace(budget=12e9))
    with pytest.raises(OSError, match="could not start on 192.168.1.5:8123"):
        serve(model, model_id=MODEL, host="192.168.1.5", port=8123, api_key="k", adapter="my-adapter")
    assert seen["closed"]
    assert seen["line"] == (f"mlx-gptoss: serving {MODEL} at http://192.168.1.5:8123/v1 (adapter my-adapter; memory budget "
                            f"12.0 GB; Host localhost, 127.0.0.1, [::1], 192.168.1.5; API key required)")  # fmt: skip
    monkeypatch.undo()  # uvicorn runs again
    with running(seen["app"]) as url, httpx.Client(timeout=20) as x:
        key = {"Authorization": "Bearer k"}
        assert x.post(f"{url}/v1/chat/completions", json=OK, headers={"Host": "192.168.1.5:8123", **key}).status_code == 200
        _error(x.post(f"{url}/v1/chat/completions", json=OK, headers={"Host": "192.168.1.6", **key}), 403)


def test_serve_logs_one_start_line(vocab_model_dir, tmp_path):
    from test_lora_serve import make_adapter

    _, adapter = make_adapter(vocab_model_dir, tmp_path / "my-adapter", ("attention",))
    model = tmp_path / "served-model-id"
    model.symlink_to(vocab_model_dir, target_is_directory=True)
    port = free_port()
    proc = subprocess.Popen([*CLI, "serve", "-m", str(model), "--port", str(port), "--adapter", str(adapter),
                             "--allowed-host", "box.local", "--allowed-host", "10.1.2.3"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: how a server is stopped
        log = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0 and "Traceback" not in log, log
    before = log.split("Uvicorn running")[0]  # said before uvicorn starts
    lines = [line for line in before.splitlines() if "served-model-id" in line]
    assert len(lines) == 1, log
    line = lines[0]
    for part in (f"http://127.0.0.1:{port}/v1", str(adapter), "box.local", "10.1.2.3", "localhost", "no API key"):
        assert part in line, (part, line)
