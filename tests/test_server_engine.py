"""The server's engine: stateless conversations reuse the KV cache as a chat session does, the
prompt cache (interleaving, LRU by bytes), the queue bound, cancel, failures, asyncio events."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import date

import mlx.core as mx
import numpy as np
import pytest
from test_chat import THINK_ANSWER, TOOL_CALL, Script

import mlx_gptoss
from mlx_gptoss.chat import ChatSession, Done
from mlx_gptoss.generate import PromptTooLongError
from mlx_gptoss.harmony import FinalDelta, developer_message, system_message
from mlx_gptoss.server.engine import Engine, EngineClosed, QueueFull
from mlx_gptoss.tools import as_tool

DAY = date(2026, 1, 2)


@pytest.fixture(scope="module")
def model(vocab_model_dir):
    return mlx_gptoss.load(vocab_model_dir, dtype=mx.float32)


@pytest.fixture
def engine(model):
    eng = Engine(model, max_queue=4, cache_bytes=1 << 40)
    yield eng
    eng.close()


def lookup(topic: str) -> dict:
    """Look a topic up in the notes."""
    return {"topic": topic, "notes": "nothing unusual"}


def start(instructions: str = "Answer briefly.") -> list:
    """The system and developer messages a client sends first (as a ChatSession holds them)."""
    return [system_message("low", today=DAY), developer_message(instructions, [as_tool(lookup)])]


def user(text: str):
    from openai_harmony import Message, Role

    return Message.from_role_and_content(Role.USER, text)


def tool_result(call, content: str):
    from openai_harmony import Author, Message, Role

    msg = Message.from_author_and_content(Author.new(Role.TOOL, call.recipient), content)
    return msg.with_recipient("assistant").with_channel("commentary")


def run(job) -> tuple[list, object]:
    events = list(job.events())
    assert isinstance(events[-1], Done)
    return events[:-1], events[-1].reply


class Rec(Script):
    """A Script whose logits are read in the thread that computed them (the engine's worker)."""

    def __call__(self, logits):
        out = super().__call__(logits)
        self.logits[-1] = np.array(self.logits[-1])
        return out


def script_for(n: int) -> str:
    if n % 5 == 0:
        return TOOL_CALL.format(f"t{n}", "lookup", f'{{"topic": "t{n}"}}')
    return THINK_ANSWER.format(f"t{n}", f"A{n}.")


def test_stateless_conversation_computes_what_a_chat_session_computes(model, engine):
    """20 turns, each request the whole conversation: the same prompt tokens computed, the same
    replies and logits, as one in-process session with KV reuse."""
    tok = model.tokenizer
    chat = ChatSession(model, instructions="Answer briefly.", reasoning_effort="low", tools=[lookup], today=DAY)
    conv = start()
    in_process = stateless = prompt_total = 0
    prev = None  # the previous reply, whose tool call a tool turn answers
    for n in range(1, 21):
        text = f"Q{n}?"
        steps = [(script_for(n), None)] + ([(THINK_ANSWER.format("ok", f"D{n}."), "tool")] if n % 5 == 0 else [])
        for k, (reply_text, kind) in enumerate(steps):
            s_chat, s_eng = Script(tok, reply_text), Rec(tok, reply_text)
            if kind is None:
                want = chat.send(text, sampler=s_chat, max_tokens=40)
                conv = conv + [user(text)]
            else:
                want = chat.send_tool_result(prev.tool_calls[0], lookup(f"t{n}"), sampler=s_chat, max_tokens=40)
                conv = conv + [tool_result(prev.tool_calls[0], json.dumps(lookup(f"t{n}")))]
            _, got = run(engine.submit(conv, sampler=s_eng, max_tokens=40))
            conv = conv + got.messages  # what a client sends back: the reply as harmony messages
            assert got.stats.prompt_tokens == want.stats.prompt_tokens
            assert got.stats.prefill_tokens == want.stats.prefill_tokens, f"turn {n}.{k}"
            assert (got.final, got.reasoning, got.finish_reason) == (want.final, want.reasoning, want.finish_reason)
            assert [(c.name, c.arguments) for c in got.tool_calls] == [(c.name, c.arguments) for c in want.tool_calls]
            a, b = np.stack([np.array(x) for x in s_eng.logits]), np.stack([np.array(x) for x in s_chat.logits])
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
            in_process += want.stats.prefill_tokens
            stateless += got.stats.prefill_tokens
            prompt_total += got.stats.prompt_tokens
            prev = want
    assert stateless == in_process < prompt_total // 4  # the cache did the work, not the prefill


def test_two_interleaved_conversations_both_hit_the_cache(model, engine):
    tok = model.tokenizer
    convs = {"a": start("Be terse."), "b": start("Be verbose and careful.")}
    for n in range(1, 4):
        for name in ("a", "b"):
            convs[name] = convs[name] + [user(f"{name} question {n}")]
            _, r = run(engine.submit(convs[name], sampler=Script(tok, THINK_ANSWER.format("hm", f"{name}{n}")), max_tokens=40))
            assert r.final == f"{name}{n}"
            convs[name] = convs[name] + r.messages
            if n > 1:  # only the new user message and the last reply's re-rendering are computed
                assert r.stats.prefill_tokens < r.stats.prompt_tokens // 3, (name, n)
    assert len(engine.cache) == 2


def test_least_recently_used_state_is_evicted_at_the_byte_bound(model, engine):
    tok = model.tokenizer
    convs = {"a": start("One."), "b": start("Two.")}

    def ask(name: str, n: int):
        convs[name] = convs[name] + [user(f"{name} {n}")]
        _, r = run(engine.submit(convs[name], sampler=Script(tok, THINK_ANSWER.format("x", "y")), max_tokens=20))
        convs[name] = convs[name] + r.messages
        return r

    ask("a", 1), ask("b", 1)
    engine.cache.max_bytes = engine.cache.nbytes - 1  # both states no longer fit: "a" is the older
    r = ask("b", 2)
    assert r.stats.prefill_tokens < r.stats.prompt_tokens // 3  # b's own state, kept
    assert len(engine.cache) == 1 and engine.cache.evictions == 1
    r = ask("a", 2)
    assert r.stats.prefill_tokens == r.stats.prompt_tokens  # a's state was evicted
    engine.cache.max_bytes = 0  # nothing fits: the state goes at its next put
    ask("a", 3)
    assert len(engine.cache) == 0
    r = ask("a", 4)
    assert r.stats.prefill_tokens == r.stats.prompt_tokens


class Gate:
    """A sampler that writes the scripted reply but holds its first token until released."""

    def __init__(self, tok, text: str):
        self.script = Script(tok, text)
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, logits):
        self.started.set()
        assert self.release.wait(30)
        return self.script(logits)


