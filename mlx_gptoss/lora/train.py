"""The training loop: AdamW over the trainable (adapter) parameters, memory-lean loss, resumable.

Memory: each micro-batch's loss and gradients come from :mod:`.loss` (the layer-wise backward:
one block's graph at a time, the loss ``loss_chunk`` trained positions at a time).

The loss of one optimizer step is the mean cross-entropy over every trained token of the step's
``grad_accumulation`` micro-batches (the sum over all of them divided by their total count): so
two micro-batches of one example give the same step as one batch of two. Micro-batches are
padded on the right; attention is causal, so padding never changes an earlier position.

Determinism (what makes a resumed run end with the same adapter as an uninterrupted one): the
example order of epoch ``e`` is a permutation drawn from ``(seed, e)``; MLX's random state is
reseeded from ``(seed, step)`` at every step; a checkpoint stores the trainable weights, the
optimizer state (with its step count), the step and the micro-batch position.
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
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_gptoss_convert.destination import DestinationLock

from .. import kernels
from ..generate import peak_rss_gb
from .checkpoint import Checkpoint, CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .io import CONFIG, WEIGHTS, save_adapter
from .io import base_fingerprint as fingerprint
from .loss import Batch as Batch
from .loss import batch_loss as batch_loss
from .loss import loss_and_grads as loss_and_grads
from .loss import make_batch as make_batch
from .loss import mix_seed
from .loss import set_attention_chunk as set_attention_chunk

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


def refuse_finished_adapter(out: Path) -> None:
    """Refuse to start a new run in a folder that holds a finished adapter (it would be overwritten)."""
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
            step_seed = mix_seed(cfg.seed, step)
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
    # save_adapter replaces a whole folder, and ``out`` also holds the checkpoints and metrics:
    # write the adapter beside them, then move its files in (each atomically, the config last)
    tmp = out / ".adapter.tmp"
    save_adapter(model, spec, tmp, base_fingerprint=base_fingerprint or fingerprint(model))
    for name in (WEIGHTS, CONFIG):
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)


def _jsonable(d: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
