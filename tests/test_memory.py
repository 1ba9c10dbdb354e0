"""Memory budgets: the planner's arithmetic, exact expert streaming, host-served embedding,
clear errors for budgets that cannot be met, and `mlx-gptoss doctor`."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY

import mlx_gptoss
from mlx_gptoss.config import GptOssConfig, QuantSpec
from mlx_gptoss.generate import PromptTooLongError, stream_tokens
from mlx_gptoss.lora.adapters import LoRASpec
from mlx_gptoss.memory import (
    GB,
    BudgetError,
    budget_for_slots,
    kv_cache_bytes,
    parse_size,
    plan_memory,
    plan_training,
    read_tensors,
)
from mlx_gptoss_convert import convert


def test_kv_cache_arithmetic_matches_the_reference_figure():
    # gpt-oss-20b: 12 full-attention layers x 8 kv heads x 64 x (k, v) x 2 bytes = 24 KiB per token
    cfg = GptOssConfig.gpt_oss_20b()
    sliding = 12 * 128 * 2 * 8 * 64 * 2
    assert kv_cache_bytes(cfg, 4096) == 24 * 1024 * 4096 + sliding


def test_plan_accounts_for_every_tensor(tiny_model_dir):
    tensors = read_tensors(tiny_model_dir)
    plan = plan_memory(TINY, tensors, None, context=512, float_bytes=2)
    stored = sum(t.nbytes for t in tensors.values())
    weights = sum(c.nbytes for c in plan.components if not c.name.startswith(("KV", "activations", "runtime")))
    assert weights == stored and not plan.streaming and not plan.embed_on_host
    expert = sum(t.nbytes for k, t in tensors.items() if ".mlp.gate_up." in k or ".mlp.down." in k)
    assert plan.expert_bytes == expert // (TINY.num_hidden_layers * TINY.num_local_experts)


def test_budget_gives_the_slots_it_pays_for(tiny_model_dir):
    tensors = read_tensors(tiny_model_dir)
    L = TINY.num_hidden_layers
    for slots in (4, 5, 7):
        b = budget_for_slots(TINY, tensors, slots, context=512)
        plan = plan_memory(TINY, tensors, b, context=512)
        assert plan.expert_slots == slots and plan.embed_on_host and plan.mlx_bytes <= b
        if slots > TINY.num_experts_per_tok:
            assert plan_memory(TINY, tensors, b - 1, context=512).expert_slots == slots - 1
        assert "disk (streamed)" in plan.table()
        assert plan.components[4].nbytes == slots * L * plan.expert_bytes
    big = plan_memory(TINY, tensors, 10 * GB, context=512)
    assert big.expert_slots == TINY.num_local_experts and not big.streaming


def test_budget_too_small_says_by_how_much(tiny_model_dir):
    tensors = read_tensors(tiny_model_dir)
    need = budget_for_slots(TINY, tensors, TINY.num_experts_per_tok, context=512)
    with pytest.raises(BudgetError) as e:
        plan_memory(TINY, tensors, need - 10_000_000, context=512)
    msg = str(e.value)
    assert f"needs at least {need / GB:.2f} GB" in msg and "0.01 GB more" in msg and "shorter context" in msg
    with pytest.raises(BudgetError, match="cannot read the size"):
        parse_size("lots")
    assert parse_size("9.5GB") == 9_500_000_000 and parse_size("1GiB") == 2**30 and parse_size(123) == 123


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    """The tiny model unbudgeted, and with 4 of its 8 experts per layer resident (float32)."""
    base = mlx_gptoss.load(tiny_model_dir, dtype=mx.float32)
    budget = budget_for_slots(TINY, read_tensors(tiny_model_dir), 4, context=512, float_bytes=4)
    small = mlx_gptoss.load(tiny_model_dir, dtype=mx.float32, memory_budget=budget, context=512)
    assert small.memory_plan.expert_slots == 4
    return base, small


def test_streaming_is_exact_for_prefill_and_decode(pair):
    base, small = pair
    ids = mx.array(np.random.default_rng(3).integers(0, TINY.vocab_size, (1, 70)))
    np.testing.assert_array_equal(np.array(small(ids)), np.array(base(ids)))  # grouped prefill: 8 experts > 4 slots
    c1, c2 = base.make_cache(), small.make_cache()
    base(ids[:, :9], c1), small(ids[:, :9], c2)
    for t in range(9, 40):  # decode past the window
        np.testing.assert_array_equal(np.array(small(ids[:, t : t + 1], c2)), np.array(base(ids[:, t : t + 1], c1)))
    st = small.stream_stats.as_dict()
    assert 0 < st["hit_rate"] < 1 and st["bytes_read_per_token"] > 0 and len(st["hit_rate_per_layer"]) == TINY.num_hidden_layers


def test_streaming_generates_the_same_greedy_tokens(pair):
    base, small = pair
    prompt = list(range(5, 30))
    assert list(stream_tokens(small, prompt, max_tokens=12)) == list(stream_tokens(base, prompt, max_tokens=12))


def test_budget_limits_the_context(pair):
    _, small = pair
    with pytest.raises(PromptTooLongError, match="memory budget was planned for"):
        next(stream_tokens(small, [1] * 500, max_tokens=20))


def test_host_embedding_equals_the_resident_one(releases, tmp_path):
    for name, q, dtype in (("float", None, None), ("q8", {"embed_tokens": QuantSpec(bits=8)}, None),
                           ("q8-f32", {"embed_tokens": QuantSpec(bits=8)}, mx.float32)):  # fmt: skip
        out = convert(releases["hf"], tmp_path / name, quantization=q)
        a = mlx_gptoss.load(out, dtype=dtype)
        b = mlx_gptoss.load(out, memory_budget=10 * GB, dtype=dtype)
        assert b.memory_plan.embed_on_host and not b.memory_plan.streaming and "embed_tokens" not in b
        ids = mx.array([[0, 5, 511, 5]])
        np.testing.assert_array_equal(
            np.array(b.embed_tokens(ids).astype(mx.float32)), np.array(a.embed_tokens(ids).astype(mx.float32))
        )
        np.testing.assert_array_equal(np.array(b(ids).astype(mx.float32)), np.array(a(ids).astype(mx.float32)))


def test_streaming_with_a_quantized_checkpoint_and_a_chat_session(releases, tmp_path):
    out = convert(releases["hf"], tmp_path / "q", quantization={"attention": QuantSpec(bits=8), "lm_head": QuantSpec(bits=8)})
    budget = budget_for_slots(TINY, read_tensors(out), 5, context=256)
    small = mlx_gptoss.load(out, memory_budget=budget, context=256)
    base = mlx_gptoss.load(out)
    prompt = list(range(40, 90))
    assert list(stream_tokens(small, prompt, max_tokens=8)) == list(stream_tokens(base, prompt, max_tokens=8))


def test_cli_doctor_and_budget(tiny_model_dir, vocab_model_dir):
    from click.testing import CliRunner

    from mlx_gptoss.cli import main

    res = CliRunner().invoke(main, ["doctor", "-m", str(tiny_model_dir), "--context", "512"])
    assert res.exit_code == 0, res.output
    assert "GB RAM" in res.output and "recommended memory budget" in res.output and "experts (8/8 per layer)" in res.output
    cfg = GptOssConfig.from_file(vocab_model_dir / "config.json")
    budget = budget_for_slots(cfg, read_tensors(vocab_model_dir), 5, context=1024)
    res = CliRunner().invoke(main, ["generate", "-m", str(vocab_model_dir), "--raw", "--max-tokens", "5", "--memory-budget",
                                    str(budget), "--context", "1024", "--show-plan", "hello"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "disk (streamed)" in res.stderr and "expert cache: hit rate" in res.stderr
    res = CliRunner().invoke(main, ["generate", "-m", str(vocab_model_dir), "--memory-budget", "1MB", "hi"])
    assert res.exit_code == 1 and "cannot hold this model" in res.output


def test_budget_error_suggests_the_preset_only_to_a_model_without_it(tiny_model_dir, releases, tmp_path):
    from mlx_gptoss.converted import read_config
    from mlx_gptoss_convert import PRESETS

    preset = convert(releases["hf"], tmp_path / "p16", quantization=PRESETS["16gb"])
    for folder, suggested in ((tiny_model_dir, True), (preset, False)):
        with pytest.raises(BudgetError) as e:
            plan_memory(read_config(folder), read_tensors(folder), 1000, context=512)
        assert ("--preset 16gb" in str(e.value)) is suggested and "shorter context" in str(e.value), str(e.value)
    with pytest.raises(BudgetError) as e:  # training's plan says the same
        plan_training(read_config(preset), read_tensors(preset), LoRASpec(rank=4, alpha=8.0), max_seq_len=64, budget=1000)
    assert "--preset 16gb" not in str(e.value) and "a smaller rank" in str(e.value), str(e.value)
