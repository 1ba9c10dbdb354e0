"""Chat sessions that a failed turn never poisons, context policies for long conversations, and
a terminal chat that reports problems and keeps the conversation."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date

import mlx.core as mx
import pytest
from test_chat import THINK_ANSWER, TOOL_CALL, Script, assert_matches_scratch, get_weather

import mlx_gptoss
from mlx_gptoss.chat import ChatSession
from mlx_gptoss.generate import PromptTooLongError
from mlx_gptoss.harmony import ToolCallStarted

DAY = date(2026, 1, 2)


@pytest.fixture(scope="module")
def model(vocab_model_dir):
    return mlx_gptoss.load(vocab_model_dir, dtype=mx.float32)


def started(model, **kw) -> ChatSession:
    chat = model.chat(instructions="Be brief.", today=DAY, **kw)
    chat.send("Hello there", max_tokens=6)
    return chat


def assert_next_turn_like_fresh(model, chat: ChatSession, before: list[dict], **kw) -> None:
    """The failed turn left no trace: the next turn equals a fresh session's with the same history."""
    assert chat.messages == before
    reply = chat.send("And now?", max_tokens=6)
    fresh = ChatSession.from_json(model, json.dumps({"messages": before}), **kw)
    expected = fresh.send("And now?", max_tokens=6)
    assert chat.last_prompt_ids == fresh.last_prompt_ids
    assert reply.stats.tokens == expected.stats.tokens and reply.final == expected.final
    assert chat.messages == fresh.messages


class Boom:
    """A sampler that is greedy for a few tokens, then raises (as a Ctrl-C or a failing device would)."""

    def __init__(self, exc: BaseException, after: int = 3):
        self.exc, self.after, self.n = exc, after, 0

    def __call__(self, logits):
        self.n += 1
        if self.n > self.after:
            raise self.exc
        return mx.argmax(logits, axis=-1)


FAILURES = {
    "prompt too long": (lambda c: c.send("word " * 5000, max_tokens=6), PromptTooLongError, "exceeds the context of 4096"),
    "lone surrogate": (lambda c: c.send("caf\udce9 au lait", max_tokens=6), ValueError, "not valid Unicode"),
    # refused by the encode-cost check before harmony (which would panic on it)
    "text too costly to tokenize": (lambda c: c.send("a" * 1_000_000, max_tokens=6), ValueError, "too costly to tokenize"),
    "negative temperature": (lambda c: c.send("x", temperature=-1), ValueError, "temperature must be a number >= 0"),
    "max_tokens 0": (lambda c: c.send("x", max_tokens=0), ValueError, "max_tokens must be an integer >= 1"),
    "max_tokens over the context": (lambda c: c.send("x", max_tokens=4096), PromptTooLongError, "leaves no room"),
    "unknown option": (lambda c: c.send("x", temprature=1), TypeError, "unknown option"),
    "bad top_k": (lambda c: c.send("x", top_k=-1), ValueError, "top_k"),
    "bad stop": (lambda c: c.send("x", stop=[1]), ValueError, "stop must be"),
    "bad tool result": (lambda c: c.send_tool_result("get_weather", "\ud800"), ValueError, "not valid Unicode"),
    "sampler error mid-turn": (
        lambda c: c.send("x", sampler=Boom(RuntimeError("device lost")), max_tokens=9),
        RuntimeError,
        "device lost",
    ),
    "Ctrl-C mid-turn": (lambda c: c.send("x", sampler=Boom(KeyboardInterrupt()), max_tokens=9), KeyboardInterrupt, None),
    "Ctrl-C in prefill": (
        lambda c: c.send("x", sampler=Boom(KeyboardInterrupt(), after=0), max_tokens=9),
        KeyboardInterrupt,
        None,
    ),
}


