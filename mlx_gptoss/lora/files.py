"""Adapter folders on disk: our format's names, the checked readers (JSON, weights) and the
all-or-nothing folder writer (the converter's destination rules) that our format and the PEFT and
mlx-lm exports share."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_gptoss_convert.destination import check_no_overlap, claimed, destination, staged
from mlx_gptoss_convert.source import ConversionError

from ..safetensors_io import SafetensorsError, read_header
from .adapters import LoRAError

FORMAT, VERSION = "mlx-gptoss-lora", 1
WEIGHTS, CONFIG = "adapters.safetensors", "adapter_config.json"
FUSE_RECORD = "fused_adapter.json"  # beside a fused model's weights: which adapters it holds, and the fuse report
KINDS = {"mlx-gptoss": "an mlx-gptoss adapter", "peft": "a PEFT adapter", "mlx-lm": "an mlx-lm adapter"}
_FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_MARGIN = 1 << 20  # the config and filesystem slack beyond the tensors


def config_kind(cfg: Any) -> str | None:
    """Which tool's adapter config ``cfg`` (a parsed adapter_config.json) is: "mlx-gptoss", "peft",
    "mlx-lm", or None when it is none of them."""
    if not isinstance(cfg, dict):
        return None
    if "format" in cfg and "lora_parameters" not in cfg:  # ours (its format and version are checked when read)
        return "mlx-gptoss"
    if "peft_type" in cfg:
        return "peft"
    if "lora_parameters" in cfg or "fine_tune_type" in cfg:
        return "mlx-lm"
    return None


def write_folder(dst: str | Path, weights: str, tensors: dict[str, mx.array], metadata: dict[str, str],
                 config: dict[str, Any], *, kind: str, force: bool = False, sources: Sequence[str | Path] = (),
                 force_name: str = "force=True") -> Path:  # fmt: skip
    """An adapter folder (``weights`` + ``adapter_config.json``) of ``kind`` written whole or not at
    all, with the converter's destination rules (:mod:`mlx_gptoss_convert.destination`).

    ``dst`` never overlaps a folder of ``sources``. An existing ``dst`` is refused unless ``force``
    (spelled ``force_name`` in the message), and even then only an empty folder or an adapter
    folder of the same ``kind`` holding nothing but its two files is replaced: a training run's
    checkpoints, a PEFT folder's README or anything else is never deleted. The folder is built in a
    hidden sibling under ``dst``'s lock, synced and renamed into place; on any error nothing is
    left at or beside ``dst``. Returns ``dst`` (absolute).
    """
    given = dst
    if Path(dst).expanduser().resolve() == Path("/"):
        raise LoRAError(f"{given}: cannot write an adapter into the filesystem root; give a new folder name")
    text = json.dumps(config, indent=2)  # before any file is written: a bad ``extra`` fails here
    need = sum(v.nbytes for v in tensors.values()) + _MARGIN
    try:
        dst = destination(given)
        check_no_overlap([Path(s).expanduser() for s in sources], dst)
        taken = f"{given}: already exists (use {force_name} to replace an earlier export of this kind)"
        if (dst.exists() or dst.is_symlink()) and not force:
            raise LoRAError(taken)
        if dst.exists() or dst.is_symlink():
            _check_replaceable(dst, weights, kind, force_name)

        def recheck() -> None:  # another writer may have finished meanwhile
            if not force:
                raise LoRAError(taken)
            _check_replaceable(dst, weights, kind, force_name)

        with claimed(dst, need, recheck, "adapter export"), staged(dst) as tmp:
            mx.save_safetensors(str(tmp / weights), tensors, metadata=metadata)
            (tmp / CONFIG).write_text(text + "\n")
    except ConversionError as e:  # the destination rules' refusals, as this package's error
        raise LoRAError(str(e)) from None
    return dst


def _check_replaceable(dst: Path, weights: str, kind: str, force_name: str) -> None:
    """Refuse to let ``force`` replace anything but an empty folder or an adapter of ``kind`` with nothing added."""
    how = f"{force_name} replaces only an empty folder or {KINDS[kind]} folder holding just {CONFIG} and {weights}"
    if dst.is_symlink() or not dst.is_dir():
        what = "a symbolic link" if dst.is_symlink() else "not a folder"
        raise LoRAError(f"{dst}: exists and is {what}; {how} — remove it yourself or choose another destination")
    cwd = Path.cwd().resolve()
    if cwd == dst.resolve() or dst.resolve() in cwd.parents:
        raise LoRAError(f"{dst}: is (or holds) the current directory; {how} — give a new folder")
    entries = list(dst.iterdir())
    if not entries:
        return
    try:
        found = config_kind(json.loads((dst / CONFIG).read_text()))
    except (OSError, ValueError):
        found = None
    extra = sorted(p.name for p in entries if p.is_symlink() or not p.is_file() or p.name not in (CONFIG, weights))
    listed = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
    if found is None:
        raise LoRAError(f"{dst}: exists and is not an adapter folder (it holds {listed}); {how} — remove it yourself or "
                        "choose another destination")  # fmt: skip
    if found != kind:
        raise LoRAError(f"{dst}: holds {KINDS[found]}{f' and {listed}' if extra else ''}, not an earlier export of "
                        f"{KINDS[kind]}; {how} — choose another destination")  # fmt: skip
    if extra:
        raise LoRAError(
            f"{dst}: holds {listed} besides the adapter; {force_name} would delete them — move them out first, "
            "or choose another destination"
        )


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
