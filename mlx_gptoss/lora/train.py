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

Safety (what a run refuses or stops on, before anything is lost):

- the output folder is never the filesystem root, the current directory or the home folder (or
  a folder holding them), nor a model's folder; one run at a time holds it (:func:`output_lock`);
- metrics go into a new file or over one this command wrote (:func:`check_metrics_file`), never
  over a model's file, the training data or any other file;
- a resume continues the run its checkpoint records, on the same base model (fingerprint), with
  the same adapter, data and data options; schedule options may change (:data:`SCHEDULE`);
- a step whose loss, gradient or updated weights are not finite stops the run before it is
  applied (:class:`TrainingDivergedError`), the last good state saved as a checkpoint;
- adapters whose gradients and AdamW state cannot fit in memory are refused before they are
  allocated (:func:`~.plan.check_trainable_memory`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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
from ..options import SEED_MAX, OptionError, check_number
from . import plan as planning
from .adapters import LoRAError, LoRASpec
from .checkpoint import STATE_VERSION, Checkpoint, CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .data import fingerprint as data_fingerprint
from .io import CONFIG, WEIGHTS, save_adapter
from .io import base_fingerprint as fingerprint
from .loss import Batch as Batch
from .loss import batch_loss as batch_loss
from .loss import loss_and_grads as loss_and_grads
from .loss import make_batch as make_batch
from .loss import mix_seed
from .loss import set_attention_chunk as set_attention_chunk

SCHEDULES = ("cosine", "constant")
# What a resume must keep (the checkpoint's run is made of them) and what it may change (the
# schedule, and options that only trade memory for time). The adapter (LoRASpec), the data (its
# fingerprint, train_on, overflow), the base model and the metrics file are fixed too.
FIXED = ("seed", "batch_size", "grad_accumulation", "max_seq_len")
SCHEDULE = ("iterations", "epochs", "learning_rate", "schedule", "warmup", "min_lr_ratio", "weight_decay",
            "max_grad_norm", "save_every", "eval_every", "eval_batches", "grad_checkpoint", "loss_chunk",
            "attention_chunk")  # fmt: skip


class TrainConfigError(ValueError):
    """An option of :class:`TrainConfig` is out of range or inconsistent."""


class TrainingDivergedError(ValueError):
    """A step's loss, gradient norm or update (the weights it made) was not finite: the run stopped
    before applying it. ``step`` (1-based) is that step, ``what`` the quantity, ``learning_rate`` the
    step's rate, ``checkpoint`` the saved last good state (None when the first step diverged)."""

    def __init__(self, message: str, *, step: int, what: str, learning_rate: float, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step, self.what, self.learning_rate, self.checkpoint = step, what, learning_rate, checkpoint


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
        """Raise :class:`TrainConfigError` naming the first bad option (NaN, infinities, booleans
        for numbers and values out of range included: :func:`mlx_gptoss.options.check_number`)."""
        try:
            self._check_numbers()
        except OptionError as e:
            raise TrainConfigError(str(e)) from None
        if self.iterations is not None and self.epochs is not None:
            raise TrainConfigError("give iterations or epochs, not both")
        if self.schedule not in SCHEDULES:
            raise TrainConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not isinstance(self.grad_checkpoint, bool):
            raise TrainConfigError(f"grad_checkpoint must be True or False, got {self.grad_checkpoint!r}")
        if not isinstance(self.output_dir, (str, Path)):
            raise TrainConfigError(f"output_dir must be a folder path, got {self.output_dir!r}")

    def _check_numbers(self) -> None:
        for name in ("batch_size", "grad_accumulation", "max_seq_len", "loss_chunk"):
            check_number(name, getattr(self, name), integer=True, min=1)
        for name in ("attention_chunk", "iterations", "epochs", "eval_batches"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), integer=True, min=1)
        for name in ("save_every", "eval_every"):
            check_number(name, getattr(self, name), integer=True, min=0)
        if self.warmup is not None:
            check_number("warmup", self.warmup, integer=True, min=0)
        check_number("seed", self.seed, integer=True, min=0, max=SEED_MAX)
        check_number("learning_rate", self.learning_rate, min=0, min_open=True)
        check_number("min_lr_ratio", self.min_lr_ratio, min=0, max=1)
        check_number("weight_decay", self.weight_decay, min=0)
        if self.max_grad_norm is not None:
            check_number("max_grad_norm", self.max_grad_norm, min=0, min_open=True)

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
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # a resume's schedule options: (checkpoint's, now)


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


def check_output_dir(out: str | Path, *, name: str = "output_dir") -> Path:
    """``out`` (``~`` expanded) if a run may write into it, else :class:`TrainConfigError` naming
    ``name``: an empty path, the filesystem root, the current directory, the home folder, or a
    folder holding either (a run writes its adapter, checkpoints and metrics there, beside what
    the folder holds) are refused."""
    if str(out).strip() == "":
        raise TrainConfigError(f"{name} is empty: give the adapter a folder of its own, e.g. my-adapter")
    path = Path(out).expanduser()
    real = path.resolve()
    how = "give the adapter a folder of its own, e.g. ./my-adapter"
    if real == Path(real.anchor):
        raise TrainConfigError(f"{name} {out}: is the filesystem root; {how}")
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise TrainConfigError(f"{name} {out}: is (or holds) the current directory; {how}")
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):  # no HOME and no password entry: there is no home folder to protect
        home = None
    if home is not None and (real == home or real in home.parents):
        raise TrainConfigError(f"{name} {out}: is (or holds) your home folder; {how}")
    return path


