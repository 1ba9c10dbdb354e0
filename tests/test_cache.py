"""Cached generation equals the full forward: prefill chunks, token-by-token decode past the window."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY

import mlx_gptoss
from mlx_gptoss.cache import SlidingKVCache
from mlx_gptoss.generate import prefill


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return mlx_gptoss.load(tiny_model_dir, dtype=mx.float32)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(5).integers(0, TINY.vocab_size, 4 * TINY.sliding_window + 5).tolist()


def full_forward(model, ids):
    return np.array(model(mx.array(ids)[None]))[0]


def test_decode_token_by_token_past_the_window(model, ids):
    ref = full_forward(model, ids)
    cache = model.make_cache()
    n0 = 5  # shorter than the window: the sliding cache first fills, then rotates
    got = [np.array(model(mx.array(ids[:n0])[None], cache))[0]]
    for t in ids[n0:]:
        got.append(np.array(model(mx.array([[t]]), cache))[0])
    got = np.concatenate(got)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("step", [1, 7, 16, 33])
def test_chunked_prefill_then_decode(model, ids, step):
    """Chunks smaller, equal and larger than the window; then decode continues correctly."""
    ref = full_forward(model, ids)
    cache = model.make_cache()
    split = len(ids) - 6
    prefill(model, ids[: split - 1], cache, step=step)
    got = [np.array(model(mx.array(ids[split - 1 : split])[None], cache))[0]]
    for t in ids[split:]:
        got.append(np.array(model(mx.array([[t]]), cache))[0])
    np.testing.assert_allclose(np.concatenate(got), ref[split - 1 :], rtol=0, atol=2e-5 * np.abs(ref).max())


def test_sliding_cache_keeps_only_its_window(model, ids):
    cache = model.make_cache()
    prefill(model, ids, cache, step=10)
    sliding = [c for c in cache if isinstance(c, SlidingKVCache)]
    assert sliding and all(c.keys.shape[2] == TINY.sliding_window for c in sliding)
    full = [c for c in cache if not isinstance(c, SlidingKVCache)]
    assert all(c.offset == len(ids) for c in full + sliding)
