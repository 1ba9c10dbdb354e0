"""Resumable training checkpoints, written atomically.

Layout under the run's output folder::

    checkpoints/step-000040/{trainable.safetensors, optimizer.safetensors, state.json}
    checkpoints/latest.json      # {"dir": "step-000040"}: the only checkpoint a resume reads

A checkpoint is written into a temporary folder (files fsynced), renamed into place with
``os.replace``, and only then does ``latest.json`` (itself replaced atomically) point to it, so a
process killed at any instant leaves either the previous checkpoint or the new one, never half of
one. Older checkpoint folders are removed after the pointer moves.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"


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
    """The folder ``latest.json`` points to, or None when no checkpoint was completed."""
    root = Path(out_dir) / CHECKPOINTS
    try:
        name = json.loads((root / LATEST).read_text())["dir"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{root / LATEST}: unreadable checkpoint pointer ({e})") from None
    path = root / name
    if not path.is_dir():
        raise CheckpointError(f"{root / LATEST}: points to {name}, which does not exist")
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint`."""
    file = path / "state.json"
    try:
        state = json.loads(file.read_text())
        file = path / "trainable.safetensors"
        trainable = mx.load(str(file))
        file = path / "optimizer.safetensors"
        optimizer = mx.load(str(file))
    except (OSError, ValueError, RuntimeError) as e:  # name the file: the user must know which one is damaged
        raise CheckpointError(f"{file}: unreadable checkpoint file ({e})") from None
    return Checkpoint(trainable, optimizer, state)


def resume_state(out_dir: Path) -> dict[str, Any]:
    """``state.json`` of the latest checkpoint in ``out_dir`` (the run's options and adapter spec)."""
    path = latest_checkpoint(out_dir)
    if path is None:
        raise CheckpointError(f"{out_dir}: no checkpoint to resume from")
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'state.json'}: unreadable checkpoint file ({e})") from None
