"""Safety of the core: option values (seeds, NaN, absurd sizes) refused by name, a session not
mutated while it generates, stop strings and headerless model output, token ids checked at the
model's entry, errors that name both the Python argument and the CLI option, duplicate tools.
Most run in-process on the tiny model with the real vocabulary, rigged where a chosen reply is needed."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from datetime import date

import mlx.core as mx
import pytest

import mlx_gptoss
from mlx_gptoss import loader
from mlx_gptoss.chat import ChatSession, Done
from mlx_gptoss.generate import PromptTooLongError, make_sampler, stream_tokens
from mlx_gptoss.harmony import FinalDelta, HarmonyStream
from mlx_gptoss.options import OptionError
from mlx_gptoss.testing import Rig, rig, successors

NAN = float("nan")
CLI = [sys.executable, "-m", "mlx_gptoss.cli"]
FINAL_REPLY = "<|channel|>final<|message|>It is 21 C in Paris.<|return|>"


@pytest.fixture(scope="module")
def model(vocab_model_dir):
    return mlx_gptoss.load(vocab_model_dir)


def rig_raw(model, text: str, *, loop: bool = False) -> None:
    """Greedy decoding writes ``text`` as it is after ``<|start|>assistant`` (no harmony header added)."""
    enc = model.tokenizer.encoding
    toks = enc.encode("<|start|>assistant", allowed_special="all")[-1:] + enc.encode(text, allowed_special="all")
    nxt = successors(toks)
    if loop:
        nxt[toks[-1]] = toks[-1]
    Rig(nxt, model.config.hidden_size, model.config.vocab_size).apply(model)


def roles(session: ChatSession) -> list[str]:
    return [m["role"] for m in session.messages]


def one_error(proc: subprocess.CompletedProcess) -> str:
    """The CLI failed with exactly one ``Error:`` line on stderr and no traceback; that line."""
    assert proc.returncode != 0, proc.stdout[-500:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


# -- item 9: seeds ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-5, 10**24, 2**64, 1.5, True, "3"])
def test_a_bad_seed_is_refused_by_name(model, seed):
    with pytest.raises(OptionError, match="seed"):
        mlx_gptoss.generate(model, [1, 2, 3], max_tokens=2, temp=1.0, seed=seed)
    with pytest.raises(OptionError, match="seed"):
        mlx_gptoss.generate(model, "Hi", max_tokens=2, seed=seed)
    with pytest.raises(OptionError, match="seed"):
        next(stream_tokens(model, [1, 2, 3], max_tokens=2, seed=seed))
    chat = model.chat()
    with pytest.raises(OptionError, match="seed"):
        chat.send("Hi", seed=seed, max_tokens=2)
    assert roles(chat) == ["system"]


def test_seed_minus_one_and_none_mean_random(model, monkeypatch):
    seeded = []
    monkeypatch.setattr(mx.random, "seed", lambda s: seeded.append(s))
    for seed in (-1, None):
        mlx_gptoss.generate(model, [1, 2, 3], max_tokens=2, temp=1.0, seed=seed)
        model.chat().send("Hi", seed=seed, max_tokens=2, temperature=1.0)
    assert seeded == []  # no seeding at all
    mlx_gptoss.generate(model, [1, 2, 3], max_tokens=2, temp=1.0, seed=2**64 - 1)
    assert seeded == [2**64 - 1]


# -- item 11: deeply nested JSON ----------------------------------------------------------------


def test_from_json_of_deeply_nested_json_is_a_value_error(model):
    deep = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(ValueError, match="not a harmony conversation JSON.*nested too deeply"):
        ChatSession.from_json(model, deep)


# -- item 16: no mutation while a turn generates ------------------------------------------------


def test_reset_during_an_open_stream_is_refused_and_the_turn_completes(model):
    rig(model, FINAL_REPLY)
    chat = model.chat(reasoning_effort="low")
    events = chat.stream("Weather in Paris?", max_tokens=30)
    next(events)  # generating
    with pytest.raises(RuntimeError, match=r"while a turn is generating.*cancel\(\)"):
        chat.reset()
    with pytest.raises(RuntimeError, match="while a turn is generating"):
        chat.reasoning_effort = "high"
    rest = list(events)
    assert isinstance(rest[-1], Done) and rest[-1].reply.final == "It is 21 C in Paris."
    assert roles(chat) == ["system", "user", "assistant"] and chat.reasoning_effort == "low"
    chat.reset()  # the stream is over: now it works
    chat.reasoning_effort = "high"
    assert roles(chat) == ["system"] and chat.reasoning_effort == "high"


def test_reset_after_a_closed_stream_works(model):
    rig(model, FINAL_REPLY)
    chat = model.chat()
    events = chat.stream("Hi", max_tokens=30)
    next(events)
    events.close()  # the turn is undone; the session is free again
    chat.reset()
    assert roles(chat) == ["system"]
    assert chat.send("Hi", max_tokens=30).final == "It is 21 C in Paris."


# -- item 17: NaN and absurd option values ------------------------------------------------------


@pytest.mark.parametrize("kw, name", [({"temp": NAN}, "temp"), ({"temp": math.inf}, "temp"), ({"top_p": NAN}, "top_p"),
                                      ({"min_p": NAN}, "min_p"), ({"temp": True}, "temp"), ({"top_k": 2.0}, "top_k")])  # fmt: skip
def test_make_sampler_refuses_nan_and_non_numbers_by_name(kw, name):
    with pytest.raises(OptionError, match=name):
        make_sampler(**kw)


def test_nan_temperature_is_refused_everywhere(model):
    with pytest.raises(OptionError, match="temp"):
        mlx_gptoss.generate(model, "Hi", temp=NAN, max_tokens=3)
    with pytest.raises(OptionError, match="temperature"):
        ChatSession(model, temperature=NAN)
    chat = model.chat()
    for kw in ({"temperature": NAN}, {"top_p": NAN}, {"min_p": NAN}, {"max_tokens": NAN}, {"prefill_step": NAN},
               {"max_tokens": True}, {"top_k": -1}):  # fmt: skip
        with pytest.raises(OptionError, match=next(iter(kw))):
            chat.send("Hi", **kw)
    assert roles(chat) == ["system"]


def test_top_k_beyond_the_vocabulary_means_no_limit(model):
    """A huge top_k reached MLX as an int32 overflow; it keeps every token, as top_k=0 does."""
    for k in (model.config.vocab_size, 99_999_999_999, 10**30):
        a = mlx_gptoss.generate(model, [1, 2, 3], max_tokens=4, temp=1.0, top_k=k, seed=5).tokens
        b = mlx_gptoss.generate(model, [1, 2, 3], max_tokens=4, temp=1.0, top_k=0, seed=5).tokens
        assert a == b
    assert model.chat().send("Hi", top_k=99_999_999_999, temperature=1.0, max_tokens=2, seed=1).stats.generation_tokens == 2


@pytest.mark.parametrize("kw, name", [
    ({"context": -5}, "context"), ({"context": 0}, "context"), ({"context": 1.5}, "context"),
    ({"context": True}, "context"), ({"context": -5, "memory_budget": "1GB"}, "context"),
    ({"memory_budget": NAN}, "memory_budget"), ({"memory_budget": True}, "memory_budget"),
    ({"memory_budget": -1}, "memory_budget"), ({"memory_budget": [1]}, "memory_budget"),
    ({"dtype": "float8"}, "dtype"), ({"dtype": mx.int32}, "dtype"), ({"dtype": 3}, "dtype"),
], ids=lambda x: repr(x))  # fmt: skip
def test_load_refuses_absurd_values_naming_the_argument(vocab_model_dir, kw, name):
    for load in (mlx_gptoss.load, loader.load):
        with pytest.raises(OptionError, match=name) as e:
            load(vocab_model_dir, **kw)
        assert "cannot hold this model" not in str(e.value) and "astype()" not in str(e.value)


def test_load_refuses_before_resolving_a_repo_id(monkeypatch):
    import mlx_gptoss.api as api

    monkeypatch.setattr(api, "resolve_model", lambda *a, **k: pytest.fail("resolved (a download?) before checking"))
    with pytest.raises(OptionError, match="context"):
        mlx_gptoss.load("openai/gpt-oss-20b", context=-5)


def test_load_takes_a_dtype_by_name(vocab_model_dir):
    m = loader.load(vocab_model_dir, dtype="float32")
    assert m.norm.weight.dtype == mx.float32


# -- item 20: stop strings on headerless text ---------------------------------------------------


def test_stop_applies_to_headerless_text_cut_by_max_tokens(model):
    rig_raw(model, "Alpha beta STOP gamma delta", loop=True)
    chat = model.chat()
    r = chat.send("Hi", stop=["STOP"], max_tokens=12)
    assert r.final == "Alpha beta " and r.finish_reason == "stop", (r.final, r.finish_reason)
    assert r.problems  # the missing header is still reported
    assert chat.messages[-1]["content"][0]["text"] == "Alpha beta "


def test_stop_applies_to_long_headerless_text(model):
    rig_raw(model, "Alpha beta STOP gamma delta" + " la" * 60, loop=True)  # past the 48-token header limit
    chat = model.chat()
    events = list(chat.stream("Hi", stop=["STOP"], max_tokens=80))
    r = events[-1].reply
    assert "".join(e.text for e in events if isinstance(e, FinalDelta)) == r.final == "Alpha beta "
    assert r.finish_reason == "stop" and chat.messages[-1]["content"][0]["text"] == "Alpha beta "
    assert r.stats.generation_tokens < 80  # generation stopped at the hit, not at max_tokens


# -- item 21: generated text never vanishes silently ------------------------------------------


@pytest.mark.parametrize("text", ["Hello there<|constrain|>json friend", "Hello there friend<|reserved_200017|>",
                                  "<|reserved_200017|>Hello there friend"])  # fmt: skip
def test_finish_keeps_headerless_text_holding_a_special_token(model, text):
    enc = model.tokenizer.encoding
    stream = HarmonyStream(enc)
    events = [e for t in enc.encode(text, allowed_special="all") for e in stream.add(t)] + stream.finish()
    final = "".join(e.text for e in events if isinstance(e, FinalDelta))
    assert "Hello there" in final and "friend" in final, (final, stream.problems)
    assert stream.problems and stream.messages[-1].text == final


@pytest.mark.parametrize("text", ["<|channel|>final", "<|channel|>commentary to=functions.get", "<|reserved_200017|>"])
def test_a_reply_cut_inside_its_header_or_without_text_is_reported(model, text):
    enc = model.tokenizer.encoding
    stream = HarmonyStream(enc)
    events = [e for t in enc.encode(text, allowed_special="all") for e in stream.add(t)] + stream.finish()
    assert not any(isinstance(e, FinalDelta) and e.text for e in events)  # no header text becomes the answer
    assert stream.problems


def test_generate_keeps_headerless_text_holding_a_special_token(model):
    rig_raw(model, "Hello there<|reserved_200017|> friend", loop=True)  # as the random model: text, a reserved token
    result = mlx_gptoss.generate(model, "Hello there", system="Be concise.", reasoning_effort="low", max_tokens=20)
    assert result.generation_tokens == 20
    assert "Hello there" in result.text and result.problems, (result.text, result.problems)


def test_the_random_tiny_model_never_loses_text_silently(vocab_model_dir):
    """Whatever the random model writes: tokens generated and no text in any channel => a problem."""
    m = mlx_gptoss.load(vocab_model_dir)  # not rigged
    enc = m.tokenizer.encoding
    seen_special = 0
    for day in (date(2026, 1, 28), date(2026, 3, 1), date(2025, 7, 4)):
        for prompt in ("Hello there", "Why is the sky blue?", "2+2?"):
            for seed in (None, 0, 1, 2):
                chat = ChatSession(m, instructions="Be concise.", reasoning_effort="low", today=day)
                opts = {"max_tokens": 20} if seed is None else {"max_tokens": 20, "temperature": 1.0, "seed": seed}
                r = chat.send(prompt, **opts)
                seen_special += any(enc.is_special_token(t) for t in r.stats.tokens)
                text = r.final + r.reasoning + r.commentary + "".join(c.raw_arguments for c in r.tool_calls)
                if r.stats.generation_tokens and not text:
                    assert r.problems, (day, prompt, seed, r.stats.tokens)
    assert seen_special  # the scan did meet special tokens among the random model's output


# -- item 24: token ids at the model's entry ----------------------------------------------------


def _forward(model_dir, ids, cache: bool = False) -> subprocess.CompletedProcess:
    """model(mx.array(ids)) in a child process (an id far out of range could crash the process)."""
    code = textwrap.dedent(f"""
        import mlx.core as mx, mlx_gptoss
        m = mlx_gptoss.load({str(model_dir)!r})
        try:
            out = m(mx.array({ids!r}), m.make_cache() if {cache!r} else None)
            mx.eval(out)
        except ValueError as e:
            print("REFUSED", e)
        else:
            print("LOGITS", out.shape)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ids", [[[10**6]], [[-1]], [[-5, 3]], [[201088]], [[1, 2], [3, 201088]]],
                         ids=["1e6", "minus1", "minus5", "vocab_size", "batch"])  # fmt: skip
