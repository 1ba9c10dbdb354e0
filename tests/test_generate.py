"""Generation: the loop, sampling, stops, limits, and the CLI on a tiny converted model."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

import mlx_gptoss
from mlx_gptoss.cli import main
from mlx_gptoss.generate import PromptTooLongError, make_sampler, stream_tokens


@pytest.fixture(scope="module")
def model(vocab_model_dir):
    return mlx_gptoss.load(vocab_model_dir)


def greedy_without_cache(model, ids: list[int], n: int) -> list[int]:
    """Greedy continuation by full forwards, sharing no code with the generation loop."""
    out = []
    for _ in range(n):
        logits = model(mx.array(ids + out)[None])[0, -1]
        out.append(int(np.argmax(np.array(logits.astype(mx.float32)))))
    return out


def test_cli_raw_greedy_prints_the_greedy_continuation(model, vocab_model_dir):
    prompt = "The quick brown fox"
    want = greedy_without_cache(model, model.tokenizer.encode(prompt, allow_special=True), 12)
    res = CliRunner().invoke(main, ["generate", "-m", str(vocab_model_dir), "--raw", "--temp", "0",
                                    "--max-tokens", "12", prompt])  # fmt: skip
    assert res.exit_code == 0, res.output
    stops = set(model.tokenizer.stop_tokens)
    cut = next((i for i, t in enumerate(want) if t in stops), len(want))
    assert res.stdout == model.tokenizer.decode(want[:cut]) + "\n"
    assert "prompt: 4 tokens" in res.stderr and "generation:" in res.stderr and "peak memory" in res.stderr


def test_cli_json_and_stdin(vocab_model_dir):
    res = CliRunner().invoke(main, ["generate", "-m", str(vocab_model_dir), "--max-tokens", "5", "--json",
                                    "--reasoning-effort", "low"], input="Hello there")  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["generation_tokens"] <= 5 and out["prompt_tokens"] > 20  # harmony-rendered
    assert set(out) >= {"text", "reasoning", "tokens", "finish_reason", "prompt_tps", "generation_tps", "peak_memory_gb"}


def test_cli_clear_error_for_a_bad_model(tmp_path):
    res = CliRunner().invoke(main, ["generate", "-m", str(tmp_path), "hi"])
    assert res.exit_code == 1 and "no config.json" in res.output


def test_cli_convert_errors_cleanly(tmp_path):
    res = CliRunner().invoke(main, ["convert", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert res.exit_code == 1 and "no such directory" in res.output


def test_stops_on_a_stop_token(model):
    stop = greedy_without_cache(model, [1, 2, 3], 3)[2]
    from mlx_gptoss.generate import GenerationResult

    stats = GenerationResult()
    toks = list(stream_tokens(model, [1, 2, 3], max_tokens=10, stop_tokens=[stop], stats=stats))
    assert toks[-1] == stop and len(toks) <= 3 and stats.finish_reason == "stop"


def test_length_limit_and_stats(model):
    from mlx_gptoss.generate import GenerationResult

    stats = GenerationResult()
    toks = list(stream_tokens(model, [1, 2, 3], max_tokens=4, stats=stats))
    assert len(toks) == 4 and stats.finish_reason == "length" and stats.generation_tokens == 4
    assert stats.prompt_tps > 0 and stats.generation_tps > 0 and stats.peak_memory_gb > 0


def test_overlong_prompt(model):
    n = model.config.max_position_embeddings
    with pytest.raises(PromptTooLongError, match=f"context of {n}"):
        next(stream_tokens(model, [1] * n, max_tokens=1))


def test_token_ids_outside_the_vocabulary(model):
    with pytest.raises(ValueError, match="model's vocabulary"):
        next(stream_tokens(model, [1, model.config.vocab_size], max_tokens=1))


def test_seeded_sampling_is_reproducible(model):
    a = list(stream_tokens(model, [1, 2, 3], max_tokens=6, temp=1.0, seed=4))
    b = list(stream_tokens(model, [1, 2, 3], max_tokens=6, temp=1.0, seed=4))
    assert a == b


def test_top_p_keeps_the_nucleus():
    logits = mx.array([[0.0, 3.0, 1.0, -2.0]])
    sample = make_sampler(temp=1.0, top_p=0.5)  # token 1 alone holds > 80 % of the mass
    assert {int(sample(logits)[0]) for _ in range(50)} == {1}
    sample = make_sampler(temp=1.0, top_p=0.99)
    assert {int(sample(logits)[0]) for _ in range(300)} >= {1, 2}
    assert int(make_sampler(0.0)(logits)[0]) == 1


def test_top_k_one_is_greedy():
    logits = mx.random.normal((64, 1000), key=mx.random.key(0)) * 3
    mx.random.seed(1)
    assert mx.array_equal(make_sampler(temp=2.0, top_k=1)(logits), mx.argmax(logits, axis=-1)).item()


def test_top_k_and_min_p_keep_only_the_likely_tokens():
    probs = mx.array([[0.05, 0.5, 0.3, 0.15]])  # token 1 most likely
    logits = mx.log(probs)
    mx.random.seed(0)

    def drawn(**kw) -> set[int]:
        sample = make_sampler(temp=1.0, **kw)
        return {int(sample(logits)[0]) for _ in range(400)}

    assert drawn() == {0, 1, 2, 3}
    assert drawn(top_k=2) == {1, 2}
    assert drawn(min_p=0.2) == {1, 2, 3}  # 0.05 < 0.2 * 0.5
    assert drawn(min_p=0.7) == {1}  # 0.3 < 0.35
    assert drawn(top_k=3, min_p=0.4) == {1, 2}  # every filter applies
    assert drawn(top_k=10_000) == {0, 1, 2, 3}  # k beyond the vocabulary keeps all


@pytest.mark.parametrize("kw, msg", [({"top_k": -1}, "top_k"), ({"top_k": 1.5}, "top_k"), ({"top_k": True}, "top_k"),
                                     ({"min_p": 1.0}, "min_p"), ({"min_p": -0.1}, "min_p")])  # fmt: skip
def test_sampling_options_are_validated(kw, msg):
    with pytest.raises(ValueError, match=msg):
        make_sampler(temp=1.0, **kw)


def test_generate_passes_top_k_and_min_p(model):
    greedy = mlx_gptoss.generate(model, [1, 2, 3], max_tokens=5)
    assert mlx_gptoss.generate(model, [1, 2, 3], max_tokens=5, temp=1.5, top_k=1, seed=0).tokens == greedy.tokens
    assert mlx_gptoss.generate(model, [1, 2, 3], max_tokens=5, temp=1.5, min_p=0.999, seed=0).tokens == greedy.tokens
    with pytest.raises(ValueError, match="min_p"):
        mlx_gptoss.generate(model, [1, 2, 3], max_tokens=5, min_p=2)
