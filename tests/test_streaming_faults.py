"""Memory-budgeted models under faults and threads: a model folder replaced under a loaded model,
a failed expert read (synchronous and in the prefetch thread), two threads on one model."""

from __future__ import annotations

import errno
import os
import shutil
import threading

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY

import mlx_gptoss
from mlx_gptoss import loader
from mlx_gptoss.config import GptOssConfig
from mlx_gptoss.generate import prefill, stream_tokens
from mlx_gptoss.loader import LoadError
from mlx_gptoss.memory import budget_for_slots, read_tensors
from mlx_gptoss.safetensors_io import read_header
from mlx_gptoss.streaming import ExpertReader, ExpertReadError

PROMPTS = (list(range(5, 40)), list(range(60, 75)))


def _budgeted(folder, slots: int = 4, **kw):
    budget = budget_for_slots(TINY, read_tensors(folder), slots, context=256, float_bytes=4)
    model = mlx_gptoss.load(folder, dtype=mx.float32, memory_budget=budget, context=256, **kw)
    assert model.memory_plan.streaming and model.memory_plan.embed_on_host
    return model


def _replace_with_other_weights(folder) -> None:
    """What a conversion into the folder does to each shard: new bytes (here every tensor's rows
    reversed, under the same header) renamed over the old name."""
    for f in folder.glob("*.safetensors"):
        data = bytearray(f.read_bytes())
        for info in read_header(f)[0].values():
            rows = np.frombuffer(bytes(data[info.begin : info.end]), np.uint8).reshape(info.shape[0], -1)
            data[info.begin : info.end] = rows[::-1].tobytes()
        tmp = f.with_name(f.name + ".new")
        tmp.write_bytes(bytes(data))
        os.replace(tmp, f)


def test_a_replaced_folder_does_not_reach_a_loaded_model(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "m")
    small, lazy = _budgeted(folder), mlx_gptoss.load(folder, dtype=mx.float32)  # neither has read a byte yet
    base = mlx_gptoss.load(folder, dtype=mx.float32, lazy=False)
    ids = mx.array([PROMPTS[0]])
    want, want_tokens = np.array(base(ids)), list(stream_tokens(base, PROMPTS[0], max_tokens=8))
    _replace_with_other_weights(folder)
    assert not np.array_equal(np.array(mlx_gptoss.load(folder, dtype=mx.float32)(ids)), want)  # the new files differ
    np.testing.assert_array_equal(np.array(small(ids)), want)  # streamed experts, host embedding: the old files
    np.testing.assert_array_equal(np.array(lazy(ids)), want)
    assert list(stream_tokens(small, PROMPTS[0], max_tokens=8)) == want_tokens


def test_a_folder_replaced_while_loading_is_an_error(tiny_model_dir, tmp_path, monkeypatch):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "m")
    read = loader.read_tensors

    def read_then_replace(path):  # the planner has read the old headers; the files change now
        out = read(path)
        _replace_with_other_weights(folder)
        return out

    monkeypatch.setattr(loader, "read_tensors", read_then_replace)  # where the loader reads the headers it plans from
    with pytest.raises(LoadError, match=r"model-00001-of-00001\.safetensors changed while the model was loading"):
        _budgeted(folder)


@pytest.fixture(scope="module")
def want(tiny_model_dir):
    """Greedy tokens of a fresh unbudgeted model for each prompt."""
    base = mlx_gptoss.load(tiny_model_dir, dtype=mx.float32, lazy=False)
    return [list(stream_tokens(base, p, max_tokens=8)) for p in PROMPTS]


def test_a_failed_expert_read_names_it_and_leaves_the_model_usable(tiny_model_dir, want, monkeypatch):
    small = _budgeted(tiny_model_dir, prefetch=False)
    pread, calls = os.pread, []

    def flaky(fd, n, offset):  # one I/O error, once the slots are full (the read evicts)
        calls.append(offset)
        if len(calls) == 6 * 12:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", flaky)
    named = r"model-00001-of-00001\.safetensors: reading expert \d of layer \d failed: Input/output error"
    with pytest.raises(ExpertReadError, match=named):
        list(stream_tokens(small, PROMPTS[0], max_tokens=8))
    monkeypatch.undo()
    for _ in range(2):
        assert [list(stream_tokens(small, p, max_tokens=8)) for p in PROMPTS] == want


