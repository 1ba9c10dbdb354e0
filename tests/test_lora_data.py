"""LoRA training data: each assistant turn is what a ChatSession renders and generates, masks,
the four line formats, malformed lines named by file:line and field, skipping and truncation."""

from __future__ import annotations

import json
import time

import mlx.core as mx
import pytest

import mlx_gptoss
from mlx_gptoss.chat import ChatSession
from mlx_gptoss.harmony import HarmonyStream, render_prompt
from mlx_gptoss.lora.data import DEFAULT_DATE, DataError, load_dataset, record_examples
from mlx_gptoss.tokenizer import load_harmony_encoding

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
CHAT = {
    "reasoning_effort": "low",
    "tools": [WEATHER],
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "thinking": "A greeting.", "content": "Hello!"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "reasoning": "Need the tool.", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temperature": 21}'},
        {"role": "assistant", "reasoning_content": "Got it.", "content": "21 degrees."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def enc(vocab_model_dir):
    return load_harmony_encoding(vocab_model_dir)


def write(tmp_path, *lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def trained(enc, ex) -> str:
    return enc.decode([t for t, m in zip(ex.ids, ex.targets) if m])


class Feed:
    """A sampler that writes the given tokens, whatever the logits say."""

    def __init__(self, tokens: list[int]):
        self.tokens, self.i = tokens, 0

    def __call__(self, logits: mx.array) -> mx.array:
        self.i += 1
        return mx.array([self.tokens[self.i - 1] if self.i <= len(self.tokens) else 0])


def test_each_turn_is_what_a_chat_session_renders_and_generates(vocab_model_dir, enc):
    exs = record_examples(CHAT, enc, train_on="assistant")
    # the tool call and the answer after it share one sequence (the context grows token for token);
    # the other turns each need their own (the previous turn's reasoning is dropped from later contexts)
    assert [len(ex.turns) for ex in exs] == [1, 2, 1]
    turns = [(ex, s, e) for ex in exs for s, e in ex.turns]

    model = mlx_gptoss.load(vocab_model_dir, dtype=mx.float32)
    chat = ChatSession(model, instructions="Be brief.", reasoning_effort="low", tools=[WEATHER], today=DEFAULT_DATE)
    replies = []

    def turn(k, send):
        ex, s, e = turns[k]
        reply = send(sampler=Feed(ex.ids[s:e]), max_tokens=e - s + 8)
        assert chat.last_prompt_ids == ex.ids[:s], f"turn {k}: the prompt differs from the session's"
        assert reply.stats.tokens == ex.ids[s:e], f"turn {k}: the completion differs from what the session generated"
        replies.append(reply)
        return reply

    turn(0, lambda **o: chat.send("Hi there", **o))
    call = turn(1, lambda **o: chat.send("Weather in Paris?", **o)).tool_calls[0]
    turn(2, lambda **o: chat.send_tool_result(call, '{"temperature": 21}', **o))
    turn(3, lambda **o: chat.send("Thanks", **o))
    assert (replies[0].reasoning, replies[0].final, replies[0].finish_reason) == ("A greeting.", "Hello!", "stop")
    assert (call.name, call.arguments, replies[1].finish_reason) == ("get_weather", {"city": "Paris"}, "tool_calls")
    assert [r.final for r in replies[2:]] == ["21 degrees.", "You're welcome."]
    assert [enc.decode(ex.ids[s:e]) for ex, s, e in turns] == [
        "<|channel|>analysis<|message|>A greeting.<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|return|>",
        "<|channel|>analysis<|message|>Need the tool.<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary "
        '<|constrain|>json<|message|>{"city": "Paris"}<|call|>',
        "<|channel|>analysis<|message|>Got it.<|end|><|start|>assistant<|channel|>final<|message|>21 degrees.<|return|>",
        "<|channel|>final<|message|>You're welcome.<|return|>",
    ]  # fmt: skip

    # the session's saved conversation (harmony JSON) trains the same sequences
    again = record_examples(json.loads(chat.to_json()), enc, train_on="assistant")
    assert [(x.ids, x.targets, x.turns) for x in again] == [(x.ids, x.targets, x.turns) for x in exs]


def test_train_on_final_vs_assistant(enc):
    final = record_examples(CHAT, enc, train_on="final")
    assistant = record_examples(CHAT, enc, train_on="assistant")
    assert [x.ids for x in final] == [x.ids for x in assistant]
    assert [trained(enc, x) for x in final] == [
        "<|start|>assistant<|channel|>final<|message|>Hello!<|return|>",  # the model writes the header after its reasoning
        "<|start|>assistant<|channel|>final<|message|>21 degrees.<|return|>",  # the tool call is not trained
        "<|channel|>final<|message|>You're welcome.<|return|>",  # no reasoning: the prompt holds <|start|>assistant
    ]  # fmt: skip
    # "assistant": exactly the completions, nothing of the prompts or the tool result
    for x in assistant:
        spans = [i for s, e in x.turns for i in range(s, e)]
        assert [i for i, m in enumerate(x.targets) if m] == spans and not x.targets[0]


def test_tool_call_turn_parses_back_to_the_call(enc):
    ex = record_examples(CHAT, enc, train_on="assistant")[1]
    s, e = ex.turns[0]
    parser = HarmonyStream(enc)
    for t in ex.ids[s:e]:
        parser.add(t)
    (msg,) = [m for m in parser.messages if m.recipient]
    assert (msg.recipient, msg.channel, json.loads(msg.text)) == ("functions.get_weather", "commentary", {"city": "Paris"})
    assert not parser.problems


def test_parallel_calls_become_call_result_pairs(enc):
    calls = [
        {"id": f"c{i}", "function": {"name": "get_weather", "arguments": {"city": c}}} for i, c in enumerate(["Oslo", "Rome"])
    ]
    rec = {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Oslo and Rome?"},
        {"role": "assistant", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": "rome: 25"},  # results in another order than the calls
        {"role": "tool", "tool_call_id": "c0", "content": "oslo: 9"},
        {"role": "assistant", "content": "Oslo 9, Rome 25."}]}  # fmt: skip
    (ex,) = record_examples(rec, enc, train_on="assistant")
    text = enc.decode(ex.ids)
    order = [text.index(s) for s in ('{"city": "Oslo"}', "oslo: 9", '{"city": "Rome"}', "rome: 25", "Oslo 9, Rome 25.")]
    assert order == sorted(order) and len(ex.turns) == 3


def test_prompt_completion_and_text_formats(enc):
    (ex,) = record_examples({"prompt": "2+2?", "completion": "4"}, enc)
    prompt = render_prompt(enc, "2+2?", today=DEFAULT_DATE)
    assert ex.ids[: len(prompt)] == prompt
    assert enc.decode(ex.ids[len(prompt) :]) == "<|channel|>final<|message|>4<|return|>" == trained(enc, ex)

    (ex,) = record_examples({"text": "Raw text, as is."}, enc)
    assert ex.ids == enc.encode("Raw text, as is.") and ex.targets == [False] + [True] * (len(ex.ids) - 1)


def test_load_dataset_reads_lines_skips_blanks_and_reports(tmp_path, enc):
    path = write(tmp_path, CHAT, "", "   ", {"prompt": "p", "completion": "c"}, {"text": "t u v"})
    ds = load_dataset(path, enc)
    assert [x.line for x in ds.examples] == [1, 1, 1, 4, 5] and ds.lines == 3 and not ds.skipped
    assert f"{path}: 5 sequences from 3 lines" in ds.summary()
    # the reasoning effort of a line's own system message wins over the default
    assert "Reasoning: low" in enc.decode(ds.examples[0].ids) and "Reasoning: high" in enc.decode(
        load_dataset(path, enc, reasoning_effort="high").examples[3].ids)  # fmt: skip
    # a fixed date, never today's
    assert f"Current date: {DEFAULT_DATE.isoformat()}" in enc.decode(ds.examples[3].ids)


@pytest.mark.parametrize(
    "line, field",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"nothing": 1}, "field messages: missing"),
        ({"messages": "hi"}, "field messages: must be a non-empty list"),
        ({"messages": []}, "field messages: must be a non-empty list"),
        ({"messages": ["hi"]}, "field messages[0]: must be an object"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "field messages[0].role: unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": 3}]}, "field messages[0].content: must be a string"),
        ({"messages": [{"role": "user"}]}, "field messages[0].content: must be a string, found missing"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}, "field messages[0].content: must be a string"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}, "field messages[1].content: an assistant"),
        ({"messages": [{"role": "assistant", "content": "x", "thinking": 5}]}, "field messages[0].thinking: must be a string"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]},
         "field messages[0].tool_calls[0].function.name: missing"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
         "field messages[0].tool_calls[0].function.arguments: not valid JSON"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}]},
         "field messages[1].role: a tool message without a preceding tool call"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f"}}]},
                       {"role": "tool", "tool_call_id": "b", "content": "r"}]}, "field messages[1].tool_call_id: no unanswered"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}, {"role": "user", "content": "x"}]},
         "field messages[0].tool_calls[0]: no tool message answers this call"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}]},
         "field messages[1].role: a system message must come before"),
        ({"tools": [{"description": "no name"}], "messages": [{"role": "user", "content": "x"}]}, "field tools[0]:"),
        ({"tools": [{"name": "f", "parameters": [1]}], "messages": [{"role": "user", "content": "x"}]},
         "field tools[0].parameters: must be a JSON schema object"),
        ({"reasoning_effort": "max", "messages": [{"role": "user", "content": "x"}]}, "field reasoning_effort:"),
        ({"prompt": "p"}, "field completion: must be a string, and is missing"),
        ({"prompt": 1, "completion": "c"}, "field prompt: must be a string"),
        ({"text": ""}, "field text: must be a non-empty string"),
        ({"messages": [{"role": "user", "content": [{"type": "bogus", "text": "x"}], "channel": "final"}]},
         "field messages: not a valid openai-harmony conversation: Unknown content variant"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}], "channel": 3}]},
         "field messages[0].channel: must be a string"),
    ],
)  # fmt: skip
def test_malformed_line_names_file_line_and_field(tmp_path, enc, line, field):
    path = write(tmp_path, {"prompt": "fine", "completion": "ok"}, "", line)
    with pytest.raises(DataError) as err:
        load_dataset(path, enc)
    assert str(err.value).startswith(f"{path}:3: {field}"), str(err.value)


