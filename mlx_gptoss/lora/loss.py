"""The loss of a micro-batch and its layer-wise backward, lean in memory.

The forward pass runs block by block outside any gradient transform, keeping each block's input;
the backward then recomputes one block at a time, from the last down to the lowest one with
adapters (:func:`loss_and_grads`), so no more than one block's graph lives at once. The loss is
taken over the trained positions only, ``chunk`` positions at a time through the unembedding, each
chunk's backward done before the next, so [T, V] logits never exist at once.

Shape legend: B batch, T tokens, H hidden, N trained positions, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten


@dataclass
class Batch:
    """A right-padded micro-batch: ``ids`` [B, T]; ``sel`` the flat [B*T] index of each trained
    position's predicting token [N]; ``labels`` the token predicted there [N]."""

    ids: mx.array
    sel: mx.array
    labels: mx.array
    n_tokens: int
    n_targets: int


def make_batch(examples: Sequence[Any]) -> Batch:
    """Pad ``examples`` (``.ids``, ``.targets``) on the right into one :class:`Batch`."""
    T = max(len(e.ids) for e in examples)
    ids = np.zeros((len(examples), T), dtype=np.int32)
    sel: list[int] = []
    labels: list[int] = []
    for b, e in enumerate(examples):
        ids[b, : len(e.ids)] = e.ids
        for i in range(1, len(e.ids)):
            if e.targets[i]:  # token i is predicted from position i - 1
                sel.append(b * T + i - 1)
                labels.append(e.ids[i])
    n_tokens = sum(len(e.ids) for e in examples)
    return Batch(mx.array(ids), mx.array(np.array(sel, dtype=np.int32)), mx.array(np.array(labels, dtype=np.int32)),
                 n_tokens, len(sel))  # fmt: skip


def hidden_states(model: nn.Module, ids: mx.array, *, checkpoint: bool = True, seed: int = 0) -> mx.array:
    """``model.hidden_states(ids)`` [B, T, H], each block recomputed in the backward when ``checkpoint``.

    Each block runs under :func:`mlx.nn.utils.checkpoint`, which passes the block's trainable
    parameters as explicit inputs (so their gradients survive the recomputation). The block
    reseeds MLX's random state from (``seed``, layer) so that adapter dropout draws the same
    masks in the recomputation as in the forward pass.
    """
    if not checkpoint:
        return model.hidden_states(ids)
    x = model.embed_tokens(ids)
    masks = model.masks(ids.shape[1])  # the model's own masks for a cache-less pass

    def block_fn(layer: nn.Module, mask: Any, layer_seed: int) -> Callable[[mx.array], mx.array]:
        def run(x: mx.array) -> mx.array:
            mx.random.seed(layer_seed)
            return layer(x, mask, None)

        return nn.utils.checkpoint(layer, run)

    for i, (layer, kind) in enumerate(zip(model.layers, model.config.layer_types)):
        x = block_fn(layer, masks[kind], mix_seed(seed, i))(x)
    return model.norm(x)


def target_loss(model: nn.Module, h: mx.array, sel: mx.array, labels: mx.array, *, chunk: int = 32,
                checkpoint: bool = True) -> mx.array:  # fmt: skip
    """Summed cross-entropy at the trained positions: h [B, T, H] -> gather [N, H] -> logits ``chunk`` rows at a time."""
    H = h.shape[-1]
    h = mx.take(h.reshape(-1, H), sel, axis=0)  # [N, H]

    def chunk_ce(yc: mx.array) -> Callable[[mx.array], mx.array]:
        ce = _chunk_ce(model, yc)
        # a chunk's [chunk, V] logits are recomputed in the backward, not kept
        return nn.utils.checkpoint(model.lm_head, ce) if checkpoint else ce

    total = mx.array(0.0)
    for i in range(0, h.shape[0], chunk):
        total = total + chunk_ce(labels[i : i + chunk])(h[i : i + chunk])
    return total


