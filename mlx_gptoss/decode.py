"""One decode step (batch 1, one token) as a single ``mx.compile``'d graph.

Decoding is many small kernels per token (norms, the qkv/o matmuls, RoPE, cache writes,
attention, routing, experts, residual adds; ~17 per layer). Traced op by op from Python, the
host-side graph building can take longer than the GPU work. Compiled, a step is one call: the
KV buffers are passed in and returned (written with ``slice_update`` at a position held in an
array), so the graph's shapes stay fixed while the position moves, and attention masks the
unused slots. Shapes change only when a full-attention buffer grows: that compiles the step
once more, so here buffers grow by doubling (and ``generate`` reserves the prompt plus the
tokens asked for up front, so a generation compiles once).

Used by :meth:`GptOss.__call__` for one-token calls when :func:`enabled` and the model is the
plain in-memory one (a streamed or host-embedding model keeps the eager path: its Python-side
expert cache cannot be traced). It is off unless ``MLX_GPTOSS_COMPILE=1`` (or
:func:`set_enabled`): it measured slower wherever it was measured (benchmarks/RESULTS.md): the
20b decoded at 125 tok/s compiled vs 148 eager on an H100, and 0.294 vs 0.318 tok/s on the
2-core CPU. It stays as an option for machines where building the graph in Python is the
bottleneck (``benchmarks/bench_e2e.py --engines mlx-gptoss,mlx-gptoss:compile`` tells).
"""

from __future__ import annotations

import os
from typing import Any

import mlx.core as mx

from .cache import KVCache, SlidingKVCache
from .config import SLIDING

_env = os.environ.get("MLX_GPTOSS_COMPILE", "0")
if _env not in ("0", "1"):
    raise ValueError(f"MLX_GPTOSS_COMPILE must be 0 or 1, got {_env!r}")
_DEFAULT = _env == "1"
_enabled = _DEFAULT


def set_enabled(on: bool | None) -> None:
    """Turn the compiled decode step on or off (for every model); None: back to MLX_GPTOSS_COMPILE's."""
    global _enabled
    _enabled = _DEFAULT if on is None else bool(on)


def enabled() -> bool:
    """Whether one-token calls go through the compiled step (default: no)."""
    return _enabled


class CompiledDecode:
    """``step(ids[1, 1], cache) -> logits[1, 1, V]`` for one model, compiled on first use."""

    def __init__(self, model: Any):
        self.model = model
        self._fn = mx.compile(self._step)

    def supports(self, ids: mx.array, cache: list | None) -> bool:
        """One token, batch 1, caches of the model's own kinds with their buffers in place."""
        if cache is None or ids.shape != (1, 1):
            return False
        W = self.model.config.sliding_window
        for c in cache:
            if isinstance(c, SlidingKVCache):
                if c.keys is None or c.keys.shape[2] != W:
                    return False
            elif type(c) is not KVCache or c.keys is None:
                return False
        return len({c.offset for c in cache}) == 1

    def _step(self, ids: mx.array, pos: mx.array, *state: mx.array) -> list[mx.array]:
        m, W = self.model, self.model.config.sliding_window
        x = m.embed_tokens(ids)
        out = []
        for i, layer in enumerate(m.layers):
            keys, values = state[2 * i], state[2 * i + 1]
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(x), pos)
            sliding = m.config.layer_types[i] == SLIDING
            at = (pos % W if sliding else pos).reshape(1)
            keys = mx.slice_update(keys, k, at, axes=(2,))
            values = mx.slice_update(values, v, at, axes=(2,))
            slots = mx.arange(keys.shape[2])
            # full layers: positions 0..pos; sliding: slot s holds a position in the window once
            # the window has filled, before that only slots 0..pos are written
            mask = (slots <= pos) | (pos >= W) if sliding else slots <= pos
            x = x + attn.attend(q, keys, values, mask)
            x = layer.mlp(layer.post_attention_layernorm(x), residual=x)
            out += [keys, values]
        return [m.lm_head(m.norm(x)), *out]

    def __call__(self, ids: mx.array, cache: list) -> mx.array:
        for c in cache:
            if isinstance(c, KVCache):
                c.make_room(1, double=True)
        pos = mx.array(cache[0].offset, dtype=mx.int32)
        state = [a for c in cache for a in (c.keys, c.values)]
        res = self._fn(ids, pos, *state)
        del state  # the old buffers are referenced only by the graph now, so writes can reuse them
        for i, c in enumerate(cache):
            c.keys, c.values = res[1 + 2 * i], res[2 + 2 * i]
            c.offset += 1
        return res[0]
