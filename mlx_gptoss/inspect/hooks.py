"""Named hook points and the registry the model calls through its one seam, ``model.hooks``.

The model offers the seam (:mod:`mlx_gptoss.model`): with ``model.hooks`` None (the default) its
forward pass is the plain one; when set, each block asks ``hooks.block(i)`` for a tap and calls
``tap(point, value)`` at each point below, and the model calls ``hooks.at(name, value)`` at the
model-level points. A hook may return a replacement value (an intervention) or None (unchanged).

Points, per block ``i`` (``blocks.{i}.<point>``), with the value a hook sees:

- ``input``: the block's input, the residual stream [B, T, H]
- ``attn.heads``: attention's output per head before ``o_proj`` [B, Hq, T, D]
- ``attn.out``: attention's output after ``o_proj`` [B, T, H]
- ``resid.mid``: the residual stream after attention [B, T, H]
- ``router.logits``: the router's logits [N, E] (N = B*T tokens)
- ``router.topk``: the routing, a pair ``(ids [N, K] uint32, weights [N, K])``
- ``moe.out``: the routed experts' weighted sum [B, T, H]
- ``resid.post``: the block's output, the residual stream [B, T, H]

and for the model: ``embed.out`` [B, T, H], ``final.norm`` [B, T, H], ``logits`` [B, T, V].
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

BLOCK_POINTS = ("input", "attn.heads", "attn.out", "resid.mid", "router.logits", "router.topk", "moe.out", "resid.post")
MODEL_POINTS = ("embed.out", "final.norm", "logits")


@dataclass(frozen=True)
class Point:
    """Where a hook runs: the full name, the block (None for model-level points) and the point."""

    name: str
    layer: int | None
    point: str


HookFn = Callable[[Any, Point], Any]


def hook_names(model: Any) -> list[str]:
    """Every hook point of ``model``, in forward order."""
    blocks = [f"blocks.{i}.{p}" for i in range(model.config.num_hidden_layers) for p in BLOCK_POINTS]
    return ["embed.out", *blocks, "final.norm", "logits"]


def select(model: Any, patterns: str | list[str] | tuple[str, ...]) -> list[str]:
    """The hook names matching ``patterns`` (globs, e.g. ``"blocks.*.router.topk"``), in forward order.

    A pattern that matches nothing is a ValueError listing the valid names (in short)."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    names = hook_names(model)
    out: list[str] = []
    for pat in patterns:
        if not isinstance(pat, str):
            raise TypeError(f"hook names must be strings (globs allowed); got {pat!r}")
        hit = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hit:
            L = model.config.num_hidden_layers
            raise ValueError(
                f"no hook point matches {pat!r}; the points are {', '.join(MODEL_POINTS)} and blocks.{{i}}.<point> for i in "
                f"0..{L - 1} with <point> one of {', '.join(BLOCK_POINTS)} (globs such as 'blocks.*.resid.post' work)"
            )
        out += [n for n in hit if n not in out]
    order = {n: k for k, n in enumerate(names)}
    return sorted(out, key=order.__getitem__)


class Hooks:
    """The registry installed as ``model.hooks`` while any hook or intervention is active.

    Hooks at one point run in the order they were added, each seeing the previous one's value.
    """

    def __init__(self, n_layers: int):
        self._fns: dict[str, list[tuple[int, HookFn]]] = {}
        self._holds = 0  # interventions that change parameters keep the (eager) hooked path on
        self._ids = itertools.count()
        self._points: dict[str, Point] = {}
        for n in (*MODEL_POINTS, *(f"blocks.{i}.{p}" for i in range(n_layers) for p in BLOCK_POINTS)):
            layer = int(n.split(".")[1]) if n.startswith("blocks.") else None
            self._points[n] = Point(n, layer, n.split(".", 2)[2] if layer is not None else n)
        self._taps: dict[int, Callable[[str, Any], Any] | None] = {}

    @property
    def empty(self) -> bool:
        return not self._fns and not self._holds

    def add(self, name: str, fn: HookFn) -> int:
        """Run ``fn(value, point)`` at the point ``name`` (exact); returns a handle for :meth:`remove`."""
        if name not in self._points:
            raise ValueError(f"no hook point named {name!r}")
        if not callable(fn):
            raise TypeError(f"a hook must be callable (value, point) -> value or None; got {fn!r}")
        handle = next(self._ids)
        self._fns.setdefault(name, []).append((handle, fn))
        self._taps.clear()
        return handle

    def remove(self, handle: int) -> None:
        for name in list(self._fns):
            self._fns[name] = [(h, f) for h, f in self._fns[name] if h != handle]
            if not self._fns[name]:
                del self._fns[name]
        self._taps.clear()

    def at(self, name: str, value: Any) -> Any:
        """The value after every hook at ``name`` ran (called by the model)."""
        for _, fn in self._fns.get(name, ()):
            out = fn(value, self._points[name])
            if out is not None:
                value = out
        return value

    def block(self, i: int) -> Callable[[str, Any], Any] | None:
        """Block ``i``'s tap, ``tap(point, value) -> value``, or None when no hook touches block ``i``."""
        if i not in self._taps:
            prefix = f"blocks.{i}."
            self._taps[i] = (lambda p, v: self.at(prefix + p, v)) if any(n.startswith(prefix) for n in self._fns) else None
        return self._taps[i]


@contextmanager
def installed(model: Any) -> Iterator[Hooks]:
    """``model.hooks``, installed for the duration of the block (removed again once the last user leaves)."""
    hooks = model.hooks
    if hooks is None:
        hooks = model.hooks = Hooks(model.config.num_hidden_layers)
    try:
        yield hooks
    finally:
        if hooks.empty and model.hooks is hooks:
            model.hooks = None  # back to the plain forward pass


@contextmanager
def hooked(model: Any, fns: dict[str, HookFn]) -> Iterator[Hooks]:
    """Run each ``fns[pattern]`` at the points ``pattern`` selects, for the duration of the block."""
    names = {pat: select(model, pat) for pat in fns}
    with installed(model) as hooks:
        handles = []
        try:
            for pat, fn in fns.items():
                for n in names[pat]:
                    handles.append(hooks.add(n, fn))
            yield hooks
        finally:
            for h in handles:
                hooks.remove(h)


@contextmanager
def held(model: Any) -> Iterator[Hooks]:
    """Keep the hooked (eager) forward pass on without a hook: for interventions that change
    parameters, which a compiled decode step would not see."""
    with installed(model) as hooks:
        hooks._holds += 1
        try:
            yield hooks
        finally:
            hooks._holds -= 1