def _chunk_ce(model: nn.Module, yc: mx.array) -> Callable[[mx.array], mx.array]:
    """The summed cross-entropy of rows hc [n, H] against labels ``yc`` [n]."""

    # labels enter by closure: a differentiated function differentiates all its inputs
    def ce(hc: mx.array) -> mx.array:
        return _summed_ce(model.lm_head(hc), yc)

    return ce


@mx.custom_function
def _summed_ce(logits: mx.array, labels: mx.array) -> mx.array:
    """sum(logsumexp(logits) - logits[label]) in float32, over rows of ``logits`` [n, V]."""
    lf = logits.astype(mx.float32)
    return (mx.logsumexp(lf, axis=-1) - mx.take_along_axis(lf, labels[:, None], axis=-1)[:, 0]).sum()


@_summed_ce.vjp
def _summed_ce_vjp(primals: list[mx.array], cotangent: mx.array, output: mx.array) -> tuple[mx.array, mx.array]:
    # softmax - onehot written in place of one float32 [n, V] copy: the generic graph of
    # cross_entropy keeps about five of them alive (the chunk's logits dominate a short step)
    logits, labels = primals
    p = mx.softmax(logits.astype(mx.float32), axis=-1, precise=True)
    hit = mx.take_along_axis(p, labels[:, None], axis=-1)
    p = mx.put_along_axis(p, labels[:, None], hit - 1.0, axis=-1)
    return (p * cotangent).astype(logits.dtype), mx.zeros_like(labels)


def batch_loss(model: nn.Module, batch: Batch, *, chunk: int = 32, checkpoint: bool = True, seed: int = 0) -> mx.array:
    """The summed cross-entropy over ``batch``'s trained tokens (divide by ``batch.n_targets`` for the mean)."""
    h = hidden_states(model, batch.ids, checkpoint=checkpoint, seed=seed)
    return target_loss(model, h, batch.sel, batch.labels, chunk=chunk, checkpoint=checkpoint)


def loss_and_grads(model: nn.Module, batch: Batch, *, chunk: int = 32, seed: int = 0) -> tuple[mx.array, Any]:
    """:func:`batch_loss` (checkpointed, same ``seed``) and its gradients with respect to
    ``model.trainable_parameters()``, with at most one block's graph alive at a time.

    The forward pass runs block by block outside any gradient transform, each block evaluated
    and only its input [B, T, H] kept (the training planner's "saved block inputs"), so no slot
    write of a streamed layer and no host sync of the routing holds a graph across blocks. The
    head (final norm + chunked loss) is then differentiated with respect to the last hidden
    state; each block, from the last down to the lowest one holding trainable parameters (nothing
    below needs a gradient), runs again under :func:`mlx.core.vjp` with the gradient of its
    output, giving its parameters' gradients and the gradient of its input. The loss is taken
    ``chunk`` trained positions at a time, each chunk's forward and backward done before the
    next. Each block reseeds MLX's random state from (``seed``, layer) in both passes, so adapter
    dropout draws the same masks, as in :func:`hidden_states`.
    """
    layers, types = model.layers, model.config.layer_types
    masks = model.masks(batch.ids.shape[1])
    embed_trains = bool(_trainable(model.embed_tokens))
    lowest = 0 if embed_trains else next((i for i, layer in enumerate(layers) if _trainable(layer)), len(layers))

    def block(i: int) -> Callable[[mx.array], mx.array]:
        def run(x: mx.array) -> mx.array:
            mx.random.seed(mix_seed(seed, i))
            return layers[i](x, masks[types[i]], None)

        return run

    x = model.embed_tokens(batch.ids)
    mx.eval(x)
    inputs: dict[int, mx.array] = {}
    for i in range(len(layers)):
        if i >= lowest:
            inputs[i] = x
        x = block(i)(x)
        mx.eval(x)

    def rows(x: mx.array) -> mx.array:  # [B, T, H] -> the trained positions' [N, H]
        return mx.take(model.norm(x).reshape(-1, x.shape[-1]), batch.sel, axis=0)

    # the loss chunk by chunk, each chunk's graph (its [chunk, V] logits) gone before the next
    grads: dict[str, mx.array] = {}
    h = rows(x)
    mx.eval(h)
    loss, g_rows = mx.array(0.0), []
    for i in range(0, h.shape[0], chunk):
        part, g_h = _vjp({"lm_head": model.lm_head}, _chunk_ce(model, batch.labels[i : i + chunk]), h[i : i + chunk], None, grads)
        loss, g_rows = loss + part, g_rows + [g_h]
    del h
    _, g = _vjp({"norm": model.norm}, rows, x, mx.concatenate(g_rows) if g_rows else mx.zeros((0, x.shape[-1]), x.dtype), grads)
    del x, g_rows
    for i in reversed(range(lowest, len(layers))):
        _, g = _vjp({f"layers.{i}": layers[i]}, block(i), inputs.pop(i), g, grads)
    if embed_trains:
        _vjp({"embed_tokens": model.embed_tokens}, model.embed_tokens, batch.ids, g, grads, wrt_input=False)
    return loss, tree_map_with_path(lambda path, _: grads[path], model.trainable_parameters())


