"""Our checkpoint -> the released Hugging Face layout (``hf``) or mlx-lm's gpt_oss layout (``mlx-lm``).

Both are convert/layout.py's one table read backwards (``source_keys``). Every op the converter
applies has an exact inverse — copy, split the stacked q/k/v rows, U32 codes back to U8 blocks,
de-interleave gate/up rows — so every tensor leaves with its bytes unchanged: MXFP4 experts stay
bit-exact in both layouts, and so do layers held quantized (affine or mxfp8) in mlx-lm's layout.
The release holds attention, router, embedding and lm_head in bf16: an ``hf`` export of a model
holding them quantized is refused unless ``dequantize`` is asked for.

Files: ``hf`` names its shards as the release does (``model-00000-of-0000N``, N the last index)
and orders each file's tensors as the ``safetensors`` library does (dtype, then name) with its
``{"format": "pt"}`` metadata; ``mlx-lm`` writes mlx-lm's names (``model.safetensors`` or
``model-00001-of-0000N``). Both carry ``mlx_gptoss_export.json`` (what was exported, from where),
which lets ``force`` replace an earlier export. The same safety as ``convert``: checked before a
byte is written, written into a hidden sibling folder and renamed into place when complete.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from mlx_gptoss.config import ConfigError, GptOssConfig, QuantSpec, read_json
from mlx_gptoss.converted import LoadError, check_format, shard_files
from mlx_gptoss.safetensors_io import (
    NUMPY_DTYPE,
    SafetensorsWriter,
    TensorInfo,
    split_into_shards,  # fmt: skip
    tensor_nbytes,
)
from mlx_gptoss.version import __version__

from .convert import DEFAULT_SHARD_BYTES, TOKENIZER_FILES, _expected_params, is_output
from .destination import SPACE_MARGIN, check_no_overlap, check_replaceable, claimed, destination, staged
from .layout import BLOCKS, CONCAT, COPY, HF, INTERLEAVE, MLXLM, MLXLM_MODULES, quantizable, source_keys
from .release import hf_config_dict
from .source import INDEX, ConversionError, read_headers

FORMATS = (HF, MLXLM)
MARKER = "mlx_gptoss_export.json"
# The safetensors library writes a file's tensors by dtype (its Dtype enum, larger first), then by name.
_DTYPE_RANK = {"U8": 0, "U32": 1, "F16": 2, "BF16": 3, "F32": 4}
_SHARD = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
_MXFP4 = {"group_size": 32, "bits": 4, "mode": "mxfp4"}


@dataclass
class Piece:
    """One output tensor: its name, dtype and shape, and which bytes of one of our tensors it is."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    src: TensorInfo
    rows: tuple[int, int] | None = None  # a range of the source's first axis (q, k, v of the stacked qkv)
    parity: int | None = None  # every other row of axis 1 from this one (gate 0, up 1)
    quant: tuple[TensorInfo, TensorInfo | None, QuantSpec] | None = None  # dequantize with (scales, biases, spec)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


@dataclass
class Model:
    """A converted checkpoint, opened: folder, config (parsed and as written), tensors in parameter order."""

    root: Path
    config: GptOssConfig
    raw: dict
    tensors: dict[str, TensorInfo]