@pytest.mark.parametrize("kind", FAILURES)
def test_a_failed_turn_leaves_the_session_as_it_was(model, kind):
    fail, exc, match = FAILURES[kind]
    chat = started(model)
    before, n_cached = chat.messages, len(chat._tokens)
    with pytest.raises(exc, match=match):
        fail(chat)
    if kind in ("prompt too long", "lone surrogate", "text too costly to tokenize", "negative temperature", "bad stop"):
        assert len(chat._tokens) == n_cached  # refused before anything ran: the KV cache is untouched
    assert_next_turn_like_fresh(model, chat, before)


def test_a_stream_closed_before_done_is_undone_but_one_closed_at_done_is_kept(model):
    chat = started(model)
    before = chat.messages
    events = chat.stream("x", sampler=Script(model.tokenizer, THINK_ANSWER.format("long thoughts " * 5, "ok")), max_tokens=60)
    next(events)
    events.close()
    assert_next_turn_like_fresh(model, chat, before)
    for _ in chat.stream("y", max_tokens=4):
        pass  # exhausted: kept
    n = len(chat.messages)
    for ev in chat.stream("z", max_tokens=4):
        if type(ev).__name__ == "Done":
            break  # a consumer that stops at Done keeps its turn
    assert len(chat.messages) > n and chat.messages[n]["content"][0]["text"] == "z"


def test_a_failed_turn_gives_back_its_tool_call_ids(model):
    chat = model.chat(tools=[get_weather], today=DAY)
    calling = TOOL_CALL.format("Tool.", "get_weather", '{"city": "Paris", "unit": "c"}')
    script = Script(model.tokenizer, calling)
    seen = []
    with pytest.raises(KeyboardInterrupt):
        for ev in chat.stream("Paris?", sampler=script, max_tokens=100):
            if isinstance(ev, ToolCallStarted):
                seen.append(ev.call_id)
                raise KeyboardInterrupt  # the user gives up in the middle of the call's arguments
    assert seen == ["call_1"] and chat.messages[-1]["role"] == "developer"
    r = chat.send("Paris?", sampler=Script(model.tokenizer, calling), max_tokens=100)
    assert [c.id for c in r.tool_calls] == ["call_1"]


def test_cancel_is_not_a_failure(model):
    chat = started(model)
    before = chat.messages
    script = Script(model.tokenizer, THINK_ANSWER.format("thinking " * 20, "never"))
    events = chat.stream("Go", sampler=script, max_tokens=100)
    next(events)
    chat.cancel()
    reply = list(events)[-1].reply
    assert reply.finish_reason == "cancelled" and chat.messages[len(before)]["content"][0]["text"] == "Go"
    s = Script(model.tokenizer, THINK_ANSWER.format("ok", "Back."))
    r = chat.send("Again", sampler=s, max_tokens=100)
    assert r.final == "Back."
    assert_matches_scratch(model, chat, s, r)


def test_an_unusable_saved_conversation_is_refused_naming_the_message(model):
    bad = json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                   {"role": "tool", "content": [{"type": "text", "text": "x"}]}]})  # fmt: skip
    with pytest.raises(ValueError, match=r"message 1 \(tool\) cannot be used: .*name"):
        ChatSession.from_json(model, bad)


# -- context policies -------------------------------------------------------------------------

CTX, REPLY = 300, 32


def fill(chat: ChatSession, until_drop: bool = True, turns: int = 12):
    """Scripted turns (a question, a short reasoning and answer) until the policy drops a turn."""
    for i in range(turns):
        before = chat.context_messages
        text = f"Question {i}: tell me about the number {i} in a few words."
        script = Script(chat.model.tokenizer, THINK_ANSWER.format(f"number {i}", f"It is {i}."))
        reply = chat.send(text, sampler=script, max_tokens=REPLY)
        assert reply.final == f"It is {i}."
        if until_drop and reply.dropped_turns:
            return reply, script, before, text
    assert not until_drop, "no turn was dropped"


