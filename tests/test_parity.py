"""Logits against the reference: transformers' GptOssForCausalLM (torch CPU, float32, eager
attention, experts dequantized by transformers itself) on the same released checkpoint."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_gptoss
from mlx_gptoss.config import GptOssConfig
from mlx_gptoss.testing import write_release
from mlx_gptoss_convert import convert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BOUND = 1e-4  # max |Δlogit| <= BOUND * max |logit|


def reference_logits(release, ids: np.ndarray) -> np.ndarray:
    from transformers import GptOssForCausalLM, Mxfp4Config

    torch.manual_seed(0)
    model = GptOssForCausalLM.from_pretrained(
        release, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def ours(converted, ids: np.ndarray) -> np.ndarray:
    model = mlx_gptoss.load(converted, dtype=mx.float32)
    return np.array(model(mx.array(ids)))


def relative_error(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def test_tiny_model_matches_transformers(releases, tiny_model_dir):
    cfg = GptOssConfig.tiny()
    T = 6 * cfg.sliding_window  # several windows: the sliding layers must forget
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, T))
    ref = reference_logits(releases["hf"], ids)
    err = relative_error(ours(tiny_model_dir, ids), ref)
    print(f"tiny: max relative logit error {err:.2e}")
    assert err <= BOUND


def test_real_hidden_size_matches_transformers(tmp_path):
    """gpt-oss's real hidden size and attention shapes, the 128 window and YaRN over 320 tokens.

    The expert intermediate size is cut to 576 (MLX's CPU matmuls are slow on 2 cores); the
    MXFP4 mechanics do not depend on it.
    """
    cfg = GptOssConfig.gpt_oss_20b(num_hidden_layers=2, num_local_experts=8, intermediate_size=576, vocab_size=1024)
    release = write_release(tmp_path / "release", cfg, seed=7)
    converted = convert(release, tmp_path / "converted")
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 320))
    ref = reference_logits(release, ids)
    err = relative_error(ours(converted, ids), ref)
    print(f"real hidden size: max relative logit error {err:.2e}")
    assert err <= BOUND
    assert np.abs(ref).max() > 1.0  # logits that mean something, not a collapsed model


def test_the_bound_detects_rounded_yarn(tmp_path):
    """The test can fail: rounding YaRN's correction range (mlx-lm's bug) breaks the bound."""
    # RoPE depends only on head_dim (64) and theta: keep those real, the rest small.
    cfg = GptOssConfig.gpt_oss_20b(
        num_hidden_layers=2,
        num_local_experts=4,
        hidden_size=256,
        intermediate_size=64,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=512,
    )
    release = write_release(tmp_path / "release", cfg, seed=8)
    converted = convert(release, tmp_path / "converted")
    cfg_path = converted / "config.json"
    text = cfg_path.read_text()
    cfg_path.write_text(text.replace('"truncate": false', '"truncate": true'))
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 300))
    err = relative_error(ours(converted, ids), reference_logits(release, ids))
    assert err > BOUND
