"""The training loop: AdamW over the trainable (adapter) parameters, memory-lean loss, resumable.

Memory: the forward pass runs block by block outside any gradient transform, keeping each
block's input; the backward then recomputes one block at a time from the last down to the lowest
one with adapters (:func:`loss_and_grads`), so no more than one block's graph lives at once. The
loss is taken over the trained positions only, ``loss_chunk`` positions at a time through the
unembedding, each chunk's backward done before the next chunk, so [T, V] logits never exist at once.

The loss of one optimizer step is the mean cross-entropy over every trained token of the step's
``grad_accumulation`` micro-batches (the sum over all of them divided by their total count): so
two micro-batches of one example give the same step as one batch of two. Micro-batches are
padded on the right; attention is causal, so padding never changes an earlier position.

Determinism (what makes a resumed run end with the same adapter as an uninterrupted one): the
example order of epoch ``e`` is a permutation drawn from ``(seed, e)``; MLX's random state is
reseeded from ``(seed, step)`` at every step; a checkpoint stores the trainable weights, the
optimizer state (with its step count), the step and the micro-batch position.

Shape legend: B batch, T tokens, H hidden, N trained positions, V vocabulary.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten

from mlx_gptoss_convert.destination import DestinationLock

from .. import kernels
from ..generate import peak_rss_gb
from .checkpoint import Checkpoint, CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint

SCHEDULES = ("cosine", "constant")


class TrainConfigError(ValueError):
    """An option of :class:`TrainConfig` is out of range or inconsistent."""


@dataclass
class TrainConfig:
    """How to train. Defaults are the usual LoRA recipe, chosen for small data on a laptop.

    Args:
        output_dir: where the adapter, the checkpoints and the metrics go.
        iterations / epochs: the length of the run, in optimizer steps or passes over the data
            (give one; neither = 1 epoch).
        batch_size: examples per micro-batch (1: the activations of one sequence at a time).
        grad_accumulation: micro-batches per optimizer step.
        learning_rate: peak learning rate (1e-4: the common LoRA rate; B starts at zero, so
            early steps are small anyway).
        schedule: "cosine" (linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak)
            or "constant" (warm-up, then flat).
        warmup: warm-up steps; None = 10 % of the run, at most 100 (enough to settle Adam's
            second moments without wasting a short run).
        weight_decay: AdamW's decoupled decay (0: a LoRA update is already low-rank and starts at 0).
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        seed: the data order and every random draw.
        max_seq_len: the longest example accepted (the data loader skips or truncates longer ones).
        save_every: checkpoint every this many steps (0: only at the end and on cancel).
        eval_every: validation loss every this many steps (0: only at the end).
        eval_batches: validation micro-batches per evaluation (None: the whole validation set).
        metrics_file: JSON lines, one object per step and per evaluation (default
            ``output_dir/metrics.jsonl``).
        grad_checkpoint: recompute each block in the backward (False: keep activations; faster,
            much more memory).
        loss_chunk: trained positions per unembedding chunk (32 x 201088 float32 logits = 26 MB a copy;
            a chunk's forward and backward hold about four).
        attention_chunk: queries attended at a time, each chunk recomputed in the backward (the
            backward of attention with sinks holds ~4.5 float32 copies of the scores [64, T, T]
            at once, 4.8 GB at T = 2048; in chunks ~8 copies of [64, 256, T], 1.1 GB). None: all at once.
    """

    output_dir: str | Path
    iterations: int | None = None
    epochs: int | None = None
    batch_size: int = 1
    grad_accumulation: int = 1
    learning_rate: float = 1e-4
    schedule: str = "cosine"
    warmup: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    max_seq_len: int = 2048
    save_every: int = 100
    eval_every: int = 100
    eval_batches: int | None = 25
    metrics_file: str | Path | None = None
    grad_checkpoint: bool = True
    loss_chunk: int = 32
    attention_chunk: int | None = 256

    def validate(self) -> None:
        """Raise :class:`TrainConfigError` naming the first bad option."""
        if self.iterations is not None and self.epochs is not None:
            raise TrainConfigError("give iterations or epochs, not both")
        positive = {"batch_size": self.batch_size, "grad_accumulation": self.grad_accumulation,
                    "max_seq_len": self.max_seq_len, "loss_chunk": self.loss_chunk}  # fmt: skip
        if self.attention_chunk is not None:
            positive["attention_chunk"] = self.attention_chunk
        if self.iterations is not None:
            positive["iterations"] = self.iterations
        if self.epochs is not None:
            positive["epochs"] = self.epochs
        if self.eval_batches is not None:
            positive["eval_batches"] = self.eval_batches
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TrainConfigError(f"{name} must be a positive integer, got {value!r}")
        for name, value in {"save_every": self.save_every, "eval_every": self.eval_every, "seed": self.seed}.items():
            if not isinstance(value, int) or value < 0:
                raise TrainConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if self.warmup is not None and (not isinstance(self.warmup, int) or self.warmup < 0):
            raise TrainConfigError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise TrainConfigError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.schedule not in SCHEDULES:
            raise TrainConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0:
            raise TrainConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise TrainConfigError(f"max_grad_norm must be > 0 (or None), got {self.max_grad_norm!r}")

    @property
    def metrics_path(self) -> Path:
        return Path(self.metrics_file) if self.metrics_file is not None else Path(self.output_dir) / "metrics.jsonl"

    def total_steps(self, n_examples: int) -> int:
        """Optimizer steps of the run over ``n_examples`` training examples."""
        if self.iterations is not None:
            return self.iterations
        return math.ceil((self.epochs or 1) * math.ceil(n_examples / self.batch_size) / self.grad_accumulation)

    def warmup_steps(self, total: int) -> int:
        return self.warmup if self.warmup is not None else min(100, total // 10)

    def lr_at(self, step: int, total: int) -> float:
        """The learning rate of step ``step`` (0-based) of ``total``."""
        warm = self.warmup_steps(total)
        if step < warm:
            return self.learning_rate * (step + 1) / warm
        if self.schedule == "constant":
            return self.learning_rate
        progress = (step - warm) / max(1, total - warm - 1)
        floor = self.learning_rate * self.min_lr_ratio
        return floor + (self.learning_rate - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainProgress:
    """One report to ``on_progress``: after each step (``kind="train"``) and each evaluation (``"eval"``)."""

    kind: str
    step: int  # optimizer steps done
    total_steps: int
    epoch: float  # passes over the training data so far
    loss: float | None = None  # this step's mean cross-entropy over its trained tokens
    lr: float = 0.0
    grad_norm: float | None = None  # before clipping
    tokens: int = 0  # this step's input tokens (padding excluded)
    trained_tokens: int = 0  # all trained (loss) tokens so far
    tokens_per_s: float = 0.0
    peak_memory_gb: float = 0.0  # MLX's peak allocation
    rss_gb: float = 0.0  # the process's peak resident memory
    eta_s: float | None = None
    val_loss: float | None = None
    skipped: bool = False  # the step had no trained token (nothing was updated)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """How a run ended. ``status``: "completed" or "cancelled" (a checkpoint was saved: resume it)."""

    status: str
    steps: int
    total_steps: int
    output_dir: Path
    final_loss: float | None = None
    val_loss: float | None = None
    trained_tokens: int = 0
    skipped_steps: int = 0
    elapsed_s: float = 0.0
    peak_memory_gb: float = 0.0
    checkpoint: Path | None = None
    history: list[dict] = field(default_factory=list, repr=False)


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
        x = block_fn(layer, masks[kind], _mix(seed, i))(x)
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
            mx.random.seed(_mix(seed, i))
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


def _mix(*xs: int) -> int:
    """A 63-bit seed from a few integers (deterministic, unlike ``hash`` across processes)."""
    v = 0x9E3779B97F4A7C15
    for x in xs:
        v = (v ^ (x + 0x632BE59BD9B4E019 + (v << 6) + (v >> 2))) & 0xFFFFFFFFFFFFFFFF
    return v >> 1


class _Order:
    """Micro-batch ``m`` of the endless stream: epoch m // nb, batch m % nb of a seeded permutation."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.bs, self.seed = n, batch_size, seed
        self.per_epoch = math.ceil(n / batch_size)
        self._perm: tuple[int, np.ndarray] | None = None

    def indices(self, m: int) -> np.ndarray:
        epoch, b = divmod(m, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._perm[1][b * self.bs : (b + 1) * self.bs]


def evaluate(model: nn.Module, examples: Sequence[Any], cfg: TrainConfig) -> tuple[float | None, int]:
    """Mean cross-entropy over the trained tokens of the first ``cfg.eval_batches`` micro-batches (file order)."""
    total, count = 0.0, 0
    n_batches = math.ceil(len(examples) / cfg.batch_size)
    if cfg.eval_batches is not None:
        n_batches = min(n_batches, cfg.eval_batches)
    for b in range(n_batches):
        batch = make_batch(examples[b * cfg.batch_size : (b + 1) * cfg.batch_size])
        if batch.n_targets == 0:
            continue
        loss = batch_loss(model, batch, chunk=cfg.loss_chunk, checkpoint=False)
        total += loss.item()
        count += batch.n_targets
    return (total / count if count else None), count


def refuse_model_folder(out: Path) -> None:
    """Raise TrainConfigError when ``out`` holds a model (its config.json): an adapter run must not write into it."""
    if (Path(out) / "config.json").is_file():
        raise TrainConfigError(f"{out}: holds a model (config.json); train the adapter into a folder of its own")


def set_attention_chunk(model: nn.Module, chunk: int | None) -> list[tuple[nn.Module, int | None]]:
    """Set every attention layer's ``query_chunk`` (the model's seam for training); returns the old values."""
    old = [(layer.self_attn, layer.self_attn.query_chunk) for layer in model.layers]
    for attn, _ in old:
        attn.query_chunk = chunk
    return old


def refuse_finished_adapter(out: Path) -> None:
    """Refuse to start a new run in a folder that holds a finished adapter (it would be overwritten)."""
    from .io import CONFIG, WEIGHTS

    found = [n for n in (CONFIG, WEIGHTS) if (Path(out) / n).exists()]
    if found:
        raise ValueError(f"{out} holds an adapter ({', '.join(found)}): train into another folder, or delete it first")


def _check_examples(examples: Sequence[Any], cfg: TrainConfig, what: str) -> None:
    for e in examples:
        if len(e.ids) > cfg.max_seq_len:
            raise ValueError(f"{what} line {e.line}: {len(e.ids)} tokens, more than max_seq_len {cfg.max_seq_len}")
        if len(e.ids) != len(e.targets):
            raise ValueError(f"{what} line {e.line}: {len(e.ids)} ids but {len(e.targets)} targets")


def train(
    model: nn.Module,
    train_ds: Any,
    valid_ds: Any = None,
    cfg: TrainConfig | None = None,
    *,
    spec: Any = None,
    base_fingerprint: str | None = None,
    on_progress: Callable[[TrainProgress], None] | None = None,
    cancel: threading.Event | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train ``model``'s trainable parameters (the adapters :func:`~.adapters.apply_lora` added) on ``train_ds``.

    Args:
        model: a :class:`~mlx_gptoss.model.GptOss` whose base is frozen; every trainable
            parameter is trained.
        train_ds / valid_ds: datasets from :func:`~.data.load_dataset` (anything with
            ``.examples`` of ``Example(ids, targets, line)``), or plain lists of examples.
        cfg: the :class:`TrainConfig` (``output_dir`` is required).
        spec: the :class:`~.adapters.LoRASpec` applied; with it the adapter is written with
            :func:`~.io.save_adapter` into ``cfg.output_dir`` at the end (and on cancel), without
            it the trainable weights go to ``output_dir/trainable.safetensors``.
        base_fingerprint: the base model's fingerprint recorded in the adapter (default:
            :func:`~.io.base_fingerprint` of ``model``).
        on_progress: called with a :class:`TrainProgress` after each step and each evaluation.
        cancel: set it (from any thread) to stop after the current step; a checkpoint is saved
            and the result's status is "cancelled".
        resume: continue from the latest checkpoint in ``cfg.output_dir`` (the model must carry
            the same adapters); without it, a folder that holds a checkpoint is refused.

    Raises ``ValueError`` (:class:`TrainConfigError`, :class:`~.checkpoint.CheckpointError`) for
    bad options, examples longer than ``max_seq_len``, or an empty training set.
    """
    if cfg is None:
        raise TrainConfigError("a TrainConfig with output_dir is required")
    cfg.validate()
    train_ex = list(getattr(train_ds, "examples", train_ds))
    valid_ex = list(getattr(valid_ds, "examples", valid_ds)) if valid_ds is not None else []
    if not train_ex:
        raise ValueError("the training set has no usable example")
    _check_examples(train_ex, cfg, "training data")
    _check_examples(valid_ex, cfg, "validation data")
    params = model.trainable_parameters()
    if not tree_flatten(params):
        raise ValueError("the model has no trainable parameter (apply_lora first)")

    out = Path(cfg.output_dir)
    refuse_model_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # one run per folder: two would interleave their checkpoints, metrics and adapter
    with DestinationLock(out, "training run"):
        return _train_into(model, train_ex, valid_ex, params, cfg, out, spec=spec, base_fingerprint=base_fingerprint,
                           on_progress=on_progress, cancel=cancel, resume=resume)  # fmt: skip


def _train_into(model: nn.Module, train_ex: list, valid_ex: list, params: Any, cfg: TrainConfig, out: Path, *, spec: Any,
                base_fingerprint: str | None, on_progress: Callable[[TrainProgress], None] | None,
                cancel: threading.Event | None, resume: bool) -> TrainResult:  # fmt: skip
    """:func:`train`'s run once its inputs are checked and ``out`` is locked."""
    if not resume and latest_checkpoint(out) is None:
        refuse_finished_adapter(out)
    plan = getattr(model, "memory_plan", None)
    if plan is not None and not plan.training:
        warnings.warn("the model was loaded with an inference memory plan, which leaves no room for the adapters, "
                      "optimizer and activations of training; load it with "
                      "memory_budget=mlx_gptoss.lora.plan.training_plan(...)", stacklevel=3)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    total = cfg.total_steps(len(train_ex))
    order = _Order(len(train_ex), cfg.batch_size, cfg.seed)
    last_micro = (cfg.epochs or 0) * order.per_epoch  # epochs mode: the stream ends here
    opt = optim.AdamW(learning_rate=cfg.lr_at(0, total), weight_decay=cfg.weight_decay, bias_correction=True)
    opt.init(params)
    run_key = {"seed": cfg.seed, "batch_size": cfg.batch_size, "grad_accumulation": cfg.grad_accumulation,
               "n_train": len(train_ex)}  # fmt: skip

    step, micro, trained_tokens, skipped_steps = 0, 0, 0, 0
    metrics_offset = 0
    ckpt_dir = latest_checkpoint(out)
    if resume:
        if ckpt_dir is None:
            raise CheckpointError(f"{out}: no checkpoint to resume from")
        ck = load_checkpoint(ckpt_dir)
        for k, v in run_key.items():
            if ck.state.get("run", {}).get(k) != v:
                raise CheckpointError(f"{ckpt_dir}: made with {k}={ck.state.get('run', {}).get(k)!r}, this run has {v!r}")
        names = {k for k, _ in tree_flatten(params)}
        if set(ck.trainable) != names:
            raise CheckpointError(f"{ckpt_dir}: its trainable weights do not match the model's adapters")
        model.load_weights(list(ck.trainable.items()), strict=False)
        opt.state = tree_unflatten(list(ck.optimizer.items()))
        step, micro = ck.state["step"], ck.state["micro"]
        trained_tokens, skipped_steps = ck.state["trained_tokens"], ck.state["skipped_steps"]
        metrics_offset = ck.state["metrics_offset"]
        del ck  # its arrays are the model's and the optimizer's now
    elif ckpt_dir is not None:
        raise CheckpointError(f"{out} holds a training checkpoint: resume it, or train into another (or an emptied) folder")
    del params  # the adapters as they were before training: not kept through the run

    metrics_path = cfg.metrics_path
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics = open(metrics_path, "r+b" if resume and metrics_path.exists() else "wb")
    metrics_offset = min(metrics_offset, metrics.seek(0, os.SEEK_END))  # a file deleted or cut meanwhile
    metrics.truncate(metrics_offset)  # drop lines written after the checkpoint we resume from
    metrics.seek(metrics_offset)

    def log(entry: dict) -> None:
        metrics.write((json.dumps(entry) + "\n").encode())
        metrics.flush()

    def checkpoint() -> Path:
        state = {"step": step, "micro": micro, "trained_tokens": trained_tokens, "skipped_steps": skipped_steps,
                 "metrics_offset": metrics.tell(), "run": run_key, "config": _jsonable(asdict(cfg)),
                 "spec": spec.to_dict() if spec is not None else None}  # fmt: skip
        opt_state = dict(tree_flatten(opt.state))
        return save_checkpoint(out, Checkpoint(dict(tree_flatten(model.trainable_parameters())), opt_state, state))

    if cfg.grad_checkpoint:  # one block's graph at a time (streamed experts' slot writes stay out of it)

        def step_fn(m: nn.Module, batch: Batch, seed: int) -> tuple[mx.array, Any]:
            return loss_and_grads(m, batch, chunk=cfg.loss_chunk, seed=seed)
    else:
        step_fn = nn.value_and_grad(model, lambda m, batch, seed: batch_loss(m, batch, chunk=cfg.loss_chunk,
                                                                               checkpoint=False, seed=seed))  # fmt: skip
    result = TrainResult("completed", step, total, out, trained_tokens=trained_tokens, skipped_steps=skipped_steps)
    mx.reset_peak_memory()
    t_start, steps_here = time.perf_counter(), 0
    model.train()
    # the custom GPU kernels (routing, decode-size experts) have no gradient: train through the
    # pure-MLX twins, as the CPU does (a process-wide switch, put back afterwards)
    kernel_mode = kernels.mode()
    kernels.set_mode("twin")
    chunks = set_attention_chunk(model, cfg.attention_chunk)
    try:
        while step < total:
            if cancel is not None and cancel.is_set():
                result.status = "cancelled"
                break
            t0 = time.perf_counter()
            step_seed = _mix(cfg.seed, step)
            mx.random.seed(step_seed)
            lr = cfg.lr_at(step, total)
            grads, g, loss_sum, n_targets, n_tokens = None, None, 0.0, 0, 0
            for _ in range(cfg.grad_accumulation):
                if cfg.epochs is not None and micro >= last_micro:
                    break
                batch = make_batch([train_ex[i] for i in order.indices(micro)])
                micro += 1
                n_tokens += batch.n_tokens
                if batch.n_targets == 0:  # nothing to learn from: a NaN-free no-op
                    continue
                loss, g = step_fn(model, batch, step_seed)
                grads = g if grads is None else tree_map(mx.add, grads, g)
                mx.eval(loss, grads)  # bound the graph to one micro-batch
                loss_sum += loss.item()
                n_targets += batch.n_targets
            step += 1
            progress = TrainProgress("train", step, total, micro / order.per_epoch, lr=lr, tokens=n_tokens)
            if grads is None:
                skipped_steps += 1
                progress.skipped = True
            else:
                grads = tree_map(lambda g, n=n_targets: g / n, grads)
                grad_norm = _global_norm(grads)
                if cfg.max_grad_norm is not None:
                    grads, _ = optim.clip_grad_norm(grads, cfg.max_grad_norm)
                opt.learning_rate = lr
                opt.update(model, grads)
                mx.eval(model.trainable_parameters(), opt.state)
                grads = g = None  # not held through the next step's backward
                trained_tokens += n_targets
                progress.loss, progress.grad_norm = loss_sum / n_targets, grad_norm.item()
                result.final_loss = progress.loss
            steps_here += 1
            dt = time.perf_counter() - t0
            elapsed = time.perf_counter() - t_start
            progress.trained_tokens = result.trained_tokens = trained_tokens
            progress.tokens_per_s = n_tokens / dt if dt > 0 else 0.0
            progress.peak_memory_gb = mx.get_peak_memory() / 1e9
            progress.rss_gb = peak_rss_gb()
            progress.eta_s = elapsed / steps_here * (total - step)
            log(progress.to_dict())
            result.history.append(progress.to_dict())
            if on_progress is not None:
                on_progress(progress)
            if valid_ex and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                result.val_loss = _eval_and_report(
                    model, valid_ex, cfg, step, total, micro / order.per_epoch, log, on_progress, result
                )
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                result.checkpoint = checkpoint()
        if result.status == "completed" and valid_ex:
            result.val_loss = _eval_and_report(
                model, valid_ex, cfg, step, total, micro / order.per_epoch, log, on_progress, result
            )
        result.checkpoint = checkpoint()
        _save_final(model, spec, out, base_fingerprint)  # also when cancelled: what was trained so far
    finally:
        kernels.set_mode(kernel_mode)
        for attn, c in chunks:
            attn.query_chunk = c
        metrics.close()
        model.eval()
    result.steps, result.trained_tokens, result.skipped_steps = step, trained_tokens, skipped_steps
    result.elapsed_s = time.perf_counter() - t_start
    result.peak_memory_gb = mx.get_peak_memory() / 1e9
    return result


def _eval_and_report(model, valid_ex, cfg, step, total, epoch, log, on_progress, result) -> float | None:  # noqa: ANN001
    model.eval()
    val_loss, _ = evaluate(model, valid_ex, cfg)
    model.train()
    progress = TrainProgress("eval", step, total, epoch, val_loss=val_loss, trained_tokens=result.trained_tokens,
                             peak_memory_gb=mx.get_peak_memory() / 1e9, rss_gb=peak_rss_gb())  # fmt: skip
    log(progress.to_dict())
    result.history.append(progress.to_dict())
    if on_progress is not None:
        on_progress(progress)
    return val_loss


def _global_norm(grads: Any) -> mx.array:
    return mx.sqrt(sum((mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)), mx.array(0.0)))


def _save_final(model: nn.Module, spec: Any, out: Path, base_fingerprint: str | None) -> None:
    if spec is None:
        mx.save_safetensors(str(out / "trainable.safetensors"), dict(tree_flatten(model.trainable_parameters())))
        return
    from .io import CONFIG, WEIGHTS, save_adapter
    from .io import base_fingerprint as fingerprint

    # save_adapter replaces a whole folder, and ``out`` also holds the checkpoints and metrics:
    # write the adapter beside them, then move its files in (each atomically, the config last)
    tmp = out / ".adapter.tmp"
    save_adapter(model, spec, tmp, base_fingerprint=base_fingerprint or fingerprint(model))
    for name in (WEIGHTS, CONFIG):
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)


def _jsonable(d: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