def _vjp(parts: dict[str, nn.Module], fn: Callable[[mx.array], mx.array], x: mx.array, cotangent: mx.array | None,
         out: dict[str, mx.array], *, wrt_input: bool = True) -> tuple[mx.array, mx.array | None]:  # fmt: skip
    """Differentiate ``fn(x)`` (a scalar when ``cotangent`` is None) with respect to the trainable
    parameters of ``parts`` (added to ``out`` as ``prefix.name``) and, when ``wrt_input``, ``x``.

    Returns (the evaluated output, the evaluated gradient of ``x`` or None).
    """
    parts = {k: m for k, m in parts.items() if _trainable(m)}
    names = [(k, name) for k, m in parts.items() for name, _ in _trainable(m)]
    saved = {k: m.trainable_parameters() for k, m in parts.items()}
    values = [v for k in parts for _, v in tree_flatten(saved[k])]
    n_in = 1 if wrt_input else 0

    def f(*primals: mx.array) -> list[mx.array]:
        for k, m in parts.items():
            m.update(tree_unflatten([(name, v) for (pk, name), v in zip(names, primals[n_in:]) if pk == k]))
        return [fn(primals[0] if wrt_input else x)]

    seed = mx.array(1.0) if cotangent is None else cotangent
    try:
        (value,), vjps = mx.vjp(f, ([x] if wrt_input else []) + values, [seed])
    finally:
        for k, m in parts.items():  # the module keeps its own arrays, not the transform's copies
            m.update(saved[k])
    gx = vjps[0] if wrt_input else None
    mx.eval(value, vjps)
    for (k, name), v in zip(names, vjps[n_in:]):
        key = f"{k}.{name}"
        out[key] = out[key] + v if key in out else v
    return value, gx


def _trainable(m: Any) -> list[tuple[str, mx.array]]:
    """``m``'s trainable parameters, flat (none for a part that is no module, e.g. an embedding kept on the host)."""
    return tree_flatten(m.trainable_parameters()) if isinstance(m, nn.Module) else []


def mix_seed(*xs: int) -> int:
    """A 63-bit seed from a few integers (deterministic, unlike ``hash`` across processes)."""
    v = 0x9E3779B97F4A7C15
    for x in xs:
        v = (v ^ (x + 0x632BE59BD9B4E019 + (v << 6) + (v >> 2))) & 0xFFFFFFFFFFFFFFFF
    return v >> 1


def set_attention_chunk(model: nn.Module, chunk: int | None) -> list[tuple[nn.Module, int | None]]:
    """Set every attention layer's ``query_chunk`` (the model's seam for training); returns the old values."""
    old = [(layer.self_attn, layer.self_attn.query_chunk) for layer in model.layers]
    for attn, _ in old:
        attn.query_chunk = chunk
    return old
