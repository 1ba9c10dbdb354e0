"""Chat sessions: KV reuse equals prefilling from scratch, tools, streaming, cancellation, stops,
the conversation as data, and robustness to malformed output."""

from __future__ import annotations

import json
import threading
import time
from typing import Literal

import mlx.core as mx
import numpy as np
import pytest

import mlx_gptoss
from mlx_gptoss.chat import ChatSession, Done
from mlx_gptoss.harmony import ReasoningDelta, ToolCallCompleted, ToolCallStarted
from mlx_gptoss.tools import as_tool, tool_from_function

THINK_ANSWER = "<|channel|>analysis<|message|>{}<|end|><|start|>assistant<|channel|>final<|message|>{}<|return|>"
TOOL_CALL = ("<|channel|>analysis<|message|>{}<|end|><|start|>assistant<|channel|>commentary to=functions.{} "
             "<|constrain|>json<|message|>{}<|call|>")  # fmt: skip


@pytest.fixture(scope="module")
def model(vocab_model_dir):
    return mlx_gptoss.load(vocab_model_dir, dtype=mx.float32)


class Script:
    """A fake sampler: emits scripted tokens whatever the logits say, and records the logits."""

    def __init__(self, tok, text: str, *, delay: float = 0.0, started: threading.Event | None = None):
        self.tokens = tok.encode(text, allow_special=True)
        self.logits: list[mx.array] = []
        self.delay, self.started = delay, started

    def __call__(self, logits: mx.array) -> mx.array:
        self.logits.append(logits.astype(mx.float32))
        i = len(self.logits) - 1
        if self.started is not None and i >= 2:
            self.started.set()
        if self.delay:
            time.sleep(self.delay)
        return mx.array([self.tokens[i] if i < len(self.tokens) else 0])


def say(session: ChatSession, text: str, script_text: str, **kw):
    script = Script(session.model.tokenizer, script_text)
    return session.send(text, sampler=script, max_tokens=200, **kw), script


def assert_matches_scratch(model, session: ChatSession, script: Script, reply) -> None:
    """Every logit the session computed (with KV reuse) equals a from-scratch forward."""
    prompt, gen = session.last_prompt_ids, reply.stats.tokens
    full = np.array(model(mx.array(prompt + gen[:-1])[None])[0, len(prompt) - 1 :])
    got = np.stack([np.array(x[0]) for x in script.logits[: len(gen)]])
    np.testing.assert_allclose(got, full, rtol=0, atol=1e-4 * np.abs(full).max())


def get_weather(city: str, unit: Literal["c", "f"] = "c") -> dict:
    """Current weather for a city.

    Args:
        city: the city's name.
        unit: c for Celsius, f for Fahrenheit.
    """
    return {"city": city, "temperature": 21 if unit == "c" else 70}


def test_multi_turn_with_tools_reuses_kv_and_equals_scratch(model):
    chat = model.chat(instructions="Be brief.", reasoning_effort="low", tools=[get_weather])
    window = model.config.sliding_window
    r1, s1 = say(chat, "Hi there, who are you?", THINK_ANSWER.format("Greeting; answer politely.", "Hello! I am a model."))
    assert r1.final == "Hello! I am a model." and r1.reasoning == "Greeting; answer politely." and r1.finish_reason == "stop"
    assert_matches_scratch(model, chat, s1, r1)
    assert len(chat.last_prompt_ids) > 4 * window  # the conversation is longer than the sliding window

    r2, s2 = say(chat, "What's the weather in Paris?", TOOL_CALL.format("Need the tool.", "get_weather", '{"city": "Paris"}'))
    assert r2.finish_reason == "tool_calls" and r2.tool_calls[0].name == "get_weather"
    assert r2.tool_calls[0].arguments == {"city": "Paris"}
    assert_matches_scratch(model, chat, s2, r2)
    # turn 2 recomputes only the new user message and the previous reply (its reasoning is dropped)
    assert r2.stats.prefill_tokens < r2.stats.prompt_tokens // 2

    s3 = Script(chat.model.tokenizer, THINK_ANSWER.format("Got it.", "It is 21 degrees in Paris."))
    r3 = chat.send_tool_result(r2.tool_calls[0], get_weather("Paris"), sampler=s3, max_tokens=200)
    assert r3.final == "It is 21 degrees in Paris."
    assert_matches_scratch(model, chat, s3, r3)
    # the re-rendered call header and the tool result, not the conversation
    assert r3.stats.prefill_tokens < r3.stats.prompt_tokens // 4

    r4, s4 = say(chat, "Thanks!", THINK_ANSWER.format("Polite.", "You're welcome."))
    assert_matches_scratch(model, chat, s4, r4)
    roles = [m["role"] for m in chat.messages]
    assert roles == ["system", "developer", "user", "assistant", "assistant", "user", "assistant", "assistant", "tool",
                     "assistant", "assistant", "user", "assistant", "assistant"]  # fmt: skip


def test_run_executes_python_tools_until_an_answer(model):
    chat = model.chat(tools=[get_weather])
    scripts = iter([TOOL_CALL.format("Use tool.", "get_weather", '{"city": "Oslo", "unit": "f"}'),
                    THINK_ANSWER.format("Done.", "70 F in Oslo.")])  # fmt: skip
    tok = model.tokenizer

    class Turns:
        def __init__(self):
            self.script = Script(tok, next(scripts))

        def __call__(self, logits):
            return self.script(logits)

    # one sampler per turn: run() passes the same options to each call
    calls = []
    orig = chat._turn

    def turn(message, options):
        calls.append(message)
        return orig(message, {**options, "sampler": Turns()})

    chat._turn = turn
    reply = chat.run("Weather in Oslo in F?", max_steps=3)
    assert reply.final == "70 F in Oslo." and len(calls) == 2
    tool_msg = [m for m in chat.messages if m["role"] == "tool"][0]
    assert '"temperature": 70' in tool_msg["content"][0]["text"] and tool_msg["name"] == "functions.get_weather"


