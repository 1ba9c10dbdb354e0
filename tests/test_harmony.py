"""Harmony rendering and stream splitting, offline (vocabulary from the converted folder)."""

from __future__ import annotations

from datetime import date

import pytest

from mlx_gptoss.harmony import (
    CommentaryDelta,
    FinalDelta,
    HarmonyStream,
    ReasoningDelta,
    ToolCallCompleted,
    ToolCallDelta,
    ToolCallStarted,
    render_prompt,
)
from mlx_gptoss.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(vocab_model_dir):
    return Tokenizer(vocab_model_dir)


def test_render_has_effort_instructions_and_ends_at_the_assistant(tok):
    ids = render_prompt(tok.encoding, "What is 2+2?", system="Answer in French.", reasoning_effort="high",
                        today=date(2026, 11, 26))  # fmt: skip
    text = tok.decode(ids)
    assert text.startswith("<|start|>system<|message|>")
    assert "Reasoning: high" in text and "2026-11-26" in text
    assert "<|start|>developer<|message|># Instructions\n\nAnswer in French." in text
    assert text.endswith("<|start|>user<|message|>What is 2+2?<|end|><|start|>assistant")


def test_bad_effort(tok):
    with pytest.raises(ValueError, match="reasoning_effort"):
        render_prompt(tok.encoding, "hi", reasoning_effort="max")


def test_stop_tokens_come_from_the_encoding(tok):
    stops = tok.stop_tokens
    assert tok.encode("<|return|>", allow_special=True)[0] in stops
    assert tok.encode("<|call|>", allow_special=True)[0] in stops
    assert tok.encode("<|end|>", allow_special=True)[0] not in stops  # ends the analysis, not the turn


def run(tok, completion: str):
    stream = HarmonyStream(tok.encoding)
    events = [e for t in tok.encode(completion, allow_special=True) for e in stream.add(t)]
    return events + stream.finish(), stream


def texts(events, kind) -> str:
    return "".join(e.text for e in events if isinstance(e, kind))


def test_stream_separates_reasoning_from_the_answer(tok):
    events, stream = run(tok, "<|channel|>analysis<|message|>User wants a sum. 2+2=4.<|end|>"
                              "<|start|>assistant<|channel|>final<|message|>It is 4.<|return|>")  # fmt: skip
    assert texts(events, ReasoningDelta) == "User wants a sum. 2+2=4."
    assert texts(events, FinalDelta) == "It is 4."
    assert stream.problems == [] and [m.channel for m in stream.messages] == ["analysis", "final"]


def test_stream_tool_call(tok):
    events, stream = run(tok, "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary"
                              ' to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>')  # fmt: skip
    started = [e for e in events if isinstance(e, ToolCallStarted)]
    done = [e.call for e in events if isinstance(e, ToolCallCompleted)]
    assert [s.name for s in started] == ["get_weather"] and len(done) == 1
    assert done[0].arguments == {"city": "Paris"} and done[0].recipient == "functions.get_weather"
    assert texts(events, ToolCallDelta) == '{"city": "Paris"}' and done[0].id == started[0].call_id
    assert stream.problems == []


def test_stream_tool_call_with_invalid_json_is_flagged(tok):
    events, stream = run(tok, '<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": 1,,}<|call|>')
    (call,) = [e.call for e in events if isinstance(e, ToolCallCompleted)]
    assert call.arguments is None and "not valid JSON" in call.error and call.raw_arguments == '{"a": 1,,}'
    assert any("not valid JSON" in p for p in stream.problems)


def test_stream_preamble_and_unknown_channel(tok):
    events, stream = run(tok, "<|channel|>commentary<|message|>Let me check.<|end|>"
                              "<|start|>assistant<|channel|>weird<|message|>Text.<|return|>")  # fmt: skip
    assert texts(events, CommentaryDelta) == "Let me check." and texts(events, FinalDelta) == "Text."
    assert any("unknown channel 'weird'" in p for p in stream.problems)


def test_stream_recovers_from_a_broken_header(tok):
    events, stream = run(tok, "<|channel|><|message|>lost<|end|><|start|>assistant<|channel|>final<|message|>Found.<|return|>")
    assert stream.problems and "Found." in texts(events, FinalDelta)


def test_stream_truncated_tool_call(tok):
    events, stream = run(tok, '<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": ')
    (call,) = [e.call for e in events if isinstance(e, ToolCallCompleted)]
    assert call.error and "cut off" in call.error


