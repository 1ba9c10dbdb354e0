"""Interventions: change what the model computes for the duration of a ``with`` block.

    with inspect.remove_experts(model, [3, 7], layers=[0, 1]), inspect.steer(model, "blocks.5.resid.post", v):
        model.chat().send("...")

Each is a context manager built on the hook points (:mod:`.hooks`); they compose (nested or in
one ``with``), apply to any forward pass inside the block (a call, a generation, a chat turn),
and are undone when the block ends, also when it raises: the next plain forward pass is
bit-identical to one before. Plain Python callables over arrays work at any point with
:func:`intervene`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import numpy as np

from .capture import Trace
from .hooks import HookFn, Point, held, hooked, select

# points whose value is the residual stream's width [B, T, H]: where a steering vector goes
RESIDUAL_POINTS = ("input", "attn.out", "resid.mid", "moe.out", "resid.post", "embed.out", "final.norm")


def intervene(model: Any, fns: Mapping[str, HookFn]) -> Any:
    """Run ``fn(value, point) -> value | None`` at each point ``fns`` names (globs) inside the block;
    a returned value replaces the model's (None keeps it)."""
    return hooked(model, dict(fns))


def _layers(model: Any, layers: int | Iterable[int] | None) -> list[int]:
    L = model.config.num_hidden_layers
    if layers is None:
        return list(range(L))
    out = [layers] if isinstance(layers, int) else list(layers)
    bad = [i for i in out if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < L]
    if bad or not out:
        raise ValueError(f"layers must be block indices in 0..{L - 1}; got {layers!r}")
    return sorted(set(out))


def _experts(model: Any, experts: int | Iterable[int], what: str) -> list[int]:
    E = model.config.num_local_experts
    out = [experts] if isinstance(experts, int) else list(experts)
    bad = [e for e in out if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or not 0 <= e < E]
    if bad or not out:
        raise ValueError(f"{what} must be expert ids in 0..{E - 1}; got {experts!r}")
    return sorted({int(e) for e in out})


def _per_layer(model: Any, experts: Any, layers: Any, what: str) -> dict[int, list[int]]:
    """``{layer: expert ids}`` from a list (for ``layers``) or a mapping layer -> ids."""
    if isinstance(experts, Mapping):
        if layers is not None:
            raise ValueError(f"give layers= or a mapping layer -> {what}, not both")
        return {_layers(model, i)[0]: _experts(model, ids, what) for i, ids in experts.items()}
    ids = _experts(model, experts, what)
    return {i: ids for i in _layers(model, layers)}


def _masked_logits(model: Any, masks: dict[int, np.ndarray]) -> dict[str, HookFn]:
    """Router-logit hooks that set the experts ``masks[layer]`` marks to -inf."""
    fns = {}
    for i, m in masks.items():
        mask = mx.array(m)

        def fn(logits: mx.array, point: Point, mask: mx.array = mask) -> mx.array:
            return mx.where(mask, mx.array(-math.inf, dtype=logits.dtype), logits)

        fns[f"blocks.{i}.router.logits"] = fn
    return fns


def remove_experts(model: Any, experts: int | Iterable[int] | Mapping[int, Iterable[int]], *,
                   layers: int | Iterable[int] | None = None) -> Any:  # fmt: skip
    """Make ``experts`` unreachable (their router logits -inf: the top-k is taken among the others)
    in ``layers`` (default: all), or per layer with a mapping ``{layer: ids}``."""
    E, K = model.config.num_local_experts, model.config.num_experts_per_tok
    per = _per_layer(model, experts, layers, "experts")
    masks = {}
    for i, ids in per.items():
        if E - len(ids) < K:
            raise ValueError(f"layer {i}: removing {len(ids)} of {E} experts leaves fewer than the {K} each token is routed to")
        masks[i] = np.isin(np.arange(E), ids)
    return hooked(model, _masked_logits(model, masks))


def force_experts(model: Any, experts: int | Iterable[int] | Mapping[int, Iterable[int]], *,
                  layers: int | Iterable[int] | None = None) -> Any:  # fmt: skip
    """Route every token only among ``experts`` in ``layers``: exactly these when there are as many
    as experts per token (k), the top k of them when more; weights are the softmax over the chosen."""
    E, K = model.config.num_local_experts, model.config.num_experts_per_tok
    per = _per_layer(model, experts, layers, "experts")
    for i, ids in per.items():
        if len(ids) < K:
            raise ValueError(f"layer {i}: forcing routing to {len(ids)} experts needs at least the {K} each token is routed to")
    return hooked(model, _masked_logits(model, {i: ~np.isin(np.arange(E), ids) for i, ids in per.items()}))


def bias_router(
    model: Any, bias: Sequence[float] | Mapping[int, float] | mx.array, *, layers: int | Iterable[int] | None = None
) -> Any:
    """Add ``bias`` ([E] values, or ``{expert: value}``) to the router logits in ``layers``."""
    E = model.config.num_local_experts
    if isinstance(bias, Mapping):
        b = np.zeros(E, dtype=np.float32)
        for e, v in bias.items():
            b[_experts(model, e, "bias keys")[0]] = v
    else:
        b = np.asarray(bias, dtype=np.float32)
        if b.shape != (E,):
            raise ValueError(f"bias must have one value per expert, shape ({E},); got {b.shape}")
    if not np.all(np.isfinite(b) | (b == -np.inf)):
        raise ValueError("bias values must be finite (or -inf to remove an expert)")
    vec = mx.array(b)

    def fn(logits: mx.array, point: Point) -> mx.array:
        return logits + vec.astype(logits.dtype)

    return hooked(model, {f"blocks.{i}.router.logits": fn for i in _layers(model, layers)})


