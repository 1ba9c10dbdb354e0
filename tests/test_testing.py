"""mlx_gptoss.testing, the public tiny models: each layout converts to the same model, a rigged
reply comes back through model.chat(), the CLI and the server, and bad requests fail cleanly."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import mlx_gptoss
from mlx_gptoss.generate import stream_tokens
from mlx_gptoss.testing import rig, tiny_model
from mlx_gptoss_convert import convert

CLI = [sys.executable, "-m", "mlx_gptoss.cli"]
REPLY = "Hello from a rigged tiny model."
TOOL_CALL = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'


def get_weather(city: str) -> dict:
    """Current weather for a city."""
    return {"city": city, "temperature_c": 21}


@pytest.fixture(scope="module")
def rigged(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("rigged") / "tiny", rig=REPLY)


def _logits(path) -> np.ndarray:
    model = mlx_gptoss.load(path, dtype=mx.float32)
    return np.array(model(mx.array([[1, 7, 42, 300, 5]])))


@pytest.mark.parametrize("layout", ["hf", "hf-dense", "original", "mlx-lm"])
def test_each_layout_converts_to_the_same_model(layout, tmp_path):
    """The same seed is the same model in every layout: converting any of them gives the logits of
    the converted tiny model (dense experts are the exact values of the same MXFP4 codes)."""
    want = _logits(tiny_model(tmp_path / "converted", vocab=512, seed=3))
    src = tiny_model(tmp_path / layout, layout=layout, vocab=512, seed=3)
    got = _logits(convert(src, tmp_path / f"{layout}-converted", progress=False))
    np.testing.assert_array_equal(got, want)


def test_the_rigged_reply_comes_back_through_model_chat(rigged):
    model = mlx_gptoss.load(rigged)
    assert isinstance(model, mlx_gptoss.Model)
    chat = model.chat(instructions="Be brief.", reasoning_effort="low")
    for question in ("Hi", "What is the capital of France? Answer at length, please."):
        reply = chat.send(question)
        assert (reply.final, reply.finish_reason, reply.problems) == (REPLY, "stop", [])


def test_an_in_memory_rig_scripts_a_tool_loop(rigged):
    model = mlx_gptoss.load(rigged)
    chat = model.chat(tools=[get_weather])
    rig(model, TOOL_CALL)
    reply = chat.send("Do I need a coat in Paris?")
    (call,) = reply.tool_calls
    assert (reply.finish_reason, call.name, call.arguments) == ("tool_calls", "get_weather", {"city": "Paris"})
    rig(model, "No coat needed: it is 21 C.")
    final = chat.send_tool_result(call, get_weather(**call.arguments))
    assert final.final == "No coat needed: it is 21 C." and final.finish_reason == "stop"


def test_the_rigged_reply_comes_back_through_the_cli(rigged, tmp_path):
    out = tmp_path / "cli-tiny"
    r = subprocess.run([*CLI, "testing", "tiny-model", str(out), "--reply", "Rigged from the shell."], capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*CLI, "generate", "-m", str(out), "--json", "Hi"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert (result["text"], result["finish_reason"]) == ("Rigged from the shell.", "stop")


def test_the_rigged_reply_comes_back_through_the_server(rigged):
    pytest.importorskip("fastapi")
    from test_server_http import client, running

    from mlx_gptoss.server.app import create_app
    from mlx_gptoss.server.engine import Engine

    engine = Engine(mlx_gptoss.load(rigged))
    try:
        with running(create_app(engine, model_id="tiny")) as url:
            c = client(url)
            r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], temperature=0)
            assert r.choices[0].message.content == REPLY
            assert c.responses.create(model="tiny", input="Hi", temperature=0).output_text == REPLY
    finally:
        engine.close()


def test_a_token_vocabulary_model_has_no_tokenizer(tmp_path):
    path = tiny_model(tmp_path / "ids", vocab=300, layers=1)
    model = mlx_gptoss.load(path)
    assert model.config.vocab_size == 300 and model.config.num_hidden_layers == 1
    assert len(list(stream_tokens(model, [1, 2, 3], max_tokens=3))) == 3


def test_bad_requests_fail_before_anything_is_written(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "NOTES.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken: already exists and is not empty"):
        tiny_model(tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["NOTES.txt"]
    with pytest.raises(ValueError, match="layout must be one of"):
        tiny_model(tmp_path / "a", layout="gguf")
    with pytest.raises(ValueError, match="rig needs the real vocabulary"):
        tiny_model(tmp_path / "b", vocab=512, rig="hi")
    with pytest.raises(ValueError, match="a bigram rig cannot write this reply"):
        tiny_model(tmp_path / "c", rig="a cat, a dog, a bird")  # " a" is followed by " dog" and " bird"
    with pytest.raises(ValueError, match="vocab must be"):
        tiny_model(tmp_path / "d", vocab="small")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    import mlx_gptoss.testing as testing

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(testing, "convert", broken)
    with pytest.raises(OSError, match="disk full"):
        tiny_model(tmp_path / "tiny", vocab=512)
    assert list(tmp_path.iterdir()) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.undo()
    assert tiny_model(empty, vocab=512) == empty and (empty / "config.json").is_file()  # an empty folder is filled


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    for args in (
        ["testing", "tiny-model", str(tmp_path / "x")],
        ["testing", "tiny-model", str(tmp_path / "y"), "--vocab", "lots"],
    ):
        r = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert [line for line in r.stderr.splitlines() if line.startswith("Error:")] == r.stderr.strip().splitlines()[-1:]