def test_unreadable_or_empty_file(tmp_path, enc):
    for content in (b"", b"\n  \n"):
        (tmp_path / "e.jsonl").write_bytes(content)
        with pytest.raises(DataError, match="the file is empty"):
            load_dataset(tmp_path / "e.jsonl", enc)
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "ok"}\n\xff\n')
    with pytest.raises(DataError, match=r"b.jsonl:2: not UTF-8"):
        load_dataset(tmp_path / "b.jsonl", enc)
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(tmp_path / "missing.jsonl", enc)


def test_no_target_and_overlong_examples_are_skipped(tmp_path, enc):
    only_call = {"tools": [WEATHER], "messages": [{"role": "user", "content": "Weather?"},
                 {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "X"}}}]}]}  # fmt: skip
    long = {"prompt": "word " * 300, "completion": "short"}
    nobody = {"messages": [{"role": "user", "content": "nobody answers"}]}
    path = write(tmp_path, nobody, only_call, long, {"prompt": "p", "completion": "c"})
    ds = load_dataset(path, enc, train_on="final", max_seq_len=256)
    assert [x.line for x in ds.examples] == [4]
    n_long = len(record_examples(long, enc)[0].ids)
    assert [(k.line, k.reason.split(":")[0]) for k in ds.skipped] == [
        (1, "no token to train"),
        (2, "no token to train (train_on=final)"),
        (3, f"{n_long} tokens, longer than max_seq_len=256"),
    ]
    assert all(x.n_trained for x in ds.examples) and "3 skipped" in ds.summary()
    # the call is trained with train_on="assistant"
    assert [x.line for x in load_dataset(path, enc, train_on="assistant", max_seq_len=256).examples] == [2, 4]