@pytest.mark.parametrize("policy", ["drop_oldest", "rolling"])
def test_dropping_turns_equals_a_fresh_session_with_the_reduced_history(model, policy):
    chat = model.chat(instructions="Be brief.", today=DAY, context=CTX, max_tokens=REPLY, context_policy=policy)
    reply, script, before, text = fill(chat)
    assert len(chat.messages) > len(chat.context_messages)  # hidden turns stay in the transcript
    visible = chat.context_messages
    assert [m["role"] for m in visible[:3]] == ["system", "developer", "user"]  # instructions kept, whole turns dropped
    assert len(chat.last_prompt_ids) + REPLY <= CTX
    if policy == "rolling":
        assert len(chat.last_prompt_ids) <= (CTX - REPLY) // 2
    # what the model saw equals a fresh session given the reduced history
    reduced = visible[:-3]  # less this turn's user message and the reply (reasoning + answer)
    assert visible[-3]["content"][0]["text"] == text
    fresh = ChatSession.from_json(model, json.dumps({"messages": reduced}), context=CTX, max_tokens=REPLY)
    again = fresh.send(text, sampler=Script(model.tokenizer, THINK_ANSWER.format(*_think_answer(reply))), max_tokens=REPLY)
    assert again.dropped_turns == 0 and fresh.last_prompt_ids == chat.last_prompt_ids
    assert again.stats.tokens == reply.stats.tokens
    # the logits after the drop (the KV cache cut back to the instructions) equal a from-scratch forward
    assert_matches_scratch(model, chat, script, reply)
    # and the next turn reuses the cache again
    nxt, s = _say(chat, "One more?", ("fine", "Yes."))
    assert_matches_scratch(model, chat, s, nxt)
    if policy == "rolling":
        assert nxt.dropped_turns == 0 and nxt.stats.prefill_tokens < nxt.stats.prompt_tokens // 2


def _think_answer(reply):
    return reply.reasoning, reply.final


def _say(chat, text, think_answer):
    s = Script(chat.model.tokenizer, THINK_ANSWER.format(*think_answer))
    return chat.send(text, sampler=s, max_tokens=REPLY), s


def test_error_policy_names_the_numbers_and_changes_nothing(model):
    chat = model.chat(instructions="Be brief.", today=DAY, context=CTX, max_tokens=REPLY, context_policy="error")
    with pytest.raises(PromptTooLongError, match=rf"prompt of \d+ tokens; with max_tokens={REPLY} .* context of {CTX} tokens"):
        for _ in range(12):
            before = chat.messages
            fill(chat, until_drop=False, turns=1)
    assert chat.messages == before
    with pytest.raises(ValueError, match="context_policy"):
        model.chat(context_policy="truncate")


def test_a_tool_call_is_never_separated_from_its_result(model):
    chat = model.chat(tools=[get_weather], today=DAY, context=260, max_tokens=REPLY, context_policy="drop_oldest")
    s = Script(model.tokenizer, TOOL_CALL.format("Tool.", "get_weather", '{"city": "Oslo"}'))
    r = chat.send("Weather in Oslo?", sampler=s, max_tokens=40)
    chat.send_tool_result(r.tool_calls[0], get_weather("Oslo"), sampler=Script(model.tokenizer, THINK_ANSWER.format("ok", "21.")),
                          max_tokens=REPLY)  # fmt: skip
    reply, *_ = fill(chat)
    conv = [m for m in chat.context_messages if m["role"] not in ("system", "developer")]
    assert conv[0]["role"] == "user" and not any(m["role"] == "tool" for m in conv)


def test_run_says_when_max_steps_stopped_it(model):
    chat = model.chat(tools=[get_weather], today=DAY)
    orig = chat._turn

    def always_call(message, options):
        script = Script(model.tokenizer, TOOL_CALL.format("Again.", "get_weather", '{"city": "Rome"}'))
        return orig(message, {**options, "sampler": script})

    chat._turn = always_call
    reply = chat.run("Rome?", max_steps=2, max_tokens=60)
    assert reply.finish_reason == "max_steps" and "max_steps=2" in reply.problems[-1]
    assert sum(m["role"] == "tool" for m in chat.messages) == 2