def test_queue_bound_refuses_with_queue_full_and_runs_jobs_in_order(model):
    tok = model.tokenizer
    engine = Engine(model, max_queue=2)
    try:
        gate = Gate(tok, THINK_ANSWER.format("a", "first"))
        first = engine.submit(start() + [user("1")], sampler=gate, max_tokens=30)
        assert gate.started.wait(30)  # running: no longer waiting in the queue
        waiting = [engine.submit(start() + [user(str(i))], sampler=Script(tok, THINK_ANSWER.format("b", f"r{i}")), max_tokens=30)
                   for i in (2, 3)]  # fmt: skip
        with pytest.raises(QueueFull, match="2 requests"):
            engine.submit(start() + [user("4")], max_tokens=5)
        gate.release.set()
        assert [run(j)[1].final for j in [first, *waiting]] == ["first", "r2", "r3"]
        _, r = run(engine.submit(start() + [user("5")], sampler=Script(tok, THINK_ANSWER.format("c", "again")), max_tokens=30))
        assert r.final == "again"
    finally:
        engine.close()
    with pytest.raises(EngineClosed):
        engine.submit(start() + [user("6")], max_tokens=5)


class Slow(Script):
    def __init__(self, tok, text: str, delay: float = 0.01):
        super().__init__(tok, text, delay=delay)
        self.started = threading.Event()

    def __call__(self, logits):
        if len(self.logits) >= 2:
            self.started.set()
        return super().__call__(logits)


def test_cancel_stops_within_a_token_and_leaves_the_engine_usable(model, engine):
    tok = model.tokenizer
    slow = Slow(tok, THINK_ANSWER.format("thinking " * 60, "never"), delay=0.02)
    job = engine.submit(start() + [user("Go")], sampler=slow, max_tokens=300)
    queued = engine.submit(start() + [user("Never mind")], max_tokens=5)
    queued.cancel()  # cancelled while waiting: never starts
    assert slow.started.wait(30)
    job.cancel()
    seen = len(slow.logits)
    _, r = run(job)
    assert r.finish_reason == "cancelled"
    assert r.stats.generation_tokens <= seen + 1  # the token being sampled, at most
    _, r = run(queued)
    assert r.finish_reason == "cancelled" and r.stats.prompt_tokens == 0
    _, r = run(engine.submit(start() + [user("Again")], sampler=Script(tok, THINK_ANSWER.format("ok", "Back.")), max_tokens=40))
    assert r.final == "Back." and r.finish_reason == "stop"


