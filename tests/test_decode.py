"""The compiled decode step gives the eager path's logits, across the sliding window's wrap,
a full-attention buffer's growth, a trimmed cache and a restored sliding snapshot."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_gptoss import decode, load
from mlx_gptoss.cache import KVCache


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = decode.CompiledDecode.__call__
    monkeypatch.setattr(decode.CompiledDecode, "__call__", lambda self, ids, cache: calls.append(1) or real(self, ids, cache))
    yield calls
    decode.set_enabled(None)


def steps(model, prompt, n, compiled):
    decode.set_enabled(compiled)
    cache = model.make_cache()
    out = [model(mx.array(prompt)[None], cache)[0, -1]]
    t = 3
    for i in range(n):
        logits = model(mx.array([[t]]), cache)[0, -1]
        out.append(logits)
        t = int(mx.argmax(logits).item()) if i % 2 else (7 * i + 1) % model.config.vocab_size
    mx.eval(out)
    return np.stack([np.array(o, np.float64) for o in out]), cache


def test_compiled_decode_matches_eager(tiny_model_dir, counted):
    model = load(tiny_model_dir, dtype=mx.float32)
    W = model.config.sliding_window
    n = KVCache.step + 2 * W  # the full layers' buffer grows once; the window wraps many times
    ours, cache = steps(model, list(range(1, 20)), n, compiled=True)
    assert len(counted) == n  # every one-token call took the compiled step
    ref, _ = steps(model, list(range(1, 20)), n, compiled=False)
    assert len(counted) == n
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-5
    assert cache[0].offset == 19 + n


def test_compiled_decode_after_trim_and_restore(tiny_model_dir, counted):
    """A chat turn rolls the cache back (full layers trim, sliding layers restore a snapshot):
    the stale slots past the position must be masked."""
    model = load(tiny_model_dir, dtype=mx.float32)
    prompt = list(range(5, 45))

    def run(compiled):
        decode.set_enabled(compiled)
        cache = model.make_cache()
        model(mx.array(prompt)[None], cache)
        snaps = [c.snapshot() if hasattr(c, "snapshot") else None for c in cache]
        for t in (9, 10, 11, 12, 13):
            model(mx.array([[t]]), cache)
        for c, s in zip(cache, snaps):
            c.restore(s) if s is not None else c.trim(5)
        out = [model(mx.array([[t]]), cache)[0, -1] for t in (21, 22, 23)]
        mx.eval(out)
        return np.stack([np.array(o, np.float64) for o in out])

    ours = run(True)
    assert counted
    ref = run(False)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-5


def test_env_var_turns_it_on():
    import os
    import subprocess
    import sys

    code = "from mlx_gptoss import decode; print(decode.enabled())"

    def run(v: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "MLX_GPTOSS_COMPILE": v}, capture_output=True, text=True
        )

    assert run("1").stdout.strip() == "True"
    assert run("0").stdout.strip() == "False"
    bad = run("yes")
    assert bad.returncode != 0 and "MLX_GPTOSS_COMPILE" in bad.stderr