# -- the terminal chat ----------------------------------------------------------------------


def chat_cli(model_dir, lines: list[str], *args: str, home=None) -> subprocess.CompletedProcess:
    env = None
    if home is not None:
        import os

        env = {**os.environ, "HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "mlx_gptoss.cli", "chat", "-m", str(model_dir), *args],
                          input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=600, env=env)  # fmt: skip


def test_repl_reports_a_failed_turn_and_keeps_the_conversation(vocab_model_dir, tmp_path):
    saved = tmp_path / "conv.json"
    lines = ["word " * 5000, "Hello", '"""', "line one", "/not a command", '"""', f"/save {saved}"]
    res = chat_cli(vocab_model_dir, lines, "--max-tokens", "4", home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert "error: the conversation makes a prompt of" in res.stderr and "exceeds the context of 4096" in res.stderr
    conv = json.loads(saved.read_text())["messages"]
    users = [m["content"][0]["text"] for m in conv if m["role"] == "user"]
    assert users == ["Hello", "line one\n/not a command"]  # the refused message is not kept; the block is one message


def test_repl_with_a_small_context_caps_the_reply_and_answers(vocab_model_dir, tmp_path):
    saved = tmp_path / "conv.json"
    res = chat_cli(vocab_model_dir, ["Hello", f"/save {saved}"], "--memory-budget", "10GB", "--context", "1024", "--temp", "0.8",
                   "--seed", "7", "--top-k", "50", "--min-p", "0.05", home=tmp_path)  # fmt: skip
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "(the context is 1024 tokens: replies up to 512 tokens" in res.stderr
    assert "512 tokens — max tokens reached" in res.stderr or "tokens |" in res.stderr
    roles = [m["role"] for m in json.loads(saved.read_text())["messages"]]
    assert roles[:2] == ["system", "user"] and "assistant" in roles


def test_repl_load_of_a_bad_file_keeps_the_current_conversation(model, tmp_path):
    import io

    from mlx_gptoss.repl import Repl

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"messages": [{"role": "tool", "content": [{"type": "text", "text": "x"}]}]}))
    chat = started(model)
    before = chat.messages
    lines = iter([f"/load {bad}"])
    err = io.StringIO()

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    repl = Repl(chat, read=read, out=io.StringIO(), err=err)
    repl.run()
    assert f"cannot load {bad}: conversation message 0 (tool)" in err.getvalue()
    assert repl.session is chat and chat.messages == before


def test_history_file_errors_are_ignored(tmp_path):
    from mlx_gptoss.repl import enable_history

    pytest.importorskip("readline")
    blocked = tmp_path / "file"
    blocked.write_text("")
    save = enable_history(blocked / "sub" / "history")  # its folder cannot be made
    assert save is not None
    save()  # and cannot be written: no error either
    good = tmp_path / "cache" / "history"
    enable_history(good)()
    assert good.exists()


def test_example_app_warns_when_the_tool_loop_runs_out_of_steps(model, monkeypatch, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "app_with_tools.py"
    spec = importlib.util.spec_from_file_location("app_with_tools", path)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    orig = ChatSession._turn

    def always_call(self, message, options):  # a model that never stops asking for the tool
        script = Script(model.tokenizer, TOOL_CALL.format("More.", "convert_units", '{"value": 1, "unit": "km"}'))
        return orig(self, message, {**options, "sampler": script, "max_tokens": 60})

    monkeypatch.setattr(ChatSession, "_turn", always_call)
    monkeypatch.setattr(app.mlx_gptoss, "load", lambda *a, **k: model)
    monkeypatch.setattr(sys, "argv", ["app", "model", "1 km in miles?"])
    app.main()
    err = capsys.readouterr().err
    assert "warning: stopped after 6 tool calls" in err and err.count("[functions.convert_units] ->") == 6
