"""YaRN rotary embeddings, exactly as gpt-oss specifies them (``truncate: false`` honoured)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from .config import YarnScaling


def yarn_inv_freq(head_dim: int, theta: float, scaling: YarnScaling | None) -> np.ndarray:
    """Inverse frequencies (float64) for rotate-half RoPE with YaRN scaling."""
    dims = np.arange(0, head_dim, 2, dtype=np.float64)
    extrapolation = 1.0 / theta ** (dims / head_dim)
    if scaling is None:
        return extrapolation
    interpolation = extrapolation / scaling.factor

    def correction_dim(rotations: float) -> float:
        n = scaling.original_max_position_embeddings
        return head_dim * math.log(n / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # keep the ramp finite
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    # ramp 0 -> keep the original frequency (fast dims), ramp 1 -> interpolate (slow dims)
    return interpolation * ramp + extrapolation * (1.0 - ramp)


class YarnRope:
    """Applies RoPE to [B, heads, T, head_dim] arrays at a position offset.

    YaRN's attention factor multiplies cos and sin, i.e. scales the rotated vector; gpt-oss applies
    it to both q and k, so :attr:`logit_scale` (its square) is folded into the attention scale.
    """

    def __init__(self, head_dim: int, theta: float, scaling: YarnScaling | None):
        self.head_dim = head_dim
        inv = yarn_inv_freq(head_dim, theta, scaling)
        self._periods = mx.array((1.0 / inv).astype(np.float32))
        self.logit_scale = scaling.attention_factor**2 if scaling is not None else 1.0

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return mx.fast.rope(x, self.head_dim, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._periods)
