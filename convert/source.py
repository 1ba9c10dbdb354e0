"""Opening a released checkpoint: its files, tensor headers, layout and config — no tensor data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mlx_gptoss.config import ConfigError, GptOssConfig, read_json
from mlx_gptoss.safetensors_io import SafetensorsError, TensorInfo, read_header, read_index

from .layout import FORMAT_NAME, HF_DENSE, HF_DENSE_T, LAYOUTS, MLXLM, ORIGINAL, detect_layout, original_config_to_hf
from .mlxlm import PREFIX, read_quantization

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
            f"{root}: missing shard(s) {', '.join(missing)} — listed in {INDEX} for {n} tensor(s); re-download the checkpoint"
        )
    stray = sorted(p.name for p in root.glob("*.safetensors") if p.name not in files)
    if stray:  # mlx-lm would load it too: a half-converted folder, or two checkpoints in one
        raise ConversionError(f"{root}: {', '.join(stray)} is not listed in {INDEX} (a half-converted or mixed folder?); "
                              "remove it, or give a folder holding one checkpoint")  # fmt: skip
    return [root / f for f in files], weight_map


def read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    """Every tensor of ``files`` by name (headers only); a bad header, or a name in two files, is refused."""
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
    return tensors


def open_release(src: str | Path, layout: str | None = None) -> Release:
    """Read the headers and config of a released checkpoint folder and check they agree."""
    if layout is not None and layout not in LAYOUTS:
        raise ConversionError(f"unknown source layout {layout!r} (one of {', '.join(LAYOUTS)})")
    src = Path(src)
    root = _weights_dir(src, layout)
    files, weight_map = _shard_files(root)
    tensors = read_headers(files)
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in tensors or tensors[name].file.name != fname:
                raise ConversionError(f"{root / INDEX}: lists {name!r} in {fname}, but that file does not hold it")
    cfg_path = root / "config.json"
    tensors = _strip_prefix(tensors, root)
    found = _detect(tensors, root, cfg_path)
    try:
        raw = read_json(cfg_path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{cfg_path}: must be a JSON object, found {type(raw).__name__}")
        if isinstance(raw.get("text_config"), dict) and "num_hidden_layers" not in raw:  # mlx-vlm nests it
            raw = {**raw["text_config"], **{k: raw[k] for k in ("quantization", "quantization_config") if k in raw}}
        hf_style = original_config_to_hf(raw) if found == ORIGINAL else raw
        if found == MLXLM:  # its quantization block is per path; ours is per component (read below)
            hf_style = {k: v for k, v in raw.items() if k not in ("quantization", "quantization_config")}
        config = GptOssConfig.from_dict(hf_style, source=str(cfg_path))
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    if found == MLXLM:
        try:
            quant = read_quantization(raw, tensors, config.num_hidden_layers, str(cfg_path))
        except ValueError as e:
            raise ConversionError(str(e)) from None
        config = dataclasses.replace(config, quantization=tuple(sorted(quant.items())))
    if found == HF_DENSE:
        found = _dense_orientation(tensors, config, layout)
    if layout is not None and layout != found:
        raise ConversionError(f"{root}: tensors are in the {found} layout, not {layout}")
    # The release keeps its tokenizer beside original/; any other parent folder is not the release's.
    dirs = (root, root.parent) if found == ORIGINAL and root.name == "original" else (root,)
    tok = next((d for d in dirs if (d / "tokenizer.json").is_file()), None)
    return Release(root, found, config, raw, tensors, tok)


def _strip_prefix(tensors: dict[str, TensorInfo], root: Path) -> dict[str, TensorInfo]:
    """mlx-vlm's ``language_model.`` prefix dropped from every name (all or none must carry it)."""
    with_prefix = [n for n in tensors if n.startswith(PREFIX)]
    if not with_prefix:
        return tensors
    without = next((n for n in tensors if not n.startswith(PREFIX)), None)
    if without is not None:
        raise ConversionError(f"{root}: {with_prefix[0]!r} carries mlx-vlm's {PREFIX!r} prefix but {without!r} does not "
                              "(a mixed folder?); give a folder of one checkpoint")  # fmt: skip
    return {n[len(PREFIX) :]: dataclasses.replace(t, name=n[len(PREFIX) :]) for n, t in tensors.items()}


def _detect(tensors: dict[str, TensorInfo], root: Path, cfg_path: Path) -> str:
    """The layout of the tensor names; a mix of layouts, or one of ours, is refused by name."""
    seen: dict[str, str] = {}
    for name in tensors:
        lay = detect_layout({name})
        if lay is not None:
            seen.setdefault(lay, name)
    if len(seen) > 1:
        shown = "; ".join(f"{lay}: {name!r}" for lay, name in seen.items())
        raise ConversionError(f"{root}: tensors of several layouts in one folder ({shown}) — a half-converted or mixed "
                              "folder? Give a folder holding one checkpoint")  # fmt: skip
    if seen:
        return next(iter(seen))
    try:
        ours = read_json(cfg_path).get("mlx_gptoss", {}).get("format") == FORMAT_NAME
    except (ConfigError, AttributeError):
        ours = False
    if ours:
        raise ConversionError(f"{root}: already an mlx-gptoss conversion; use it as it is (e.g. --model {root})")
    raise ConversionError(f"{root}: no gpt-oss tensors recognised (looked for experts and embeddings)")


def _dense_orientation(tensors: dict[str, TensorInfo], config: GptOssConfig, layout: str | None) -> str:
    """hf-dense ([E, in, out], transformers) or hf-dense-t ([E, out, in]), told by gate_up_proj's shape."""
    H, I2 = config.hidden_size, 2 * config.intermediate_size
    info = next((t for n, t in sorted(tensors.items()) if n.endswith("mlp.experts.gate_up_proj")), None)
    if info is None or len(info.shape) != 3:
        return HF_DENSE  # the plan names the tensor and the shape it needs
    if layout in (HF_DENSE, HF_DENSE_T):
        return layout
    if H == I2 and info.shape[1:] == (H, H):
        raise ConversionError(
            f"{info.file}: {info.name!r} is {list(info.shape)} and hidden_size = 2 x intermediate_size, so it cannot "
            f"tell [E, in, out] from [E, out, in]: give --layout {HF_DENSE} (transformers' [E, in, out]) or "
            f"--layout {HF_DENSE_T} ([E, out, in])"
        )
    return HF_DENSE_T if info.shape[1:] == (I2, H) else HF_DENSE