def test_forward_refuses_ids_outside_the_vocabulary(vocab_model_dir, ids):
    r = _forward(vocab_model_dir, ids)
    assert r.returncode == 0, f"the process died (rc {r.returncode}): {r.stderr[-500:]}"
    assert r.stdout.startswith("REFUSED") and "0..201087" in r.stdout, f"model({ids}) gave {r.stdout.strip()}"


def test_forward_refuses_a_huge_id_on_a_small_vocabulary(tiny_model_dir):
    r = _forward(tiny_model_dir, [[10**6]])  # vocabulary of 512: this read crashed the process (SIGSEGV)
    assert r.returncode == 0, f"the process died (rc {r.returncode})"
    assert r.stdout.startswith("REFUSED"), r.stdout
    r = _forward(tiny_model_dir, [[3, 10**6]], cache=True)  # a prefill chunk with a cache too
    assert r.returncode == 0 and r.stdout.startswith("REFUSED"), (r.returncode, r.stdout)


def test_forward_with_ids_in_range_is_unchanged(model):
    ids = mx.array([[0, 5, model.config.vocab_size - 1]])
    assert model(ids).shape == (1, 3, model.config.vocab_size)
    with pytest.raises(ValueError, match="token ids must be integers"):
        model(mx.array([[1.0, 2.0]]))