def is_metrics_file(path: str | Path) -> bool:
    """Whether ``path``'s first line is a record this module writes (``{"kind": "train"|"eval",
    "step": ..., "total_steps": ...}``): how a metrics file of an earlier run is recognised."""
    try:
        with open(path, "rb") as f:
            row = json.loads(f.readline(1 << 16))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(row, dict) and row.get("kind") in ("train", "eval") and "step" in row and "total_steps" in row


def check_metrics_file(path: str | Path, *, data_files: Sequence[tuple[str, Any]] = (), model_dir: Any = None,
                       name: str = "metrics_file") -> None:  # fmt: skip
    """Refuse (:class:`TrainConfigError` naming ``name``) a metrics file that would overwrite what is
    not ours: a folder, one of ``data_files`` (``(what, path)`` pairs, e.g. the training data), a
    file in ``model_dir``, or an existing non-empty file that :func:`is_metrics_file` does not
    recognise. A new file, or one an earlier run wrote, is fine."""
    p = Path(path)
    if p.is_dir():
        raise TrainConfigError(f"{name} {path}: is a folder; give a file name (e.g. OUTPUT/metrics.jsonl)")
    real = p.resolve()
    for what, f in data_files:
        if f is not None and (real == Path(f).resolve() or (p.exists() and Path(f).exists() and os.path.samefile(p, f))):
            raise TrainConfigError(f"{name} {path}: is the {what}; metrics never go over a data file: choose another file")
    if model_dir is not None:
        model = Path(model_dir).resolve()
        if real == model or model in real.parents:
            raise TrainConfigError(f"{name} {path}: lies in the model folder {model}; metrics never go into a model: "
                                   "choose another file")  # fmt: skip
    if p.exists() and p.stat().st_size > 0 and not is_metrics_file(p):
        raise TrainConfigError(f"{name} {path}: exists and is not a metrics file of lora train (its first line is not "
                               "a step record); metrics go into a new file or over one lora train wrote: choose "
                               "another file, or remove this one yourself")  # fmt: skip


_held: dict[tuple[str, int], int] = {}  # (output folder, thread) -> depth, for output_lock
_held_guard = threading.Lock()


@contextmanager
def output_lock(out: str | Path) -> Iterator[None]:
    """Hold ``out`` for one training run (the converter's :class:`DestinationLock`, ``.OUT.lock``
    beside it): a second run into it is refused at once, naming the pid that runs. Re-entrant in
    one thread, so a caller can take it before the model loads (the CLI does: a busy folder is
    refused first) and :func:`train` inside it goes on."""
    key = (os.path.abspath(out), threading.get_ident())
    with _held_guard:
        nested = key in _held
        if nested:
            _held[key] += 1
    if nested:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    with DestinationLock(Path(out), "training run"):
        with _held_guard:
            _held[key] = 1
        try:
            yield
        finally:
            with _held_guard:
                del _held[key]


