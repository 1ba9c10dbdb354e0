"""Capture: the values at hook points during any forward pass (one call, a generation, a chat turn).

    with inspect.trace(model, "blocks.*.resid.post") as t:
        model(ids)
    t["blocks.3.resid.post"]                     # [B, T, H]: every call's tokens, in order
    logits, cache = inspect.run_with_cache(model, ids, names=["blocks.*.router.*"])

Each call of the model adds its tokens; a value is kept per call and joined along the token
axis on reading. Long generations stay bounded with ``last=N`` (a ring of the last N tokens per
point) or ``stats=True`` (running per-channel statistics instead of tensors).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .hooks import Point, hooked, select


def _token_axis(point: Point) -> int:
    return 0 if point.point.startswith("router.") else 2 if point.point == "attn.heads" else 1


def _parts(value: Any) -> dict[str, mx.array]:
    """A hook value as named arrays: the routing pair as ``.ids`` and ``.weights``."""
    if isinstance(value, tuple):
        ids, weights = value
        return {".ids": ids, ".weights": weights}
    return {"": value}


class Trace:
    """Captured values by hook name (``trace[name]``, ``names``, ``save``)."""

    def __init__(self, last: int | None = None, stats: bool = False):
        self.last, self.stats = last, stats
        self._calls: dict[str, list[mx.array]] = {}
        self._axis: dict[str, int] = {}
        self._stats: dict[str, _RunningStats] = {}

    def _record(self, value: Any, point: Point) -> None:
        axis = _token_axis(point)
        for suffix, a in _parts(value).items():
            key = point.name + suffix
            if self.stats:
                if suffix == ".ids":  # expert ids: how often each was chosen, not a mean
                    self._stats.setdefault(key, _Counts()).add(a)
                else:
                    self._stats.setdefault(key, _RunningStats(axis)).add(a)
                continue
            mx.async_eval(a)  # computed with the step it belongs to, then held without its graph
            calls = self._calls.setdefault(key, [])
            self._axis[key] = axis
            calls.append(a)
            if self.last is not None:
                _trim(calls, axis, self.last)

    @property
    def names(self) -> list[str]:
        """The captured names, in forward order of first capture (routing as ``...router.topk.ids``/``.weights``)."""
        return list(self._stats if self.stats else self._calls)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> mx.array | dict[str, np.ndarray]:
        """The value at ``name``: every call's tokens joined along the token axis (with ``stats``:
        ``{"count", "mean", "var", "min", "max"}`` per channel)."""
        if self.stats:
            if name not in self._stats:
                raise KeyError(f"{name!r} was not captured (captured: {', '.join(self._stats) or 'nothing'})")
            return self._stats[name].result()
        if name not in self._calls:
            hint = " (the routing pair is stored as NAME.ids and NAME.weights)" if name.endswith("router.topk") else ""
            raise KeyError(f"{name!r} was not captured{hint} (captured: {', '.join(self._calls) or 'nothing'})")
        calls = self._calls[name]
        return calls[0] if len(calls) == 1 else mx.concatenate(calls, axis=self._axis[name])

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Every captured value as a NumPy array (float32 for bfloat16), by name."""
        out = {}
        for name in self.names:
            v = self[name]
            if isinstance(v, dict):
                out.update({f"{name}.{k}": np.asarray(x) for k, x in v.items()})
            else:
                out[name] = np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v)
        return out

    def save(self, path: str | Path) -> Path:
        """Write every captured value to ``path``: ``.safetensors`` or ``.npz`` (by the suffix)."""
        path = Path(path)
        arrays = self.to_numpy()
        if path.suffix == ".npz":
            np.savez(path, **arrays)
        elif path.suffix == ".safetensors":
            mx.save_safetensors(str(path), {k: mx.array(v) for k, v in arrays.items()})
        else:
            raise ValueError(f"{path}: the suffix says the format: .safetensors or .npz")
        return path


