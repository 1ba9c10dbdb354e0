"""Generation contracts under misuse: the package API, bad sampler ids, cancelling a prefill,
two threads on one model, and text the tokenizer cannot take."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import threading

import mlx.core as mx
import pytest

import mlx_gptoss
from mlx_gptoss.generate import GenerationResult, stream_tokens
from mlx_gptoss.locking import model_lock
from mlx_gptoss.tokenizer import Tokenizer, TokenizerError

CLI = [sys.executable, "-m", "mlx_gptoss.cli"]


def run_python(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def model(vocab_model_dir):
    return mlx_gptoss.load(vocab_model_dir)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    m = mlx_gptoss.load(tiny_model_dir)
    mx.eval(m.parameters())  # read in this thread: other threads may then run the model
    return m


# -- the package API (item 5) -------------------------------------------------------------------


def test_package_generate_works_again_and_after_chat(vocab_model_dir):
    res = run_python(
        """
        import sys
        import mlx_gptoss
        assert "mlx" not in sys.modules and "mlx.core" not in sys.modules, "import mlx_gptoss imported mlx"
        assert "openai_harmony" not in sys.modules
        for name in mlx_gptoss.__all__:
            getattr(mlx_gptoss, name)
        m = mlx_gptoss.load(sys.argv[1])
        a = mlx_gptoss.generate(m, "Hi", raw=True, max_tokens=3)
        b = mlx_gptoss.generate(m, "Hi", raw=True, max_tokens=3)
        m.chat().send("Hi", max_tokens=2)
        c = mlx_gptoss.generate(m, "Hi", raw=True, max_tokens=3)
        from mlx_gptoss import ChatSession, Done, FinalDelta, Reply, ToolCallCompleted, generate
        assert callable(generate) and a.tokens == b.tokens == c.tokens
        print("ok")
        """,
        str(vocab_model_dir),
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_package_exports_chat_and_event_types():
    from mlx_gptoss import chat, harmony

    assert {"ChatSession", "Reply", "Done", "GenerationResult", "ReasoningDelta", "FinalDelta", "CommentaryDelta",
            "ToolCall", "ToolCallStarted", "ToolCallDelta", "ToolCallCompleted"} <= set(mlx_gptoss.__all__)  # fmt: skip
    assert mlx_gptoss.ChatSession is chat.ChatSession and mlx_gptoss.ToolCallDelta is harmony.ToolCallDelta
    assert callable(mlx_gptoss.generate)  # chat (imported above) imports the submodule of that name


# -- sampler ids (item 10) ----------------------------------------------------------------------


def test_an_out_of_range_sampler_id_is_a_clear_error_not_a_crash(tiny_model_dir):
    # before: the id was fed to the model before it was read, and the embedding lookup crashed
    res = run_python(
        """
        import sys
        import mlx.core as mx
        import mlx_gptoss
        from mlx_gptoss.generate import stream_tokens
        m = mlx_gptoss.load(sys.argv[1])
        bad = m.config.vocab_size + 10**6
        try:
            list(stream_tokens(m, [1, 2, 3], max_tokens=4, sampler=lambda logits: mx.array([bad])))
        except ValueError as e:
            print("ValueError:", e)
        """,
        str(tiny_model_dir),
    )
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
    assert "ValueError: the sampler returned token id" in res.stdout and "outside the model's vocabulary" in res.stdout


@pytest.mark.parametrize("offset", [0, -1])
def test_sampler_ids_at_the_edges_are_rejected(tiny, offset):
    vocab = tiny.config.vocab_size
    bad = vocab if offset == 0 else -1
    with pytest.raises(ValueError, match=f"token id {bad}, outside the model's vocabulary of {vocab}"):
        list(stream_tokens(tiny, [1, 2, 3], max_tokens=3, sampler=lambda logits: mx.array([bad], dtype=mx.int32)))


# -- cancelling a prefill (item 11) -------------------------------------------------------------


class CancelAfter:
    """``is_set()`` is False ``n`` times, then True (or raises ``exc``)."""

    def __init__(self, n: int, exc: BaseException | None = None):
        self.n, self.calls, self.exc = n, 0, exc

    def is_set(self) -> bool:
        self.calls += 1
        if self.calls > self.n and self.exc is not None:
            raise self.exc
        return self.calls > self.n


def test_cancel_stops_a_prefill_between_chunks(tiny):
    cache = tiny.make_cache()
    stats = GenerationResult()
    toks = list(stream_tokens(tiny, list(range(1, 101)), max_tokens=4, prefill_step=10, cache=cache,
                              cancel=CancelAfter(2), stats=stats))  # fmt: skip
    assert toks == [] and stats.finish_reason == "cancelled"
    assert all(c.offset == 20 for c in cache)  # two whole chunks, as documented
    # the cache is consistent: continuing from it gives what a fresh generation gives
    fresh = list(stream_tokens(tiny, list(range(1, 101)), max_tokens=4))
    assert list(stream_tokens(tiny, list(range(1, 101)), max_tokens=4, cache=cache, cached=20)) == fresh


def test_keyboard_interrupt_during_prefill_propagates_and_frees_the_model(tiny):
    with pytest.raises(KeyboardInterrupt):
        list(stream_tokens(tiny, list(range(1, 101)), max_tokens=4, prefill_step=10, cancel=CancelAfter(3, KeyboardInterrupt())))
    assert _free_in_another_thread(tiny)


# -- two threads on one model (item 9) ----------------------------------------------------------


def _free_in_another_thread(model) -> bool:
    got = []

    def probe():
        lock = model_lock(model)
        got.append(lock.acquire(timeout=5))
        if got[-1]:
            lock.release()

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return got == [True]


def test_two_threads_generate_one_after_another(tiny):
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    want = [list(stream_tokens(tiny, p, max_tokens=6)) for p in prompts]
    first = stream_tokens(tiny, prompts[0], max_tokens=6)
    got = [[next(first)], None]
    second_done = threading.Event()

    def other():
        got[1] = list(stream_tokens(tiny, prompts[1], max_tokens=6))
        second_done.set()

    t = threading.Thread(target=other)
    t.start()
    assert not second_done.wait(1.0), "the second generation ran while the first held the model"
    got[0] += list(first)  # the first finishes, which lets the second run
    t.join(60)
    assert got == want


def test_closing_or_dropping_a_generator_frees_the_model(tiny):
    gen = stream_tokens(tiny, [1, 2, 3], max_tokens=6)
    next(gen)
    assert not _free_in_another_thread_quick(tiny)
    gen.close()
    assert _free_in_another_thread(tiny)
    gen = stream_tokens(tiny, [1, 2, 3], max_tokens=6)
    next(gen)
    del gen  # garbage-collected: its finally releases the lock
    assert _free_in_another_thread(tiny)


def _free_in_another_thread_quick(model) -> bool:
    got = []
    t = threading.Thread(target=lambda: got.append(model_lock(model).acquire(timeout=0.2)))
    t.start()
    t.join()
    return got == [True]


# -- text the tokenizer cannot take (item 12) ---------------------------------------------------

RUN_REFUSED = "too costly to tokenize|very long runs of one character"


def test_tokenizer_error_is_a_value_error_and_still_a_runtime_error():
    assert issubclass(TokenizerError, ValueError) and issubclass(TokenizerError, RuntimeError)


def test_a_tokenizer_panic_becomes_a_tokenizer_error(vocab_model_dir):
    class PanicException(BaseException):  # pyo3's, as openai-harmony raises it
        pass

    class Panicking:
        def encode(self, *a, **k):
            raise PanicException("called `Result::unwrap()` on an `Err` value: RuntimeError(StackOverflow)")

        decode = encode

    tok = Tokenizer(vocab_model_dir)
    tok.__dict__["encoding"] = Panicking()
    with pytest.raises(TokenizerError, match="failed to encode a text of 5 characters.*StackOverflow"):
        tok.encode("hello")
    with pytest.raises(TokenizerError, match="failed to decode 2 tokens"):
        tok.decode([1, 2])


def test_a_megabyte_run_of_one_character(vocab_model_dir):
    tok = Tokenizer(vocab_model_dir)
    # refused up front by the cost guard (a TokenizerError too), or by openai-harmony's own panic
    with pytest.raises(TokenizerError, match=RUN_REFUSED):
        tok.encode("a" * 1_000_000)
    assert tok.decode(tok.encode("a" * 1000 + " b")) == "a" * 1000 + " b"  # long but ordinary runs still work


@pytest.mark.parametrize("raw", [True, False])
def test_cli_megabyte_prompt_is_a_clear_error(vocab_model_dir, raw):
    args = [*CLI, "generate", "-m", str(vocab_model_dir), "--max-tokens", "2", *(["--raw"] if raw else [])]
    res = subprocess.run(args, input="a" * 1_000_000, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "Error: " in res.stderr and re.search(RUN_REFUSED, res.stderr) and "Traceback" not in res.stderr


# -- problems reach the result and the CLI (item 16) --------------------------------------------


def test_cli_reports_harmony_problems(vocab_model_dir):
    # a random tiny model writes no channel header: the text is kept, the problem is reported
    args = [*CLI, "generate", "-m", str(vocab_model_dir), "--max-tokens", "60", "--json", "Hi"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["problems"] and "without a channel header" in out["problems"][0] and out["text"]
    assert f"warning: {out['problems'][0]}" in res.stderr


def test_generate_result_carries_the_problems(model):
    result = mlx_gptoss.generate(model, "Hi", max_tokens=60)
    assert any("without a channel header" in p for p in result.problems) and result.text


def test_cli_top_k_one_is_greedy_and_options_are_validated(vocab_model_dir):
    base = [*CLI, "generate", "-m", str(vocab_model_dir), "--raw", "--max-tokens", "8", "--json", "The fox"]
    greedy = subprocess.run(base, capture_output=True, text=True, timeout=300)
    topk = subprocess.run([*base, "--temp", "1.5", "--top-k", "1", "--seed", "3"], capture_output=True, text=True, timeout=300)
    assert greedy.returncode == topk.returncode == 0, topk.stderr
    assert json.loads(topk.stdout)["tokens"] == json.loads(greedy.stdout)["tokens"]
    bad = subprocess.run([*base, "--min-p", "1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--min-p" in bad.stderr


# -- a prompt too costly to tokenize ends at once (issue 22, item 7) -----------------------------


# openai-harmony's encoder is quadratic on a long run without a piece boundary and holds the GIL
# (600k characters: > 500 s, Ctrl-C ignored); the tokenizer's cost guard refuses such a text in milliseconds.
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_cli_600k_character_prompt_is_refused_within_seconds(vocab_model_dir, command):
    text = "a" * 600_000
    args = [*CLI, command, "-m", str(vocab_model_dir), "--max-tokens", "2"]
    res = subprocess.run(args, input=text + "\n", capture_output=True, text=True, timeout=60)
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    if command == "generate":  # the command's one error
        errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
        assert res.returncode == 1 and len(errors) == 1, res.stderr[-2000:]
    else:  # the chat says it for that message, and goes on (here: to the end of its input)
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert res.returncode == 0 and len(errors) == 1, res.stderr[-2000:]