def test_random_token_streams_never_raise(tok):
    """Thousands of seeded random streams (ordinary and harmony special tokens): no exception,
    text events carry text, and every completed tool call has either arguments or an error."""
    import numpy as np

    specials = [tok.encode(s, allow_special=True)[0] for s in
                ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>")]  # fmt: skip
    words = tok.encode(' final analysis commentary to=functions.x assistant json {"a": 1} hello')
    rng = np.random.default_rng(0)
    for _ in range(3000):
        n = int(rng.integers(1, 40))
        pool = rng.random(n)
        toks = [int(rng.choice(specials)) if p < 0.3 else int(rng.choice(words)) if p < 0.7 else int(rng.integers(0, 199998))
                for p in pool]  # fmt: skip
        stream = HarmonyStream(tok.encoding)
        events = []
        for t in toks:
            events += stream.add(t)
        events += stream.finish()
        for e in events:
            assert isinstance(getattr(e, "text", ""), str)
            if isinstance(e, ToolCallCompleted):
                assert (e.call.arguments is None) == (e.call.error is not None)


def test_special_looking_text_stays_text_by_default(tok):
    assert len(tok.encode("<|start|>")) > 1
    assert len(tok.encode("<|start|>", allow_special=True)) == 1


def test_streaming_detokenizer_holds_partial_utf8(tok):
    ids = tok.encode("héllo ✓ 日本語")
    d = tok.detokenizer()
    text = "".join(d.add(t) for t in ids) + d.flush()
    assert text == "héllo ✓ 日本語"


# -- the never-raises promise under hostile output ------------------------------------------------


@pytest.mark.parametrize("arguments, why", [("[" * 5000 + "]" * 5000, "RecursionError"),
                                            ('{"n": ' + "9" * 5000 + "}", "integer string conversion")])  # fmt: skip
def test_unusable_tool_arguments_are_an_error_not_an_exception(tok, arguments, why):
    events, stream = run(tok, f"<|channel|>commentary to=functions.f <|constrain|>json<|message|>{arguments}<|call|>")
    (call,) = [e.call for e in events if isinstance(e, ToolCallCompleted)]
    assert call.arguments is None and why in call.error and call.raw_arguments == arguments
    assert any(why in p for p in stream.problems)


@pytest.mark.parametrize("end", ["<|return|>", ""])  # ended by the model, or cut off by max_tokens
def test_text_without_a_channel_header_is_the_answer(tok, end):
    events, stream = run(tok, f"Plain text, no header.{end}")
    assert texts(events, FinalDelta) == "Plain text, no header."
    assert [(m.channel, m.text) for m in stream.messages] == [("final", "Plain text, no header.")]
    assert any("without a channel header" in p for p in stream.problems)


def test_long_headerless_text_streams_before_the_end(tok):
    text = " ".join(["word"] * 100)
    stream = HarmonyStream(tok.encoding)
    streamed = "".join(e.text for t in tok.encode(text) for e in stream.add(t) if isinstance(e, FinalDelta))
    assert streamed == text and stream.problems  # all of it arrived while generating, not at finish


def test_a_missing_end_before_start_does_not_swallow_the_answer(tok):
    events, stream = run(
        tok, "<|channel|>analysis<|message|>Thinking.<|start|>assistant<|channel|>final<|message|>Answer.<|return|>"
    )
    assert texts(events, ReasoningDelta) == "Thinking." and texts(events, FinalDelta) == "Answer."
    assert [(m.channel, m.text) for m in stream.messages] == [("analysis", "Thinking."), ("final", "Answer.")]
    assert any("<|end|>" in p for p in stream.problems)


def test_a_tool_call_missing_its_end_is_still_completed(tok):
    events, stream = run(tok, '<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": 1}'
                              "<|start|>assistant<|channel|>final<|message|>Done.<|return|>")  # fmt: skip
    (call,) = [e.call for e in events if isinstance(e, ToolCallCompleted)]
    assert call.arguments == {"a": 1} and texts(events, FinalDelta) == "Done." and stream.problems


def test_render_turns_a_tokenizer_panic_into_a_tokenizer_error(tok, monkeypatch):
    from mlx_gptoss import harmony
    from mlx_gptoss.tokenizer import TextTooCostlyError, TokenizerError

    # the encode-cost check refuses this text before harmony sees it (tests/test_encode_cost.py) ...
    with pytest.raises(TextTooCostlyError, match="too costly to tokenize"):
        render_prompt(tok.encoding, "a" * 1_000_000)
    # ... and a panic that gets through is still a TokenizerError, not a BaseException
    monkeypatch.setattr(harmony, "check_render_cost", lambda messages: None)
    with pytest.raises(TokenizerError, match="render the conversation"):
        render_prompt(tok.encoding, "a" * 1_000_000)