def open_model(model: str | Path) -> Model:
    """Open one of our checkpoints (a folder; the CLI resolves repo ids first) and check its tensors against its config.json."""
    root = Path(model).expanduser()
    try:
        if not (root / "config.json").is_file():
            raise LoadError(f"{model}: " + ("no config.json" if root.is_dir() else "no such folder"))
        raw = read_json(root / "config.json")
        check_format(root, raw)
        config = GptOssConfig.from_dict(raw, source=str(root / "config.json"))
        files = shard_files(root)
    except (LoadError, ConfigError) as e:
        raise ConversionError(str(e)) from None
    found = read_headers(files)
    expected = _expected_params(config)
    for name, info in found.items():
        if name not in expected:
            raise ConversionError(f"{info.file}: unexpected tensor {name!r} (does config.json match the weights?)")
        shape, kind = expected[name]
        if info.shape != shape or (kind != "float" and info.dtype != kind):
            raise ConversionError(
                f"{info.file}: tensor {name!r} is {info.dtype} {list(info.shape)}, expected {kind} {list(shape)}"
            )
    missing = [k for k in expected if k not in found]
    if missing:
        raise ConversionError(
            f"{root}: missing tensor(s) {', '.join(missing[:3])}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        )
    return Model(root, config, raw, {k: found[k] for k in expected})


def _row_splits(config: GptOssConfig, n: int, rows: int, what: str) -> list[tuple[int, int]]:
    """The row ranges of the n stacked sources (only q, k, v are stacked)."""
    Q, KV = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    if n != 3 or rows != Q + 2 * KV:
        raise ConversionError(f"{what}: {rows} stacked rows cannot be split into q, k, v of {Q}, {KV}, {KV}")
    return [(0, Q), (Q, Q + KV), (Q + KV, Q + 2 * KV)]


def plan_export(m: Model, fmt: str, dequantize: bool = False) -> list[Piece]:
    """Every output tensor of exporting ``m`` to ``fmt``, in our parameter order.

    Raises ConversionError when the export cannot be exact (quantized non-expert layers to ``hf``
    without ``dequantize``).
    """
    if fmt == HF and m.config.quantization and not dequantize:
        held = ", ".join(f"{c} ({q})" for c, q in m.config.quantization)
        raise ConversionError(
            f"{m.root}: holds {held} quantized, and the release holds them in bf16, so an hf export cannot be "
            "exact — pass --dequantize to write them dequantized to bf16, or export --format mlx-lm (which keeps them as they are)"
        )
    out: list[Piece] = []
    for ours, info in m.tensors.items():
        module, _, leaf = ours.rpartition(".")
        comp = quantizable(ours)
        spec = m.config.quant(comp) if comp else None
        if spec is not None and fmt == HF:
            if leaf != "weight":
                continue  # scales and biases go into the dequantized weight
            names, op = source_keys(module + ".weight", HF)
            cols = info.shape[1] * 32 // spec.bits
            q = (m.tensors[module + ".scales"], m.tensors.get(module + ".biases"), spec)
            ranges = _row_splits(m.config, len(names), info.shape[0], ours) if op == CONCAT else [None]
            out += [
                Piece(n, "BF16", ((r[1] - r[0]) if r else info.shape[0], cols), info, r, quant=q) for n, r in zip(names, ranges)
            ]
            continue
        found = source_keys(ours, fmt)
        if found is None:
            raise ConversionError(f"{info.file}: tensor {ours!r} has no place in the {fmt} layout")
        names, op = found
        if op == COPY:
            out.append(Piece(names[0], info.dtype, info.shape, info))
        elif op == BLOCKS:  # our U32 words are the released U8 blocks, read 4 at a time
            out.append(Piece(names[0], "U8", (*info.shape[:-1], info.shape[-1] // 4, 16), info))
        elif op == CONCAT:
            for n, (a, b) in zip(names, _row_splits(m.config, len(names), info.shape[0], ours)):
                out.append(Piece(n, info.dtype, (b - a, *info.shape[1:]), info, rows=(a, b)))
        elif op == INTERLEAVE:
            E, rows, *rest = info.shape
            out += [Piece(n, info.dtype, (E, rows // 2, *rest), info, parity=k) for k, n in enumerate(names)]
        else:
            raise ConversionError(f"{ours!r}: the {fmt} layout makes it with {op!r}, which has no exact inverse")
    return out


def _read(fh: BinaryIO, info: TensorInfo, offset: int, n: int) -> bytes:
    fh.seek(info.begin + offset)
    data = fh.read(n)
    if len(data) != n:
        raise ConversionError(f"{info.file}: truncated while reading tensor {info.name!r}")
    return data


def _rows_array(info: TensorInfo, fh: BinaryIO, r: int, n: int):
    """Rows r..r+n of a 2-D tensor as an MLX array of its dtype."""
    row = info.nbytes // info.shape[0]
    a = mx.array(np.frombuffer(_read(fh, info, r * row, n * row), dtype=NUMPY_DTYPE[info.dtype]).reshape(n, -1))
    return a.view(mx.bfloat16) if info.dtype == "BF16" else a


def _chunks(p: Piece, fh: Callable[[TensorInfo], BinaryIO], max_bytes: int = 64 << 20) -> Iterable[bytes | np.ndarray]:
    """The bytes of one output tensor, a bounded chunk at a time."""
    info = p.src
    if p.quant is not None:
        scales, biases, spec = p.quant
        a, z = p.rows or (0, info.shape[0])
        step = max(1, max_bytes // (4 * p.shape[1]))
        for r in range(a, z, step):
            n = min(step, z - r)
            b = _rows_array(biases, fh(biases), r, n) if biases is not None else None
            w = mx.dequantize(_rows_array(info, fh(info), r, n), _rows_array(scales, fh(scales), r, n), b,
                              group_size=spec.group_size, bits=spec.bits, mode=spec.mode, dtype=mx.bfloat16)  # fmt: skip
            yield np.array(w.view(mx.uint16))
        return
    f = fh(info)
    if p.parity is not None:
        per = info.nbytes // info.shape[0]
        for e in range(info.shape[0]):
            block = np.frombuffer(_read(f, info, e * per, per), dtype=np.uint8).reshape(info.shape[1], -1)
            yield np.ascontiguousarray(block[p.parity :: 2])
        return
    row = info.nbytes // info.shape[0]
    a, z = p.rows or (0, info.shape[0])
    for off in range(a * row, z * row, max_bytes):
        yield _read(f, info, off, min(max_bytes, z * row - off))


def _file_names(fmt: str, n: int) -> list[str]:
    if fmt == HF:  # the release counts from 0 and names the last index: model-00000-of-00002 .. 00002-of-00002
        return [f"model-{i:05d}-of-{n - 1:05d}.safetensors" for i in range(n)]
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def release_config(config: GptOssConfig) -> dict:
    """config.json as the release writes it, for this model (the mxfp4 ``quantization_config`` included)."""
    d = hf_config_dict(config)
    eos = config.eos_token_id
    d["eos_token_id"] = list(eos) if isinstance(eos, tuple) else eos
    d["pad_token_id"] = config.pad_token_id
    if config.rope_scaling is None:
        d["rope_scaling"] = None
    return d


def mlx_lm_config(config: GptOssConfig) -> dict:
    """config.json as mlx-lm reads it: MXFP4 experts, and a per-path entry for each layer we hold quantized."""
    d = release_config(config)
    del d["quantization_config"]
    quant: dict = dict(_MXFP4)
    for comp, spec in config.quantization:
        entry = {"group_size": spec.group_size, "bits": spec.bits, "mode": spec.mode}
        for path in MLXLM_MODULES[comp]:
            layers = range(config.num_hidden_layers) if "{i}" in path else [None]
            quant.update({path.format(i=i): entry for i in layers})
    d["quantization"] = d["quantization_config"] = quant  # as mlx-lm's own save_config writes both
    return d


def _is_export_output(name: str) -> bool:
    return name in ("config.json", INDEX, MARKER, *TOKENIZER_FILES) or bool(_SHARD.match(name))


def _check_replaceable(dst: Path) -> None:
    """``force`` replaces an empty folder, an earlier conversion, or an earlier export with nothing added."""
    if not (dst / MARKER).is_file() or dst.is_symlink():
        check_replaceable(dst, is_output)  # empty, or an earlier conversion; its errors say what else is there
        return
    cwd = Path.cwd().resolve()
    if cwd == dst.resolve() or dst.resolve() in cwd.parents:
        raise ConversionError(f"{dst}: is (or holds) the current directory; give a new folder")
    extra = sorted(p.name for p in dst.iterdir() if p.is_symlink() or not p.is_file() or not _is_export_output(p.name))
    if extra:
        raise ConversionError(
            f"{dst}: holds {', '.join(extra[:5])}, which an export does not write; --force would delete them — "
            "move them out first, or choose another destination"
        )


def _write(m: Model, fmt: str, shards: list[list[Piece]], total: int, dst: Path, notes: list[str], show: bool) -> None:
    """Write the export into a hidden sibling of ``dst``, then rename it into place (replacing ``dst``)."""
    files: dict[Path, BinaryIO] = {}

    def fh(info: TensorInfo) -> BinaryIO:
        if info.file not in files:
            files[info.file] = open(info.file, "rb")
        return files[info.file]

    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"exporting ({fmt})", disable=not show)
    try:
        with staged(dst) as tmp:
            weight_map = {}
            for fname, shard in zip(_file_names(fmt, len(shards)), shards):
                if fmt == HF:
                    shard = sorted(shard, key=lambda p: (-_DTYPE_RANK.get(p.dtype, 9), p.name))
                meta = {"format": "pt" if fmt == HF else "mlx"}
                with SafetensorsWriter(tmp / fname, [(p.name, p.dtype, p.shape) for p in shard], meta) as w:
                    for p in shard:
                        for chunk in _chunks(p, fh):
                            w.write(p.name, chunk)
                            bar.update(len(chunk) if isinstance(chunk, bytes) else chunk.nbytes)
                        weight_map[p.name] = fname
            config = release_config(m.config) if fmt == HF else mlx_lm_config(m.config)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
            for name in TOKENIZER_FILES:
                if (m.root / name).is_file():
                    shutil.copy2(m.root / name, tmp / name)
            marker = {"format": fmt, "source": str(m.root), "exporter_version": __version__, "notes": notes}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    finally:
        for f in files.values():
            f.close()
        bar.close()


def export(
    model: str | Path,
    dst: str | Path,
    *,
    fmt: str,
    force: bool = False,
    dequantize: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool | Callable | None = None,
) -> Path:
    """Export one of our checkpoints to the released Hugging Face layout (``fmt="hf"``) or mlx-lm's (``"mlx-lm"``).

    Args:
        model: a converted folder, or a repo id (converted once, as everywhere).
        dst: the folder to create; it must not overlap the model. An existing one is refused unless
            ``force``, and even then only an empty folder, an earlier conversion or an earlier export
            is replaced.
        fmt: "hf" or "mlx-lm".
        dequantize: for "hf", write layers we hold quantized as bf16 (then not the release's bytes);
            without it such a model is refused.
        shard_bytes: largest output file.
        progress: show a progress bar (default: when stderr is a terminal).

    Returns the destination. Every tensor's bytes are ours unchanged (dequantized layers aside);
    nothing is left at or beside ``dst`` on an error. Raises ConversionError for a check that fails,
    OSError for a failed write.
    """
    if fmt not in FORMATS:
        raise ConversionError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    given = dst
    dst = destination(dst)
    taken = f"{given}: already exists (use --force to replace an earlier export or conversion)"
    if (dst.exists() or dst.is_symlink()) and not force:
        raise ConversionError(taken)
    m = open_model(model)
    check_no_overlap([m.root], dst)
    if dst.exists() or dst.is_symlink():
        _check_replaceable(dst)
    pieces = plan_export(m, fmt, dequantize)
    notes = [f"{c} dequantized to bf16 (stored {q}): not the release's bytes" for c, q in m.config.quantization
             if fmt == HF and dequantize]  # fmt: skip
    experts = (m.raw.get("mlx_gptoss") or {}).get("experts", "")
    if "quantized from dense" in experts:
        notes.append("the experts were quantized to MXFP4 by the converter (from dense weights): exported as those codes")
    shards = split_into_shards(pieces, lambda p: p.nbytes, shard_bytes)
    total = sum(p.nbytes for p in pieces)
    show = sys.stderr.isatty() if progress is None else bool(progress)

    def recheck() -> None:
        if not force:
            raise ConversionError(taken)
        _check_replaceable(dst)

    with claimed(dst, total + SPACE_MARGIN, recheck, "conversion or export"):
        _write(m, fmt, shards, total, dst, notes, show)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return dst


__all__ = ["FORMATS", "export", "open_model", "plan_export", "release_config", "mlx_lm_config"]