def _metrics_name(metrics: Path, out: Path) -> str:
    """The metrics file as a checkpoint records it: relative to ``out`` when inside (a moved run folder keeps it)."""
    real, root = metrics.resolve(), out.resolve()
    return real.relative_to(root).as_posix() if root in real.parents else str(real)


def recorded_metrics_path(state: dict, out: str | Path) -> Path:
    """The metrics file a checkpoint's ``state.json`` recorded, as a path."""
    p = Path(state["metrics_file"])
    return p if p.is_absolute() else Path(out) / p


def check_resume(state: dict, file: Path, cfg: TrainConfig, *, spec: Any, base_fingerprint: str, data: dict,
                 n_train: int, metrics: Path) -> dict[str, tuple[Any, Any]]:  # fmt: skip
    """Compare a run with the checkpoint (``state``, read from ``file``) it resumes. Raises
    :class:`~.checkpoint.CheckpointError` naming the field when what the checkpoint fixes differs:
    the base model, the adapter (``spec``), :data:`FIXED` options, the data (fingerprint,
    ``train_on``, ``overflow``, example count), the metrics file. Returns the :data:`SCHEDULE`
    options that changed, ``{field: (checkpoint's, this run's)}``."""
    how = "it is fixed by the checkpoint (train into another folder to change it)"
    if state["base_fingerprint"] != base_fingerprint:
        raise CheckpointError(f"{file}: the run was trained on the base model {state['base_fingerprint']}, this model is "
                              f"{base_fingerprint}: resume it on the base it was trained on, or train into another folder")  # fmt: skip
    if spec is not None and state["spec"] is not None:
        try:
            saved = LoRASpec.from_dict(state["spec"])
        except (LoRAError, TypeError) as e:
            raise CheckpointError(f"{file}: field spec: {e}") from None
        for k in saved.to_dict():
            if getattr(saved, k) != getattr(spec, k):
                raise CheckpointError(f"{file}: the run's adapter has {k}={getattr(saved, k)!r}, this one asks "
                                      f"{k}={getattr(spec, k)!r}: {how}")  # fmt: skip
    config = state["config"]
    for k in FIXED:
        if config.get(k) != getattr(cfg, k):
            raise CheckpointError(f"{file}: the run was made with {k}={config.get(k)!r}, this one has {getattr(cfg, k)!r}: {how}")
    for k in ("train_on", "overflow"):
        if state["data"].get(k) is not None and data.get(k) is not None and state["data"][k] != data[k]:
            raise CheckpointError(f"{file}: the run's data was read with {k}={state['data'][k]!r}, this one with "
                                  f"{data[k]!r}: {how}")  # fmt: skip
    if state["run"]["n_train"] != n_train or state["data"]["train"] != data["train"]:
        raise CheckpointError(f"{file}: the training data differs from the run's ({n_train} examples now, "
                              f"{state['run']['n_train']} then, or other tokens or masks: an edited file?); a resumed "
                              "run trains on the same data: restore it, or train into another folder")  # fmt: skip
    if recorded_metrics_path(state, cfg.output_dir).resolve() != metrics.resolve():
        raise CheckpointError(f"{file}: the run writes its metrics into {recorded_metrics_path(state, cfg.output_dir)}, "
                              f"not {metrics}: {how}")  # fmt: skip
    return {k: (config.get(k), getattr(cfg, k)) for k in SCHEDULE if k in config and config[k] != getattr(cfg, k)}