def test_truncate_keeps_the_start_while_a_trained_token_remains(tmp_path, enc):
    (full,) = record_examples({"text": "one two three four five six seven"}, enc)
    (chat,) = record_examples({"prompt": "word " * 50, "completion": "the answer"}, enc)
    path = write(tmp_path, {"text": "one two three four five six seven"}, {"prompt": "word " * 50, "completion": "the answer"})
    ds = load_dataset(path, enc, max_seq_len=4, overflow="truncate")
    (ex,) = ds.examples
    assert ex.ids == full.ids[:4] and ex.targets == [False, True, True, True]
    assert [(k.line, k.reason) for k in ds.skipped] == [
        (2, f"{len(chat.ids)} tokens: cut to max_seq_len=4, no trained token is left")
    ]


def test_options_are_checked(tmp_path, enc):
    path = write(tmp_path, {"text": "x y"})
    for bad in ({"train_on": "all"}, {"overflow": "wrap"}, {"max_seq_len": 1}, {"reasoning_effort": "max"}):
        with pytest.raises(ValueError):
            load_dataset(path, enc, **bad)


def test_thousands_of_lines_load_quickly(tmp_path, enc):
    path = write(tmp_path, *[CHAT] * 500)
    t0 = time.perf_counter()
    ds = load_dataset(path, enc)
    assert len(ds.examples) == 1500
    assert time.perf_counter() - t0 < 30  # 4 turns a line, two renders a turn (measured ~4 s on 2 shared cores)


