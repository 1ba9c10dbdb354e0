"""Adapter folders on disk: our format's names, the checked readers (JSON, weights) and the
all-or-nothing folder writer that our format and PEFT's export share."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..safetensors_io import SafetensorsError, fsync_dir, read_header
from .adapters import LoRAError

FORMAT, VERSION = "mlx-gptoss-lora", 1
WEIGHTS, CONFIG = "adapters.safetensors", "adapter_config.json"
_FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def write_folder(dst: Path, weights: str, tensors: dict[str, mx.array], metadata: dict[str, str],
                 config: dict[str, Any]) -> Path:  # fmt: skip
    """An adapter folder (``weights`` + ``adapter_config.json``) written whole or not at all: built
    beside ``dst``, synced, then renamed into place; an existing adapter folder at ``dst`` is
    replaced, any other non-empty folder refused. Returns ``dst``."""
    if dst.exists() and any(dst.iterdir()) and not (dst / CONFIG).is_file():
        raise LoRAError(f"{dst}: exists and is not an adapter folder; choose another destination")
    text = json.dumps(config, indent=2)  # before any file is written: a bad ``extra`` fails here
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        mx.save_safetensors(str(tmp / weights), tensors, metadata=metadata)
        (tmp / CONFIG).write_text(text + "\n")
        for f in (weights, CONFIG):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if dst.exists():
            old = dst.with_name(tmp.name + ".old")
            os.rename(dst, old)
        os.rename(tmp, dst)
        fsync_dir(dst.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def read_json(path: Path, missing: str) -> Any:
    """The JSON value in ``path``; a LoRAError naming it when it is absent (saying ``missing``) or not JSON."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LoRAError(f"{path}: not found; {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoRAError(f"{path}: not valid JSON ({e})") from None


def read_adapter_config(src: str | Path) -> dict[str, Any]:
    """The checked ``adapter_config.json`` of our format in folder ``src``."""
    path = Path(src) / CONFIG
    cfg = read_json(path, f"{src} is not an mlx-gptoss adapter folder")
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise LoRAError(f"{path}: field 'format' must be {FORMAT!r}")
    if cfg.get("version") != VERSION:
        raise LoRAError(f"{path}: field 'version' is {cfg.get('version')!r}; this mlx-gptoss reads version {VERSION}")
    fp = cfg.get("base_model")
    if not isinstance(fp, dict) or not isinstance(fp.get("fingerprint"), str):
        raise LoRAError(f"{path}: field 'base_model.fingerprint' is missing")
    return cfg


def read_weights(path: Path) -> dict[str, mx.array]:
    """Every tensor of the adapter weights file ``path``, checked: header, float dtypes, finite values."""
    try:
        infos, _ = read_header(path)
        with open(path, "rb") as fh:
            raw = {name: (info, info.read_numpy(fh)) for name, info in infos.items() if info.dtype in _FLOAT_DTYPES}
    except SafetensorsError as e:
        raise LoRAError(str(e)) from None
    bad = [n for n, i in infos.items() if i.dtype not in _FLOAT_DTYPES]
    if bad:
        raise LoRAError(f"{path}: tensor {bad[0]!r} has dtype {infos[bad[0]].dtype}, expected F32, F16 or BF16")
    out = {}
    for name, (info, arr) in raw.items():
        a = mx.array(arr)
        a = a.view(mx.bfloat16) if info.dtype == "BF16" else a
        if not mx.all(mx.isfinite(a)).item():
            raise LoRAError(f"{path}: tensor {name!r} holds NaN or infinite values")
        out[name] = a
    return out