def steer(model: Any, names: str | Sequence[str], vector: Any, *, scale: float = 1.0) -> Any:
    """Add ``scale * vector`` ([H]) to the residual-stream points ``names`` (globs) at every token."""
    H = model.config.hidden_size
    v = np.asarray(vector, dtype=np.float32)
    if v.shape != (H,):
        raise ValueError(f"the steering vector must have shape ({H},) (the hidden size); got {v.shape}")
    targets = select(model, names)
    bad = [n for n in targets if not n.endswith(RESIDUAL_POINTS)]
    if bad:
        raise ValueError(f"steer adds to residual-stream points ({', '.join(RESIDUAL_POINTS)}); {bad[0]} is not one")
    add = mx.array(v * float(scale))

    def fn(x: mx.array, point: Point) -> mx.array:
        return x + add.astype(x.dtype)

    return hooked(model, dict.fromkeys(targets, fn))


def patch(model: Any, source: Trace | Mapping[str, Any], *, names: str | Sequence[str] | None = None,
          positions: Sequence[int] | None = None) -> Any:  # fmt: skip
    """Replace the values at ``names`` (default: every point ``source`` holds) by ``source``'s: a
    :class:`~.capture.Trace` of another run (e.g. :func:`~.capture.run_with_cache` on a clean
    prompt) or ``{name: array}``. ``positions``: only those token positions of each forward call
    (the routing pair is patched whole). Shapes must match the run's; a mismatch names the point."""
    stored = source.names if isinstance(source, Trace) else list(source)
    points = sorted({n.removesuffix(".ids").removesuffix(".weights") for n in stored})  # the pair is stored as two arrays
    targets = select(model, names if names is not None else points)
    fns = {}
    for n in targets:
        if n.endswith("router.topk"):
            ids, w = source[n + ".ids"], source[n + ".weights"]
            fns[n] = _replace_pair(n, mx.array(ids), mx.array(w))
        else:
            if n not in stored:
                raise ValueError(
                    f"{n}: not in the patch source (it holds {', '.join(stored[:6])}{' ...' if len(stored) > 6 else ''})"
                )
            fns[n] = _replace(n, mx.array(source[n]), positions)
    return hooked(model, fns)


def _replace(name: str, new: mx.array, positions: Sequence[int] | None) -> HookFn:
    axis = 2 if name.endswith("attn.heads") else 0 if ".router." in name else 1
    pos = None if positions is None else [int(p) for p in positions]

    def fn(x: mx.array, point: Point) -> mx.array:
        if new.shape != x.shape:
            raise ValueError(f"patch {name}: the source holds shape {tuple(new.shape)}, the run {tuple(x.shape)}")
        if pos is None:
            return new.astype(x.dtype)
        n = x.shape[axis]
        if any(not -n <= p < n for p in pos):
            raise ValueError(f"patch {name}: positions {pos} are outside the {n} tokens of this call")
        keep = np.zeros(n, dtype=bool)
        keep[pos] = True
        shape = [1] * x.ndim
        shape[axis] = n
        return mx.where(mx.array(keep).reshape(shape), new.astype(x.dtype), x)

    return fn


def _replace_pair(name: str, ids: mx.array, weights: mx.array) -> HookFn:
    def fn(pair: tuple[mx.array, mx.array], point: Point) -> tuple[mx.array, mx.array]:
        if ids.shape != pair[0].shape:
            raise ValueError(f"patch {name}: the source routes {ids.shape[0]} tokens, the run {pair[0].shape[0]}")
        return ids.astype(pair[0].dtype), weights.astype(pair[1].dtype)

    return fn


def zero_heads(model: Any, heads: Mapping[int, Iterable[int]] | Iterable[tuple[int, int]]) -> Any:
    """Zero attention heads' outputs (before ``o_proj``): ``{layer: [head, ...]}`` or ``[(layer, head), ...]``."""
    Hq = model.config.num_attention_heads
    pairs = [(i, h) for i, hs in heads.items() for h in hs] if isinstance(heads, Mapping) else list(heads)
    per: dict[int, list[int]] = {}
    for item in pairs:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError(f"heads: expected {{layer: [heads]}} or (layer, head) pairs; got {item!r}")
        i, h = item
        if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < Hq:
            raise ValueError(f"heads: head {h!r} of layer {i} is not in 0..{Hq - 1}")
        per.setdefault(_layers(model, i)[0], []).append(h)
    fns = {}
    for i, hs in per.items():
        keep = np.ones((1, Hq, 1, 1), dtype=np.float32)
        keep[0, hs] = 0.0
        mask = mx.array(keep)

        def fn(o: mx.array, point: Point, mask: mx.array = mask) -> mx.array:
            return o * mask.astype(o.dtype)

        fns[f"blocks.{i}.attn.heads"] = fn
    return hooked(model, fns)


@contextmanager
def scale_sinks(model: Any, factor: float, *, layers: int | Iterable[int] | None = None) -> Iterator[None]:
    """Scale the attention sinks' weight by ``factor`` (their logits move by log(factor); 0 removes
    them) in ``layers``. The sink parameters are restored when the block ends."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor < 0:
        raise ValueError(f"factor must be a finite number >= 0; got {factor!r}")
    shift = math.log(factor) if factor > 0 else -math.inf
    attn = [model.layers[i].self_attn for i in _layers(model, layers)]
    saved = [a.sinks for a in attn]
    with held(model):  # a compiled decode step would keep the old sinks
        try:
            for a in attn:
                a.sinks = a.sinks + shift
            yield
        finally:
            for a, s in zip(attn, saved):
                a.sinks = s