def _trim(calls: list[mx.array], axis: int, last: int) -> None:
    """Keep the last ``last`` tokens of ``calls`` (along ``axis``)."""
    total = sum(a.shape[axis] for a in calls)
    while calls and total - calls[0].shape[axis] >= last:
        total -= calls.pop(0).shape[axis]
    if total > last:
        drop = total - last
        idx = [slice(None)] * calls[0].ndim
        idx[axis] = slice(drop, None)
        calls[0] = calls[0][tuple(idx)]


class _RunningStats:
    """Per-channel count, mean, variance (Chan's parallel update), min and max over tokens."""

    def __init__(self, axis: int):
        self.axis = axis
        self.n = 0
        self.mean = self.m2 = self.lo = self.hi = None

    def add(self, a: mx.array) -> None:
        x = np.moveaxis(np.array(a.astype(mx.float32), dtype=np.float64), self.axis, 0)  # tokens first
        x = x.reshape(x.shape[0] * (x.shape[1] if self.axis else 1), -1)  # [tokens (x batch), channels]
        n = x.shape[0]
        mean, m2 = x.mean(axis=0), ((x - x.mean(axis=0)) ** 2).sum(axis=0)
        if self.n == 0:
            self.n, self.mean, self.m2, self.lo, self.hi = n, mean, m2, x.min(axis=0), x.max(axis=0)
            return
        d, total = mean - self.mean, self.n + n
        self.mean = self.mean + d * n / total
        self.m2 = self.m2 + m2 + d**2 * self.n * n / total
        self.n, self.lo, self.hi = total, np.minimum(self.lo, x.min(axis=0)), np.maximum(self.hi, x.max(axis=0))

    def result(self) -> dict[str, np.ndarray]:
        return {"count": np.array(self.n), "mean": self.mean, "var": self.m2 / max(self.n, 1), "min": self.lo, "max": self.hi}


class _Counts:
    """How many times each expert id was chosen."""

    def __init__(self):
        self.counts = np.zeros(0, dtype=np.int64)

    def add(self, ids: mx.array) -> None:
        c = np.bincount(np.array(ids).reshape(-1).astype(np.int64))
        if len(c) > len(self.counts):
            self.counts = np.pad(self.counts, (0, len(c) - len(self.counts)))
        self.counts[: len(c)] += c

    def result(self) -> dict[str, np.ndarray]:
        return {"counts": self.counts.copy()}


@contextmanager
def trace(model: Any, names: str | Sequence[str] = "*", *, last: int | None = None, stats: bool = False) -> Iterator[Trace]:
    """Capture the values at the hook points ``names`` (globs) while the block runs.

    Args:
        names: hook names or globs (default: every point); see :mod:`.hooks`.
        last: keep only the last ``last`` tokens per point (a ring, for long generations).
        stats: keep running per-channel statistics instead of the values.

    The capture sees the values after any intervention added before it (and before those added
    inside its block). Captured values are read with ``trace[name]``; ``trace.save(path)``.
    """
    if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 1):
        raise ValueError(f"last must be an integer >= 1 (tokens kept per point); got {last!r}")
    t = Trace(last, stats)
    with hooked(model, {n: t._record for n in select(model, names)}):
        yield t


def run_with_cache(model: Any, ids: Any, names: str | Sequence[str] = "*", *, interventions: Sequence[Any] = (),
                   cache: list | None = None) -> tuple[mx.array, Trace]:  # fmt: skip
    """One forward pass of ``ids`` (token ids [T] or [B, T]) with ``interventions`` (context
    managers from :mod:`.interventions`) active; returns the logits and the :class:`Trace` of ``names``."""
    ids = mx.array(ids) if not isinstance(ids, mx.array) else ids
    if ids.ndim == 1:
        ids = ids[None]
    with ExitStack() as stack:
        for iv in interventions:
            stack.enter_context(iv)
        with trace(model, names) as t:
            logits = model(ids, cache)
            mx.eval(logits)
    return logits, t