def test_stream_yields_typed_events(model):
    chat = model.chat(tools=[get_weather])
    script = Script(model.tokenizer, TOOL_CALL.format("Check.", "get_weather", '{"city": "Rome"}'))
    events = list(chat.stream("Rome?", sampler=script, max_tokens=100))
    kinds = {type(e) for e in events}
    assert {ReasoningDelta, ToolCallStarted, ToolCallCompleted, Done} <= kinds and isinstance(events[-1], Done)
    assert events[-1].reply.tool_calls[0].arguments == {"city": "Rome"}


def test_stop_strings_cut_the_answer(model):
    chat = model.chat()
    r, _ = say(chat, "Count.", THINK_ANSWER.format("ok", "one two STOP three four"), stop=["STOP"])
    assert r.final == "one two " and r.finish_reason == "stop"
    assert chat.messages[-1]["content"][0]["text"] == "one two "


def test_cancel_from_another_thread_leaves_the_session_usable(model):
    chat = model.chat()
    started = threading.Event()
    slow = Script(model.tokenizer, THINK_ANSWER.format("thinking " * 30, "never"), delay=0.02, started=started)
    out = {}
    worker = threading.Thread(target=lambda: out.update(reply=chat.send("Go", sampler=slow, max_tokens=300)))
    worker.start()
    assert started.wait(30)
    chat.cancel()
    worker.join(30)
    assert out["reply"].finish_reason == "cancelled" and out["reply"].stats.generation_tokens < 60
    r, s = say(chat, "Again", THINK_ANSWER.format("fine", "Back."))
    assert r.final == "Back."
    assert_matches_scratch(model, chat, s, r)


def test_malformed_output_never_raises(model):
    chat = model.chat()
    r, _ = say(chat, "?", "<|channel|><|message|>oops<|end|>garbage<|start|>assistant<|channel|>final<|message|>ok<|return|>")
    assert r.problems and "ok" in r.final
    r2, _ = say(chat, "again", "<|channel|>final<|message|>fine<|return|>")
    assert r2.final == "fine" and not r2.problems


def test_conversation_json_roundtrip(model):
    chat = model.chat(instructions="Be brief.", reasoning_effort="high", tools=[get_weather])
    say(chat, "Hi", THINK_ANSWER.format("hm", "Hello."))
    payload = chat.to_json()
    again = ChatSession.from_json(model, payload, tools=[get_weather])
    assert again.messages == chat.messages and again.reasoning_effort == "high" and "get_weather" in again.tools
    r, s = say(again, "More", THINK_ANSWER.format("x", "Sure."))
    assert r.final == "Sure."
    assert_matches_scratch(model, again, s, r)
    with pytest.raises(ValueError, match="harmony conversation"):
        ChatSession.from_json(model, '{"nope": 1}')


def test_effort_and_reset(model):
    chat = model.chat(instructions="X", reasoning_effort="low")
    say(chat, "Hi", THINK_ANSWER.format("a", "b"))
    chat.reasoning_effort = "high"
    assert chat.reasoning_effort == "high" and "Reasoning: high" in model.tokenizer.decode(
        chat.encoding.render_conversation_for_completion(__import__("openai_harmony").Conversation.from_messages(chat._messages),
                                                         __import__("openai_harmony").Role.ASSISTANT))  # fmt: skip
    chat.reset()
    assert [m["role"] for m in chat.messages] == ["system", "developer"]
    r, s = say(chat, "Hi again", THINK_ANSWER.format("c", "d"))
    assert_matches_scratch(model, chat, s, r)


def test_unknown_option(model):
    chat = model.chat()
    with pytest.raises(TypeError, match="unknown option"):
        chat.send("x", temprature=1)


def test_tool_schema_from_a_function():
    t = tool_from_function(get_weather)
    assert t.name == "get_weather" and t.description == "Current weather for a city."
    assert t.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "the city's name."},
            "unit": {"enum": ["c", "f"], "description": "c for Celsius, f for Fahrenheit.", "default": "c"},
        },
        "required": ["city"],
    }
    schema = as_tool(
        {"type": "function", "function": {"name": "lookup", "description": "Find.", "parameters": {"type": "object"}}}
    )
    assert schema.name == "lookup" and schema.fn is None
    with pytest.raises(TypeError, match="explicit schema"):
        tool_from_function(_bad_tool)


def _bad_tool(x: complex) -> None:
    """No JSON type for complex numbers."""


def test_chat_command_runs_the_repl(vocab_model_dir, tmp_path):
    from click.testing import CliRunner

    from mlx_gptoss.cli import main

    saved = tmp_path / "conv.json"
    lines = ["Hello", "/effort low", f"/save {saved}", "/reset", f"/load {saved}", "/reasoning", "/bogus", "Again", "/quit"]
    res = CliRunner().invoke(main, ["chat", "-m", str(vocab_model_dir), "--max-tokens", "4", "--system", "Be terse."],
                             input="\n".join(lines) + "\n")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "(reasoning effort: low)" in res.stderr and f"(saved to {saved})" in res.stderr
    conv = json.loads(saved.read_text())
    assert f"(loaded {len(conv['messages'])} messages" in res.stderr and "unknown command /bogus" in res.stderr
    assert res.stderr.count("tokens") >= 2  # per-turn statistics
    assert [m["role"] for m in conv["messages"]][:3] == ["system", "developer", "user"]
    assert conv["messages"][0]["content"][0]["reasoning_effort"] == "Low"