# -- lines that must be refused, named by file:line (and field) ----------------------------------


def test_deeply_nested_line_is_a_data_error_naming_file_and_line(tmp_path, enc):
    deep = "[" * 100_000 + "]" * 100_000  # json.loads raised RecursionError
    path = write(tmp_path, {"text": "fine"}, '{"messages": ' + deep + "}")
    with pytest.raises(DataError, match=f"^{path}:2: .*nested too deeply"):
        load_dataset(path, enc)


@pytest.mark.parametrize(
    "line,keys",
    [
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "prompt": "p",
          "completion": "c", "text": "t"}, "completion, messages, prompt, text"),
        ({"prompt": "p", "completion": "c", "text": "t"}, "completion, prompt, text"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "text": "t"},
         "messages, text"),
        ({"prompt": "p", "text": "t"}, "prompt, text"),
    ],
)  # fmt: skip
def test_line_in_two_formats_at_once_is_refused_naming_the_keys(tmp_path, enc, line, keys):
    path = write(tmp_path, {"prompt": "fine", "completion": "ok"}, line)
    with pytest.raises(DataError) as err:
        load_dataset(path, enc)
    assert str(err.value).startswith(f"{path}:2: ") and keys in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "line,field",
    [
        ('{"prompt": "bad \\ud800 here", "completion": "4"}', "field prompt"),
        ('{"text": "a \\udfff b"}', "field text"),
        ('{"messages": [{"role": "user", "content": "hi \\ud83d"}, {"role": "assistant", "content": "ok"}]}',
         "field messages[0].content"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "thinking": "\\udc00"}]}',
         "field messages[1].thinking"),
    ],
)  # fmt: skip
def test_lone_surrogate_is_refused_naming_file_line_and_field(tmp_path, enc, line, field):
    path = write(tmp_path, {"prompt": "fine", "completion": "ok"}, line)
    with pytest.raises(DataError) as err:
        load_dataset(path, enc)
    assert str(err.value).startswith(f"{path}:2: {field}") and "surrogate" in str(err.value), str(err.value)
    # a surrogate pair written as two escapes is one valid character
    ok = write(tmp_path, {"prompt": "fine \U0001f600", "completion": "ok"}, '{"prompt": "\\ud83d\\ude00", "completion": "x"}')
    assert len(load_dataset(ok, enc).examples) == 2


def test_dataset_records_its_file_hash_and_options(tmp_path, enc):
    import hashlib

    from mlx_gptoss.lora.data import fingerprint

    path = write(
        tmp_path, {"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "thinking": "t", "content": "c"}]}
    )
    ds = load_dataset(path, enc, train_on="assistant", max_seq_len=300, overflow="truncate")
    assert ds.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (ds.train_on, ds.max_seq_len, ds.overflow) == ("assistant", 300, "truncate")
    assert fingerprint(ds.examples) == fingerprint(load_dataset(path, enc, train_on="assistant").examples)
    assert fingerprint(ds.examples) != fingerprint(load_dataset(path, enc).examples)  # other targets


@pytest.mark.parametrize("line,field", [({"prompt": "a" * 200_000, "completion": "ok"}, "field prompt"),
                                        ({"text": "x " + "=" * 100_000}, "field text")])  # fmt: skip
def test_text_too_costly_to_tokenize_is_refused_naming_file_line_and_field(tmp_path, enc, line, field):
    # openai-harmony's BPE is quadratic in a run without a break: 200k "a" took tens of seconds
    path = write(tmp_path, {"prompt": "fine", "completion": "ok"}, line)
    t0 = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_dataset(path, enc)
    assert time.perf_counter() - t0 < 5
    assert str(err.value).startswith(f"{path}:2 ") and field in str(err.value) and "tokenize" in str(err.value), str(err.value)


def test_a_dataset_line_naming_a_tool_twice_is_refused(tmp_path, enc):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    line = json.dumps(
        {"tools": [tool, tool], "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    )
    with pytest.raises(DataError, match=r"data.jsonl:1: field tools\[1\]: tool name 'f' is used twice"):
        load_dataset(write(tmp_path, line), enc)
