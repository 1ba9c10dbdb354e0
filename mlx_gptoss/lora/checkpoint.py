"""Resumable training checkpoints, written atomically.

Layout under the run's output folder::

    checkpoints/step-000040/{trainable.safetensors, optimizer.safetensors, state.json}
    checkpoints/latest.json      # {"dir": "step-000040"}: the only checkpoint a resume reads

``latest.json`` names a ``step-NNNNNN`` folder of this run's ``checkpoints/``, nothing else (a
path elsewhere, hand-edited or not, is refused), and ``state.json`` is checked field by field
(:func:`check_state`) before a resume uses it: types, ranges, and that the counters agree.

A checkpoint is written into a temporary folder (files fsynced), renamed into place with
``os.replace``, and only then does ``latest.json`` (itself replaced atomically) point to it, so a
process killed at any instant leaves either the previous checkpoint or the new one, never half of
one. Older checkpoint folders are removed after the pointer moves.
"""

from __future__ import annotations

import json
import numbers
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
STATE_VERSION = 2  # 2: the base model's and the data's fingerprints, the total steps, the metrics file
_NAME = re.compile(r"step-\d{6,}")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or belongs to a different run."""


@dataclass
class Checkpoint:
    """What a resume needs: the trainable weights, the optimizer state (flat) and ``state.json``."""

    trainable: dict[str, mx.array]
    optimizer: dict[str, mx.array]
    state: dict[str, Any]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(out_dir: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically under ``out_dir/checkpoints``; returns its folder."""
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{int(ckpt.state['step']):06d}"
    tmp = root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    mx.save_safetensors(str(tmp / "trainable.safetensors"), ckpt.trainable)
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), ckpt.optimizer)
    (tmp / "state.json").write_text(json.dumps(ckpt.state, indent=1))
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    final = root / name
    if final.exists():  # a re-save of the same step (e.g. cancel right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp-{os.getpid()}"
    pointer.write_text(json.dumps({"dir": name}))
    _fsync_file(pointer)
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    for old in root.iterdir():
        if old.is_dir() and old.name != name and old.name.startswith("step-"):
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The folder ``latest.json`` points to, or None when no checkpoint was completed.

    Raises :class:`CheckpointError` when the pointer is unreadable or names anything but an
    existing ``step-NNNNNN`` folder of ``out_dir/checkpoints`` (another run's, a path, ``..``).
    """
    root = Path(out_dir) / CHECKPOINTS
    try:
        name = json.loads((root / LATEST).read_text())["dir"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{root / LATEST}: unreadable checkpoint pointer ({e})") from None
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CheckpointError(f"{root / LATEST}: points to {name!r}, which is not a checkpoint of this run "
                              f"(a step-NNNNNN folder in {root})")  # fmt: skip
    path = root / name
    if path.is_symlink() or not path.is_dir():
        raise CheckpointError(f"{root / LATEST}: points to {name}, which does not exist (or is a link)")
    return path


def _check(ok: bool, file: Path, name: str, value: Any, want: str) -> None:
    if not ok:
        raise CheckpointError(f"{file}: field {name}: must be {want}, found {value!r} (a damaged or hand-edited "
                              "checkpoint: resume from an intact one, or train into another folder)")  # fmt: skip


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_state(state: Any, file: Path) -> dict[str, Any]:
    """``state`` (a checkpoint's ``state.json``, read from ``file``) if its fields are sound, else
    :class:`CheckpointError` naming the file and the field: every counter a non-negative integer,
    ``step <= total_steps``, ``step <= micro <= step * grad_accumulation`` (each step reads one to
    ``grad_accumulation`` micro-batches), the fingerprints strings, the sections objects."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: must hold a JSON object, found {type(state).__name__}")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{file}: field version: {state.get('version')!r}, not {STATE_VERSION}: the checkpoint "
                              "was written by another mlx-gptoss version (without the base model's and the data's "
                              "fingerprints a resume cannot be checked); train into a new folder")  # fmt: skip
    for name in ("step", "micro", "trained_tokens", "skipped_steps", "metrics_offset"):
        _check(_is_int(state.get(name)) and state[name] >= 0, file, name, state.get(name), "an integer >= 0")
    _check(_is_int(state.get("total_steps")) and state["total_steps"] >= 1, file, "total_steps", state.get("total_steps"),
           "an integer >= 1")  # fmt: skip
    run = state.get("run")
    _check(isinstance(run, dict), file, "run", run, "an object")
    _check(_is_int(run.get("seed")) and run["seed"] >= 0, file, "run.seed", run.get("seed"), "an integer >= 0")
    for name in ("batch_size", "grad_accumulation", "n_train"):
        _check(_is_int(run.get(name)) and run[name] >= 1, file, f"run.{name}", run.get(name), "an integer >= 1")
    step = state["step"]
    _check(step <= state["total_steps"], file, "step", step, f"at most total_steps ({state['total_steps']})")
    _check(step <= state["micro"] <= step * run["grad_accumulation"], file, "micro", state["micro"],
           f"between step and step x grad_accumulation ({step}..{step * run['grad_accumulation']})")  # fmt: skip
    _check(state["skipped_steps"] <= step, file, "skipped_steps", state["skipped_steps"], f"at most step ({step})")
    for name in ("config", "data"):
        _check(isinstance(state.get(name), dict), file, name, state.get(name), "an object")
    _check(state.get("spec") is None or isinstance(state["spec"], dict), file, "spec", state.get("spec"), "an object or null")
    fp = state.get("base_fingerprint")
    _check(isinstance(fp, str) and fp.startswith("sha256:"), file, "base_fingerprint", fp, 'a string "sha256:..."')
    fp = state["data"].get("train")
    _check(isinstance(fp, str) and fp.startswith("sha256:"), file, "data.train", fp, 'a string "sha256:..."')
    for name in ("train_sha256", "valid", "train_on", "overflow"):
        v = state["data"].get(name)
        _check(v is None or isinstance(v, str), file, f"data.{name}", v, "a string or null")
    _check(isinstance(state.get("metrics_file"), str) and state["metrics_file"], file, "metrics_file",
           state.get("metrics_file"), "a file name")  # fmt: skip
    return state


def _read_state(path: Path) -> dict[str, Any]:
    file = path / "state.json"
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as e:  # name the file: the user must know which one is damaged
        raise CheckpointError(f"{file}: unreadable checkpoint file ({e})") from None
    return check_state(state, file)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint` (its ``state.json`` checked by :func:`check_state`)."""
    state = _read_state(path)
    try:
        file = path / "trainable.safetensors"
        trainable = mx.load(str(file))
        file = path / "optimizer.safetensors"
        optimizer = mx.load(str(file))
    except (OSError, ValueError, RuntimeError) as e:  # name the file: the user must know which one is damaged
        raise CheckpointError(f"{file}: unreadable checkpoint file ({e})") from None
    return Checkpoint(trainable, optimizer, state)


def resume_state(out_dir: Path) -> dict[str, Any]:
    """``state.json`` of the latest checkpoint in ``out_dir`` (the run's options and adapter spec), checked."""
    path = latest_checkpoint(out_dir)
    if path is None:
        raise CheckpointError(f"{out_dir}: no checkpoint to resume from")
    return _read_state(path)