def _check_tensors(file: Path, got: dict[str, mx.array], want: dict[str, mx.array], what: str) -> None:
    """A checkpoint file's tensors against the arrays they replace: names, shapes, dtypes."""
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        listed = "; ".join(x for x in (f"missing {', '.join(missing[:3])}" if missing else "",
                                       f"unexpected {', '.join(extra[:3])}" if extra else "") if x)  # fmt: skip
        raise CheckpointError(f"{file}: its tensors are not {what}'s ({listed}); the checkpoint belongs to another adapter")
    for name in sorted(want):
        g, w = got[name], want[name]
        if g.shape != w.shape or g.dtype != w.dtype:
            raise CheckpointError(f"{file}: tensor {name}: shape {tuple(g.shape)} {g.dtype}, where {what} has "
                                  f"{tuple(w.shape)} {w.dtype}; the checkpoint belongs to another adapter (or is damaged)")  # fmt: skip


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
        resume: continue from the latest checkpoint in ``cfg.output_dir``: the same base model,
            adapter (``spec``), data and :data:`FIXED` options as the run it records (each
            checked, :func:`check_resume`); :data:`SCHEDULE` options may differ. Without it, a
            folder that holds a checkpoint is refused.

    Raises ``ValueError``: :class:`TrainConfigError` for bad options, an output folder or metrics
    file it must not write (see the module docstring), examples longer than ``max_seq_len`` or an
    empty training set; :class:`~.checkpoint.CheckpointError` for a resume its checkpoint refuses
    (another base, adapter or data; a damaged or hand-edited checkpoint; no step left);
    :class:`TrainingDivergedError` when a step is not finite;
    :class:`~mlx_gptoss.memory.BudgetError` when the optimizer state cannot fit in memory.
    ``result.changed`` lists the schedule options a resume changed.
    """
    if cfg is None:
        raise TrainConfigError("a TrainConfig with output_dir is required")
    cfg.validate()
    out = check_output_dir(cfg.output_dir)
    train_ex = list(getattr(train_ds, "examples", train_ds))
    valid_ex = list(getattr(valid_ds, "examples", valid_ds)) if valid_ds is not None else []
    if not train_ex:
        raise ValueError("the training set has no usable example")
    _check_examples(train_ex, cfg, "training data")
    _check_examples(valid_ex, cfg, "validation data")
    params = model.trainable_parameters()
    flat = tree_flatten(params)
    if not flat:
        raise ValueError("the model has no trainable parameter (apply_lora first)")
    planning.check_trainable_memory(sum(v.size for _, v in flat))  # before AdamW allocates its moments
    refuse_model_folder(out)
    files = [("training data", getattr(train_ds, "path", None)), ("validation data", getattr(valid_ds, "path", None))]
    check_metrics_file(cfg.metrics_path, data_files=files, model_dir=getattr(model, "path", None))
    data = {"train": data_fingerprint(train_ex), "train_sha256": getattr(train_ds, "sha256", None),
            "valid": data_fingerprint(valid_ex) if valid_ex else None,
            "train_on": getattr(train_ds, "train_on", None), "overflow": getattr(train_ds, "overflow", None)}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    # one run per folder: two would interleave their checkpoints, metrics and adapter
    with output_lock(out):
        return _train_into(model, train_ex, valid_ex, params, cfg, out, spec=spec, data=data,
                           base_fingerprint=base_fingerprint or fingerprint(model), on_progress=on_progress,
                           cancel=cancel, resume=resume)  # fmt: skip


class _Diverged(Exception):
    """Inside the loop: the step being taken is not finite (turned into TrainingDivergedError)."""

    def __init__(self, what: str, value: float | None) -> None:
        super().__init__(what)
        self.what, self.value = what, value


def _finite(tree: Any) -> bool:
    """Whether every array of ``tree`` is finite (one reduction, one sync)."""
    leaves = [mx.all(mx.isfinite(v)) for _, v in tree_flatten(tree)]
    return bool(mx.all(mx.stack(leaves)).item()) if leaves else True


def _train_into(model: nn.Module, train_ex: list, valid_ex: list, params: Any, cfg: TrainConfig, out: Path, *, spec: Any,
                data: dict, base_fingerprint: str, on_progress: Callable[[TrainProgress], None] | None,
                cancel: threading.Event | None, resume: bool) -> TrainResult:  # fmt: skip
    """:func:`train`'s run once its inputs are checked and ``out`` is locked."""
    if not resume and latest_checkpoint(out) is None:
        refuse_finished_adapter(out)
    memory_plan = getattr(model, "memory_plan", None)
    if memory_plan is not None and not memory_plan.training:
        warnings.warn("the model was loaded with an inference memory plan, which leaves no room for the adapters, "
                      "optimizer and activations of training; load it with "
                      "memory_budget=mlx_gptoss.lora.plan.training_plan(...)", stacklevel=3)  # fmt: skip
    total = cfg.total_steps(len(train_ex))
    order = _Order(len(train_ex), cfg.batch_size, cfg.seed)
    last_micro = (cfg.epochs or 0) * order.per_epoch  # epochs mode: the stream ends here
    run_key = {"seed": cfg.seed, "batch_size": cfg.batch_size, "grad_accumulation": cfg.grad_accumulation,
               "n_train": len(train_ex)}  # fmt: skip
    metrics_path = cfg.metrics_path

    step, micro, trained_tokens, skipped_steps = 0, 0, 0, 0
    metrics_offset = 0
    changed: dict[str, tuple[Any, Any]] = {}
    ck = None
    ckpt_dir = latest_checkpoint(out)
    if resume:
        if ckpt_dir is None:
            raise CheckpointError(f"{out}: no checkpoint to resume from")
        ck = load_checkpoint(ckpt_dir)
        changed = check_resume(ck.state, ckpt_dir / "state.json", cfg, spec=spec, base_fingerprint=base_fingerprint,
                               data=data, n_train=len(train_ex), metrics=metrics_path)  # fmt: skip
        step = ck.state["step"]
        if step >= total:
            finished = "finished at" if step == total else "is past this run's total, at"
            raise CheckpointError(f"{out}: the run {finished} step {step}/{total}: nothing left to train; give a larger "
                                  "iterations (or epochs) to continue it")  # fmt: skip
    elif ckpt_dir is not None:
        raise CheckpointError(f"{out} holds a training checkpoint: resume it, or train into another (or an emptied) folder")
    out.mkdir(parents=True, exist_ok=True)
    opt = optim.AdamW(learning_rate=cfg.lr_at(0, total), weight_decay=cfg.weight_decay, bias_correction=True)
    opt.init(params)
    if ck is not None:
        # the shapes first: MLX would fail later inside a matmul or a broadcast, naming no file
        _check_tensors(ckpt_dir / "trainable.safetensors", ck.trainable, dict(tree_flatten(params)), "the model's adapter")
        _check_tensors(ckpt_dir / "optimizer.safetensors", ck.optimizer, dict(tree_flatten(opt.state)), "the optimizer")
        model.load_weights(list(ck.trainable.items()), strict=False)
        opt.state = tree_unflatten(list(ck.optimizer.items()))
        step, micro = ck.state["step"], ck.state["micro"]
        trained_tokens, skipped_steps = ck.state["trained_tokens"], ck.state["skipped_steps"]
        metrics_offset = ck.state["metrics_offset"]
        ck = None  # its arrays are the model's and the optimizer's now
    del params  # the adapters as they were before training: not kept through the run

    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics = open(metrics_path, "r+b" if resume and metrics_path.exists() else "wb")
    metrics_offset = min(metrics_offset, metrics.seek(0, os.SEEK_END))  # a file deleted or cut meanwhile
    metrics.truncate(metrics_offset)  # drop lines written after the checkpoint we resume from
    metrics.seek(metrics_offset)

    def log(entry: dict) -> None:
        metrics.write((json.dumps(entry) + "\n").encode())
        metrics.flush()

    def checkpoint() -> Path:
        state = {"version": STATE_VERSION, "step": step, "micro": micro, "total_steps": total,
                 "trained_tokens": trained_tokens, "skipped_steps": skipped_steps, "metrics_offset": metrics.tell(),
                 "metrics_file": _metrics_name(metrics_path, out), "run": run_key, "config": _jsonable(asdict(cfg)),
                 "spec": spec.to_dict() if spec is not None else None, "base_fingerprint": base_fingerprint,
                 "data": data}  # fmt: skip
        opt_state = dict(tree_flatten(opt.state))
        return save_checkpoint(out, Checkpoint(dict(tree_flatten(model.trainable_parameters())), opt_state, state))

    if cfg.grad_checkpoint:  # one block's graph at a time (streamed experts' slot writes stay out of it)

        def step_fn(m: nn.Module, batch: Batch, seed: int) -> tuple[mx.array, Any]:
            return loss_and_grads(m, batch, chunk=cfg.loss_chunk, seed=seed)
    else:
        step_fn = nn.value_and_grad(model, lambda m, batch, seed: batch_loss(m, batch, chunk=cfg.loss_chunk,
                                                                               checkpoint=False, seed=seed))  # fmt: skip
    result = TrainResult("completed", step, total, out, trained_tokens=trained_tokens, skipped_steps=skipped_steps,
                         changed=changed)  # fmt: skip
    mx.reset_peak_memory()
    t_start, steps_here = time.perf_counter(), 0
    model.train()
    # the custom GPU kernels (routing, decode-size experts) have no gradient: train through the
    # pure-MLX twins, as the CPU does (a process-wide switch, put back afterwards)
    kernel_mode = kernels.mode()
    kernels.set_mode("twin")
    chunks = set_attention_chunk(model, cfg.attention_chunk)
    try:
        micro_before, lr = micro, cfg.learning_rate
        try:
            while step < total:
                if cancel is not None and cancel.is_set():
                    result.status = "cancelled"
                    break
                t0 = time.perf_counter()
                step_seed = mix_seed(cfg.seed, step)
                mx.random.seed(step_seed)
                lr = cfg.lr_at(step, total)
                micro_before = micro
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
                    value = loss.item()
                    if not math.isfinite(value):
                        raise _Diverged("loss", value / batch.n_targets)
                    loss_sum += value
                    n_targets += batch.n_targets
                progress = TrainProgress("train", step + 1, total, micro / order.per_epoch, lr=lr, tokens=n_tokens)
                if grads is None:
                    skipped_steps += 1
                    progress.skipped = True
                else:
                    grads = tree_map(lambda g, n=n_targets: g / n, grads)
                    grad_norm = _global_norm(grads).item()
                    if not math.isfinite(grad_norm):
                        raise _Diverged("gradient norm", grad_norm)
                    if cfg.max_grad_norm is not None:
                        grads, _ = optim.clip_grad_norm(grads, cfg.max_grad_norm)
                    # kept until the new weights are known finite (references: the update makes new arrays anyway)
                    before = model.trainable_parameters(), tree_map(lambda x: x, opt.state)
                    opt.learning_rate = lr
                    opt.update(model, grads)
                    mx.eval(model.trainable_parameters(), opt.state)
                    grads = g = None  # not held through the next step's backward
                    if not _finite(model.trainable_parameters()):
                        model.update(before[0])
                        opt.state = before[1]
                        raise _Diverged("update", None)  # the weights it made
                    before = None
                    trained_tokens += n_targets
                    progress.loss, progress.grad_norm = loss_sum / n_targets, grad_norm
                    result.final_loss = progress.loss
                step += 1
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
        except _Diverged as d:
            micro = micro_before  # the step was not taken: its micro-batches are read again on resume
            saved = checkpoint() if step > 0 else None  # the last good state, to resume with a lower rate
            found = "" if d.value is None else f" ({d.value})"
            keep = (f"the last good state (step {step}) is saved in {saved}: resume it with a lower learning_rate"
                    if saved is not None else "nothing was trained yet: train again with a lower learning_rate")  # fmt: skip
            raise TrainingDivergedError(f"training diverged at step {step + 1}: its {d.what} is not finite{found}, so "
                                        f"it was not applied; {keep} (this step's was {lr:g})", step=step + 1,
                                        what=d.what, learning_rate=lr, checkpoint=saved) from None  # fmt: skip
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


def _save_final(model: nn.Module, spec: Any, out: Path, base_fingerprint: str) -> None:
    if spec is None:
        mx.save_safetensors(str(out / "trainable.safetensors"), dict(tree_flatten(model.trainable_parameters())))
        return
    # save_adapter replaces a whole folder, and ``out`` also holds the checkpoints and metrics:
    # write the adapter beside them, then move its files in (each atomically, the config last)
    tmp = out / ".adapter.tmp"
    save_adapter(model, spec, tmp, base_fingerprint=base_fingerprint)
    for name in (WEIGHTS, CONFIG):
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)


def _jsonable(d: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