def test_a_failed_prefetch_read_names_it_and_leaves_the_model_usable(tiny_model_dir, want, monkeypatch):
    small = _budgeted(tiny_model_dir)
    assert [list(stream_tokens(small, p, max_tokens=8)) for p in PROMPTS] == want
    assert sum(small.stream_stats.prefetched) > 0  # the prefetch thread's reads are used
    read = ExpertReader.read

    def failing_in_thread(self, layer, expert):  # a reader error without a file name, in the prefetch thread only
        if threading.current_thread() is not threading.main_thread():
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return read(self, layer, expert)

    monkeypatch.setattr(ExpertReader, "read", failing_in_thread)
    with pytest.raises(ExpertReadError, match=r"model-00001-of-00001\.safetensors: reading expert \d of layer \d failed"):
        for p in PROMPTS:
            list(stream_tokens(small, p, max_tokens=8))
    monkeypatch.undo()
    for _ in range(2):
        assert [list(stream_tokens(small, p, max_tokens=8)) for p in PROMPTS] == want


def _in_two_threads(model, rounds: int = 3) -> list[list[list[int]]]:
    results: list[list[list[int]]] = [[], []]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            for _ in range(rounds):
                results[i].append(list(stream_tokens(model, PROMPTS[i], max_tokens=8)))
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("budgeted", [True, False], ids=["budgeted", "unbudgeted"])
def test_two_threads_on_one_model_get_the_single_thread_results(tiny_model_dir, want, budgeted):
    model = _budgeted(tiny_model_dir) if budgeted else mlx_gptoss.load(tiny_model_dir, dtype=mx.float32)
    mx.eval(model.parameters())  # what a chat session does when created: the lazy weights are read here
    assert _in_two_threads(model) == [[want[0]] * 3, [want[1]] * 3]
    assert [list(stream_tokens(model, p, max_tokens=8)) for p in PROMPTS] == want  # and again in this thread


def test_a_prefill_in_one_thread_leaves_nothing_lazy_for_another(tiny_model_dir, want):
    small = _budgeted(tiny_model_dir)
    mx.eval(small.parameters())
    # the prefill evaluates the KV cache only: the last layer's expert output (and slot writes, for one
    # token on the direct path) is never needed
    t = threading.Thread(target=prefill, args=(small, PROMPTS[0][:1], small.make_cache()))
    t.start()
    t.join()
    assert [list(stream_tokens(small, p, max_tokens=8)) for p in PROMPTS] == want


def test_two_chat_sessions_in_two_threads_on_one_budgeted_model(vocab_model_dir):
    cfg = GptOssConfig.from_file(vocab_model_dir / "config.json")
    budget = budget_for_slots(cfg, read_tensors(vocab_model_dir), 4, context=512)
    model = mlx_gptoss.load(vocab_model_dir, memory_budget=budget, context=512)
    questions = (("hello", "and then?"), ("what is 2+2?", "why?"))

    def converse(session, qs) -> list[list[int]]:
        return [session.send(q, max_tokens=6).stats.tokens for q in qs]

    want = [converse(model.chat(), qs) for qs in questions]
    sessions = [model.chat() for _ in questions]  # created here: the weights are read in this thread
    got: list = [None, None]
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, converse(sessions[i], questions[i]))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    assert converse(model.chat(), questions[0]) == want[0]  # the model still works in this thread


def test_streamed_layers_interleaved_by_two_threads_stay_exact(tiny_model_dir, want):
    # the model called directly (a caller's own loop, no generation lock): the streamed layers
    # serialise their slot changes themselves, and their slots hold no lazy writes between calls
    small = _budgeted(tiny_model_dir)
    mx.eval(small.parameters())

    def greedy(prompt: list[int]) -> list[int]:
        cache, out = small.make_cache(), []
        logits = small(mx.array([prompt]), cache)
        for _ in range(8):
            out.append(mx.argmax(logits[0, -1]).item())
            logits = small(mx.array([[out[-1]]]), cache)
        return out

    got: list = [[], []]
    threads = [threading.Thread(target=lambda i=i: got[i].extend(greedy(PROMPTS[i]) for _ in range(3))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [[want[0]] * 3, [want[1]] * 3]
