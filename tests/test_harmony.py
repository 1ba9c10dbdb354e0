"""Harmony rendering and stream splitting, offline (vocabulary from the converted folder)."""

from __future__ import annotations

from datetime import date

import pytest

from mlx_gptoss.harmony import ChannelSplitter, render_prompt
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


def test_splitter_separates_reasoning_from_the_answer(tok):
    completion = ("<|channel|>analysis<|message|>User wants a sum. 2+2=4.<|end|>"
                  "<|start|>assistant<|channel|>final<|message|>It is 4.<|return|>")  # fmt: skip
    split = ChannelSplitter(tok.encoding)
    parts: dict[str, str] = {}
    for t in tok.encode(completion, allow_special=True):
        d = split.add(t)
        if d is not None:
            parts[d.channel] = parts.get(d.channel, "") + d.text
    assert parts == {"analysis": "User wants a sum. 2+2=4.", "final": "It is 4."}
    assert split.error is None


def test_special_looking_text_stays_text_by_default(tok):
    assert len(tok.encode("<|start|>")) > 1
    assert len(tok.encode("<|start|>", allow_special=True)) == 1


def test_streaming_detokenizer_holds_partial_utf8(tok):
    ids = tok.encode("héllo ✓ 日本語")
    d = tok.detokenizer()
    text = "".join(d.add(t) for t in ids) + d.flush()
    assert text == "héllo ✓ 日本語"
