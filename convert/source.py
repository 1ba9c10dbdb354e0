"""Opening a released checkpoint: its files, tensor headers, layout and config — no tensor data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlx_gptoss.config import ConfigError, GptOssConfig, read_json
from mlx_gptoss.safetensors_io import SafetensorsError, TensorInfo, read_header, read_index

from .layout import LAYOUTS, ORIGINAL, detect_layout, original_config_to_hf

INDEX = "model.safetensors.index.json"


class ConversionError(ValueError):
    """The source checkpoint cannot be converted; the message names the file, key and problem."""


@dataclass
class Release:
    """A source checkpoint, opened: where its tensors are, which layout, which config."""

    root: Path
    layout: str
    config: GptOssConfig
    raw_config: dict
    tensors: dict[str, TensorInfo]
    tokenizer_dir: Path | None

    def tensor(self, name: str, needed_for: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ConversionError(
                f"{self.root}: tensor {name!r} not found (needed for {needed_for!r}; "
                f"{self.layout} layout, {len(self.tensors)} tensors in {len(self.files)} file(s))"
            ) from None

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})


def _has_weights(d: Path) -> bool:
    return (d / "config.json").is_file() and (any(d.glob("*.safetensors")) or (d / INDEX).is_file())


def _weights_dir(src: Path, layout: str | None) -> Path:
    if not src.exists():
        raise ConversionError(f"{src}: no such directory")
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory (give the checkpoint's folder)")
    if layout == ORIGINAL and _has_weights(src / "original"):
        return src / "original"
    if _has_weights(src):
        return src
    if _has_weights(src / "original"):
        return src / "original"
    raise ConversionError(f"{src}: no config.json with *.safetensors here or in {src / 'original'}")


def _shard_files(root: Path) -> tuple[list[Path], dict[str, str] | None]:
    index = root / INDEX
    if not index.is_file():
        return sorted(root.glob("*.safetensors")), None
    try:
        weight_map = read_index(index)
    except SafetensorsError as e:
        raise ConversionError(str(e)) from None
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        n = sum(1 for v in weight_map.values() if v in missing)
        raise ConversionError(
            f"{root}: missing shard(s) {', '.join(missing)} — listed in {INDEX} for {n} tensor(s); "
            "re-download the checkpoint"
        )
    return [root / f for f in files], weight_map


def open_release(src: str | Path, layout: str | None = None) -> Release:
    """Read the headers and config of a released checkpoint folder and check they agree."""
    if layout is not None and layout not in LAYOUTS:
        raise ConversionError(f"unknown source layout {layout!r} (one of {', '.join(LAYOUTS)})")
    src = Path(src)
    root = _weights_dir(src, layout)
    files, weight_map = _shard_files(root)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        try:
            header, _ = read_header(f)
        except SafetensorsError as e:
            raise ConversionError(str(e)) from None
        for name, info in header.items():
            if name in tensors:
                raise ConversionError(f"{f}: tensor {name!r} also appears in {tensors[name].file.name}")
            tensors[name] = info
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in tensors or tensors[name].file.name != fname:
                raise ConversionError(f"{root / INDEX}: lists {name!r} in {fname}, but that file does not hold it")
    found = detect_layout(set(tensors))
    if found is None:
        raise ConversionError(f"{root}: no gpt-oss tensors recognised (looked for experts and embeddings)")
    if layout is not None and layout != found:
        raise ConversionError(f"{root}: tensors are in the {found} layout, not {layout}")
    cfg_path = root / "config.json"
    try:
        raw = read_json(cfg_path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{cfg_path}: must be a JSON object, found {type(raw).__name__}")
        hf_style = original_config_to_hf(raw) if found == ORIGINAL else raw
        config = GptOssConfig.from_dict(hf_style, source=str(cfg_path))
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    # The release keeps its tokenizer beside original/; any other parent folder is not the release's.
    dirs = (root, root.parent) if found == ORIGINAL and root.name == "original" else (root,)
    tok = next((d for d in dirs if (d / "tokenizer.json").is_file()), None)
    return Release(root, found, config, raw, tensors, tok)
