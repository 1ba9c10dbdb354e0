"""A converted model folder on disk: its format, its config, its shard files and their tensor headers.

What the converter writes and the loader, the memory planner, the exporter and the model manager
read, so each reads it the same way (headers only, no tensor data).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import GptOssConfig, read_json
from .safetensors_io import SafetensorsError, TensorInfo, read_header, read_index

FORMAT_NAME = "mlx-gptoss"
FORMAT_VERSION = 1
INDEX = "model.safetensors.index.json"


class LoadError(ValueError):
    """A model folder that is not a valid converted checkpoint; the message names file and key."""


def check_format(path: Path, raw: Any) -> None:
    """Refuse a config.json that is not one written by our converter (a release, a future format)."""
    cfg = path / "config.json"
    if not isinstance(raw, dict):
        raise LoadError(f"{cfg}: expected a JSON object, found {type(raw).__name__}")
    fmt = raw.get("mlx_gptoss")
    if not isinstance(fmt, dict) or fmt.get("format") != FORMAT_NAME:
        hint = ""
        released = ("quantization_config", "experts_per_token", "num_experts")  # HF release, original/ config
        if any(k in raw for k in released) or raw.get("model_type") == "gpt_oss" or (path / "original").is_dir():
            hint = f": this is a released checkpoint, not a converted one: convert it first (mlx-gptoss convert {path} DST)"
        raise LoadError(f"{cfg}: not an mlx-gptoss checkpoint{hint}")
    if fmt.get("format_version") != FORMAT_VERSION:
        raise LoadError(
            f"{cfg}: format version {fmt.get('format_version')} is not the supported "
            f"{FORMAT_VERSION}; re-convert it with this version of mlx-gptoss"
        )


def read_config(path: Path) -> GptOssConfig:
    """A converted folder's config, checked (a release or another format is refused)."""
    raw = read_json(path / "config.json")
    check_format(path, raw)
    return GptOssConfig.from_dict(raw, source=str(path / "config.json"))


def shard_files(path: Path) -> list[Path]:
    """The shard files of a converted checkpoint: those its index lists, else every *.safetensors."""
    index = path / INDEX
    if index.is_file():
        try:
            names = sorted(set(read_index(index).values()))
        except SafetensorsError as e:
            raise LoadError(str(e)) from None
        files = [path / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise LoadError(f"{path}: missing shard(s) {', '.join(missing)} listed in {INDEX}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LoadError(f"{path}: no *.safetensors files")
    return files


def read_tensors(path: Path) -> dict[str, TensorInfo]:
    """Headers of every shard of a converted checkpoint (the shards its index lists, as the loader reads)."""
    out: dict[str, TensorInfo] = {}
    for f in shard_files(Path(path)):
        try:
            out.update(read_header(f)[0])
        except SafetensorsError as e:
            raise LoadError(str(e)) from None
    return out
