"""KV caches: a growing one for full-attention layers, a rotating window for sliding layers."""

from __future__ import annotations

import mlx.core as mx


class _Cache:
    keys: mx.array | None
    values: mx.array | None

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


class KVCache(_Cache):
    """Keys/values of every position so far, in a buffer that grows in steps (no copy per token)."""

    step = 256

    def __init__(self, reserve: int = 0, shape: tuple[int, int, int] | None = None, dtype: mx.Dtype = mx.bfloat16) -> None:
        """``reserve`` positions are allocated up front ([B, kv_heads, D] = ``shape``), so the
        memory a long conversation needs is held from the start (and never regrown)."""
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        if reserve and shape is not None:
            B, H, D = shape
            self.keys = mx.zeros((B, H, reserve, D), dtype)
            self.values = mx.zeros((B, H, reserve, D), dtype)
            mx.eval(self.keys, self.values)

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        # k, v: [B, kv_heads, T, D]
        prev, T = self.offset, k.shape[2]
        self.make_room(T, k.shape, k.dtype)
        self.offset += T
        self.keys[..., prev : self.offset, :] = k
        self.values[..., prev : self.offset, :] = v
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def make_room(self, T: int, like: tuple[int, ...] | None = None, dtype: mx.Dtype | None = None, double: bool = False) -> None:
        """Grow the buffer (in steps) so that ``T`` more positions fit; ``like`` is a [B, kv_heads,
        *, D] shape and ``dtype`` the dtype, needed only while the cache is empty. ``double``
        at least doubles the capacity (few distinct shapes, for the compiled decode step)."""
        prev = self.offset
        if self.keys is not None and prev + T <= self.keys.shape[2]:
            return
        grow = ((T + self.step - 1) // self.step) * self.step
        if double and self.keys is not None:
            grow = max(grow, self.keys.shape[2] - prev)
        ref = self.keys.shape if self.keys is not None else like
        dtype = self.keys.dtype if self.keys is not None else dtype
        shape = (*ref[:2], grow, ref[3])
        new_k, new_v = mx.zeros(shape, dtype), mx.zeros(shape, dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
            self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)

    def trim(self, n: int) -> int:
        """Forget the last ``n`` positions; returns how many were forgotten."""
        n = min(self.offset, n)
        self.offset -= n
        return n


class SlidingKVCache(_Cache):
    """The last ``window`` positions only. Position p lives in slot ``p % window``.

    Decoding one token needs no mask: every stored key is inside the window, and attention does
    not care about the order of keys (RoPE is already applied to them). A prefill chunk gets the
    stored keys in position order followed by its own, and a window mask from :meth:`mask`.
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def _ordered(self, a: mx.array) -> mx.array:
        n = min(self.offset, self.window)
        if self.offset <= self.window:
            return a[..., :n, :]
        s = self.offset % self.window
        return mx.concatenate([a[..., s:, :], a[..., :s, :]], axis=2)

    def n_fetched_before(self, T: int) -> int:
        """How many stored positions :meth:`update_and_fetch` returns ahead of ``T`` new ones."""
        if T == 1 and self.keys is not None and self.keys.shape[2] == self.window:
            return self.window - 1 if self.offset >= self.window else self.offset
        return min(self.offset, self.window)

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        T, W = k.shape[2], self.window
        if T == 1 and self.keys is not None and self.keys.shape[2] == W:
            # Decode: overwrite the slot of the position that just left the window.
            slot = self.offset % W
            self.keys[..., slot : slot + 1, :] = k
            self.values[..., slot : slot + 1, :] = v
            self.offset += 1
            n = min(self.offset, W)
            return self.keys[..., :n, :], self.values[..., :n, :]
        if self.keys is None:
            all_k, all_v = k, v
        else:
            all_k = mx.concatenate([self._ordered(self.keys), k], axis=2)
            all_v = mx.concatenate([self._ordered(self.values), v], axis=2)
        self.offset += T
        keep_k, keep_v = all_k[..., -W:, :], all_v[..., -W:, :]
        n = keep_k.shape[2]
        if n < W:
            # Not full yet: positions 0..n-1 sit in slots 0..n-1; pad to the window size.
            pad = (*k.shape[:2], W - n, k.shape[3])
            self.keys = mx.concatenate([keep_k, mx.zeros(pad, k.dtype)], axis=2)
            self.values = mx.concatenate([keep_v, mx.zeros(pad, v.dtype)], axis=2)
        else:
            s = self.offset % W  # the oldest kept position goes to slot s
            self.keys = mx.concatenate([keep_k[..., W - s :, :], keep_k[..., : W - s, :]], axis=2)
            self.values = mx.concatenate([keep_v[..., W - s :, :], keep_v[..., : W - s, :]], axis=2)
        return all_k, all_v

    def trim(self, n: int) -> int:
        """Sliding caches cannot go back by themselves (positions that left the window are gone):
        restore a :meth:`snapshot` instead."""
        return 0

    def snapshot(self) -> tuple:
        """The cache's state now (cheap: arrays are shared until the cache writes again)."""
        keys = None if self.keys is None else mx.array(self.keys)  # a new array object: later writes do not reach it
        values = None if self.values is None else mx.array(self.values)
        return keys, values, self.offset

    def restore(self, snap: tuple) -> None:
        keys, values, self.offset = snap
        self.keys = None if keys is None else mx.array(keys)
        self.values = None if values is None else mx.array(values)


def window_mask(T: int, n_before: int, window: int) -> mx.array | str | None:
    """Boolean mask [T, n_before + T] for T queries that follow n_before cached keys."""
    if T == 1:
        return None
    q = mx.arange(n_before, n_before + T)[:, None]
    k = mx.arange(n_before + T)[None, :]
    return (k <= q) & (q - k < window)


def causal_mask(T: int) -> str | None:
    return None if T == 1 else "causal"