# -- item 29h: both spellings of the context option ---------------------------------------------


def test_the_context_error_names_the_python_argument_and_the_cli_option(vocab_model_dir):
    m = mlx_gptoss.load(vocab_model_dir, memory_budget="1GB", context=70)
    want = "context= in Python, --context on the command line"
    with pytest.raises(PromptTooLongError, match=want):
        next(stream_tokens(m, [1] * 30, max_tokens=50))
    with pytest.raises(PromptTooLongError, match=want):
        m.chat().send("hi", max_tokens=50)
    with pytest.raises(PromptTooLongError, match=want):
        m.chat(max_tokens=30).send("hi " * 60)


def test_cli_context_error_speaks_of_the_option(vocab_model_dir):
    r = subprocess.run([*CLI, "generate", "-m", str(vocab_model_dir), "--memory-budget", "1GB", "--context", "70",
                        "--max-tokens", "50", "hi"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert "--context" in one_error(r)


# -- item 19: duplicate tool names ---------------------------------------------------------------


def _fn(name: str, description: str) -> dict:
    return {"name": name, "description": description, "parameters": {"type": "object", "properties": {}}}


def test_a_session_refuses_duplicate_tool_names(model):
    with pytest.raises(ValueError, match="'f' is used twice"):
        ChatSession(model, tools=[_fn("f", "first"), _fn("f", "second")])
    with pytest.raises(ValueError, match="'f' is used twice"):
        model.chat(tools=[_fn("f", "first"), _fn("g", "other"), _fn("f", "second")])
    chat = model.chat(tools=[_fn("f", "first"), _fn("g", "other")])
    assert list(chat.tools) == ["f", "g"]


def test_the_one_token_decode_step_is_not_checked_on_the_host(model, monkeypatch):
    """The check at the entry runs for prompts, not for each decode step (no per-step host sync)."""
    calls = []
    real = type(model)._check_ids

    def spy(self, ids):
        calls.append(tuple(ids.shape))
        return real(self, ids)

    monkeypatch.setattr(type(model), "_check_ids", spy)
    list(stream_tokens(model, list(range(1, 40)), max_tokens=16, prefill_step=16))
    assert calls and all(shape != (1, 1) for shape in calls), calls  # prefill chunks only


@pytest.mark.parametrize("call", [123, None, "", ["get_weather"]])
def test_a_tool_result_for_something_that_is_not_a_call_is_a_type_error(model, call):
    chat = model.chat()
    before = chat.messages
    with pytest.raises(TypeError, match="call must be a ToolCall .* or a tool's name"):
        chat.send_tool_result(call, {"ok": True})
    assert chat.messages == before