def test_leaving_the_event_stream_cancels_the_job(model, engine):
    slow = Slow(model.tokenizer, THINK_ANSWER.format("la " * 80, "x"), delay=0.01)
    job = engine.submit(start() + [user("Go")], sampler=slow, max_tokens=300)
    events = job.events()
    next(events)
    events.close()  # the client went away
    assert job.cancelled
    _, r = run(
        engine.submit(start() + [user("Next")], sampler=Script(model.tokenizer, THINK_ANSWER.format("a", "b")), max_tokens=30)
    )
    assert r.final == "b"


class Boom:
    def __init__(self, after: int):
        self.n, self.after = 0, after

    def __call__(self, logits):
        self.n += 1
        if self.n > self.after:
            raise RuntimeError("sampler exploded")
        return mx.array([200005])  # <|channel|>


def test_failed_requests_leave_the_engine_usable(model, engine):
    tok = model.tokenizer
    with pytest.raises(PromptTooLongError, match="exceeds"):
        engine.submit(start() + [user("word " * 5000)], max_tokens=10)
    with pytest.raises(TypeError, match="unknown option"):
        engine.submit(start() + [user("x")], temprature=1)
    with pytest.raises(ValueError, match="instructions"):
        engine.submit(start(), max_tokens=5)
    conv = start() + [user("Hello")]
    _, r = run(engine.submit(conv, sampler=Script(tok, THINK_ANSWER.format("hm", "Hi.")), max_tokens=30))
    conv = conv + r.messages + [user("And then?")]
    with pytest.raises(RuntimeError, match="sampler exploded"):
        run(engine.submit(conv, sampler=Boom(after=3), max_tokens=30))
    # the conversation's state survived the failure and is still reused, correctly
    s = Rec(tok, THINK_ANSWER.format("fine", "Still here."))
    _, r = run(engine.submit(conv, sampler=s, max_tokens=30))
    assert r.final == "Still here." and r.stats.prefill_tokens < r.stats.prompt_tokens // 2
    fresh = ChatSession(model, _messages=conv[:-1], context_policy="error")
    s2 = Script(tok, THINK_ANSWER.format("fine", "Still here."))
    fresh.send("And then?", sampler=s2, max_tokens=30)
    np.testing.assert_allclose(np.stack([np.array(x) for x in s.logits]), np.stack([np.array(x) for x in s2.logits]),
                               rtol=0, atol=1e-4 * float(np.abs(np.array(s2.logits[0])).max()))  # fmt: skip


def test_aevents_never_blocks_the_event_loop(model, engine):
    tok = model.tokenizer
    slow = Slow(tok, THINK_ANSWER.format("step " * 20, "done"), delay=0.01)

    async def main():
        ticks: list[float] = []
        stop = asyncio.Event()

        async def ticker():
            while not stop.is_set():
                ticks.append(time.perf_counter())
                await asyncio.sleep(0.002)

        t = asyncio.create_task(ticker())
        job = engine.submit(start() + [user("Go")], sampler=slow, max_tokens=100)
        events = [ev async for ev in job.aevents()]
        stop.set()
        await t
        return ticks, events

    ticks, events = asyncio.run(main())
    assert isinstance(events[-1], Done) and events[-1].reply.final == "done"
    assert "".join(e.text for e in events if isinstance(e, FinalDelta)) == "done"
    gen_time = 0.01 * events[-1].reply.stats.generation_tokens
    assert len(ticks) > 10 and max(np.diff(ticks)) < gen_time / 2  # the loop kept running during generation


def test_engine_made_in_another_thread_than_the_lazy_model_says_where_to_make_it(vocab_model_dir):
    lazy = mlx_gptoss.load(vocab_model_dir, dtype=mx.float32)  # weights not read yet, built in this thread
    out = {}

    def make():
        try:
            Engine(lazy).close()
        except RuntimeError as e:
            out["error"] = str(e)

    t = threading.Thread(target=make)
    t.start()
    t.join(60)
    assert "create the Engine in the thread that loaded the model" in out.get("error", "")
    engine = Engine(lazy, cache_bytes=0)  # here it works
    try:
        _, r = run(
            engine.submit(start() + [user("Hi")], sampler=Script(lazy.tokenizer, THINK_ANSWER.format("a", "b")), max_tokens=20)
        )
        assert r.final == "b"
    finally:
        engine.close()
