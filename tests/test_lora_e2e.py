"""The end-to-end proof that training data is rendered exactly as inference renders it.

A tiny random model is LoRA-trained on two harmony chats — one with reasoning, one with a tool
call and its result — until greedy decoding reproduces every trained token. A fresh copy of the
base then loads the saved adapter and, through ``model.chat(...)``, answers the first prompt with
exactly the trained reasoning and answer, and through ``run()`` calls the trained tool with the
trained arguments and gives the trained answer. Any difference between the tokens trained and
the tokens inference asks for (system message, dropped reasoning, stop token, tool-call header)
would break the replay.
"""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

import mlx_gptoss
from mlx_gptoss.lora.adapters import LoRASpec, apply_lora
from mlx_gptoss.lora.data import DEFAULT_DATE, load_dataset
from mlx_gptoss.lora.train import TrainConfig, make_batch, train

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip
CHATS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "thinking": "Easy one.", "content": "Paris."}]},
    {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 3}"},
        {"role": "assistant", "content": "Cold: 3 degrees."}]},
]  # fmt: skip


def get_weather(city: str) -> dict:
    """Weather in a city."""
    calls.append(city)
    return {"temp": 3}


calls: list[str] = []


@pytest.fixture(scope="module")
def adapter(vocab_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    model = mlx_gptoss.load(vocab_model_dir, dtype=mx.float32)
    ds = load_dataset(data, model.tokenizer.encoding, train_on="assistant")
    spec = LoRASpec(rank=16, alpha=32.0, targets=("attention", "router", "experts"))
    apply_lora(model, spec, seed=0)
    cfg = TrainConfig(output_dir=root / "adapter", iterations=60, learning_rate=1e-2, schedule="constant", warmup=5,
                      save_every=0, eval_every=0)  # fmt: skip
    train(model, ds, None, cfg, spec=spec)
    return root / "adapter", model, ds


def test_greedy_decoding_reproduces_every_trained_token(adapter):
    _, model, ds = adapter
    for ex in ds.examples:
        pred = mx.argmax(model(mx.array(ex.ids)[None])[0], axis=-1).tolist()
        wrong = [i for i in range(1, len(ex.ids)) if ex.targets[i] and pred[i - 1] != ex.ids[i]]
        assert not wrong, f"line {ex.line}: {len(wrong)} trained tokens not reproduced"
        assert make_batch([ex]).n_targets > 0


def test_chat_with_the_adapter_answers_with_the_trained_reply(adapter, vocab_model_dir):
    path, _, _ = adapter
    model = mlx_gptoss.load(vocab_model_dir, dtype=mx.float32, adapter=path)
    reply = model.chat(today=DEFAULT_DATE).send("What is the capital of France?")
    assert (reply.reasoning, reply.final, reply.finish_reason, reply.problems) == ("Easy one.", "Paris.", "stop", [])


def test_run_calls_the_trained_tool_and_gives_the_trained_answer(adapter, vocab_model_dir):
    path, _, _ = adapter
    model = mlx_gptoss.load(vocab_model_dir, dtype=mx.float32, adapter=path)
    calls.clear()
    chat = model.chat(today=DEFAULT_DATE, tools=[get_weather])
    reply = chat.run("Weather in Oslo?")
    assert calls == ["Oslo"]
    assert (reply.final, reply.finish_reason, reply.problems) == ("Cold: 3 degrees.", "stop", [])
    tool_msg = chat.messages[-2]
    assert tool_msg["name"] == "functions.get_weather" and json.loads(tool_msg["content"][0]["text"]) == {"temp": 3}


def test_the_base_model_does_not_give_the_trained_reply(vocab_model_dir):
    # the replay above is the adapter's doing, not the random base's
    model = mlx_gptoss.load(vocab_model_dir, dtype=mx.float32)
    reply = model.chat(today=DEFAULT_DATE, max_tokens=24).send("What is the capital of France?")
    assert reply.final != "Paris."
