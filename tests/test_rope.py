"""YaRN: our frequencies against transformers' at the real config, and the rotation itself."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_gptoss.config import GptOssConfig, YarnScaling
from mlx_gptoss.rope import YarnRope, yarn_inv_freq

REAL = GptOssConfig.gpt_oss_20b()


def transformers_inv_freq(truncate: bool) -> tuple[np.ndarray, float]:
    pytest.importorskip("torch")
    from transformers import GptOssConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = HFConfig(
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "original_max_position_embeddings": 4096,
            "truncate": truncate,
        }
    )
    inv, factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    return inv.numpy(), factor


@pytest.mark.parametrize("truncate", [False, True])
def test_inv_freq_matches_transformers(truncate):
    ref, factor = transformers_inv_freq(truncate)
    ours = yarn_inv_freq(64, 150000.0, YarnScaling(truncate=truncate))
    np.testing.assert_allclose(ours, ref, rtol=2e-6)
    assert math.isclose(YarnScaling().attention_factor, factor) and math.isclose(factor, 1.3465735902799727)


def test_the_release_does_not_truncate():
    assert REAL.rope_scaling.truncate is False
    a = yarn_inv_freq(64, 150000.0, YarnScaling(truncate=False))
    b = yarn_inv_freq(64, 150000.0, YarnScaling(truncate=True))
    assert np.abs(a / b - 1).max() > 0.01


def test_rotation_is_rotate_half_at_the_offset():
    rope = YarnRope(64, 150000.0, YarnScaling())
    x = mx.random.normal((1, 2, 5, 64), key=mx.random.key(0))
    offset = 1000
    got = np.array(rope(x, offset))
    inv = yarn_inv_freq(64, 150000.0, YarnScaling())
    ang = (np.arange(offset, offset + 5)[:, None] * inv[None]).astype(np.float64)
    cos, sin = np.cos(ang), np.sin(ang)
    xn = np.array(x).astype(np.float64)
    a, b = xn[..., :32], xn[..., 32:]
    want = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    np.testing.assert_allclose(got, want, atol=2e-4)
