"""Released checkpoint -> MLX checkpoint, streaming one tensor (or one expert) at a time.

Everything is checked from the headers before a byte is written; the output is written into a
temporary sibling folder and renamed into place only when complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
from mlx.utils import tree_flatten
from tqdm import tqdm

from mlx_gptoss.config import GptOssConfig, QuantSpec
from mlx_gptoss.model import GptOss
from mlx_gptoss.safetensors_io import DTYPE_SIZE, SafetensorsWriter, TensorInfo, split_into_shards, tensor_nbytes
from mlx_gptoss.version import __version__

from .destination import SPACE_MARGIN, check_no_overlap, check_replaceable, claimed, destination, staged
from .layout import (
    BLOCKS,
    CONCAT,
    COPY,
    DENSE_LAYOUTS,
    FORMAT_NAME,
    FORMAT_VERSION,
    INTERLEAVE,
    QLIN_B,
    QLIN_OPS,
    QLIN_S,
    QLIN_W,  # fmt: skip
    QUANT_S,
    QUANT_ST,
    QUANT_W,
    QUANT_WT,
    quantizable,
    rule_for,
)
from .source import INDEX, ConversionError, Release, open_release
from .vocab import O200K_BASE_SHA256, TIKTOKEN_FILE, tiktoken_from_tokenizer_json

FLOATS = ("BF16", "F16", "F32")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")  # fmt: skip
DEFAULT_SHARD_BYTES = 4 << 30
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# Storage presets for the non-expert weights (the MXFP4 experts are never changed).
PRESETS: dict[str, dict[str, QuantSpec | None]] = {
    "none": {},
    # 16 GB Macs: measured in benchmarks/RESULTS.md ("Quality of non-expert quantization").
    "16gb": {
        "attention": QuantSpec("affine", 8, 64),
        "lm_head": QuantSpec("affine", 8, 64),
        "embed_tokens": QuantSpec("affine", 8, 64),
    },
}


@dataclass
class Planned:
    """One output tensor: its name, dtype, shape, and where its bytes come from."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    op: str
    sources: list[TensorInfo]
    spec: QuantSpec | None = None

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


def _expected_params(config) -> dict[str, tuple[tuple[int, ...], str]]:
    """Our parameter names, shapes and kinds, read off the (lazy, never evaluated) model."""
    kinds = {mx.uint32: "U32", mx.uint8: "U8"}
    return {k: (tuple(v.shape), kinds.get(v.dtype, "float")) for k, v in tree_flatten(GptOss(config).parameters())}


def _mismatch(release: Release, info: TensorInfo, ours: str, want: str) -> ConversionError:
    return ConversionError(
        f"{info.file}: tensor {info.name!r} is {info.dtype} {list(info.shape)}, expected {want} "
        f"(for {ours!r}, from {release.root / 'config.json'})"
    )


def plan(release: Release, config: GptOssConfig | None = None) -> list[Planned]:
    """Check every source tensor against the config and say how each output tensor is made.

    ``config`` is the output's config (the release's, plus any quantization chosen).
    """
    config = config or release.config
    out, used = [], set()
    stored = dict(release.config.quantization)  # components the source already holds quantized (mlx-lm)
    for ours, (shape, kind) in _expected_params(config).items():
        comp = quantizable(ours)
        spec = config.quant(comp) if comp and comp not in stored else None
        module, _, leaf = ours.rpartition(".")
        rule, i = rule_for(module + ".weight" if spec else ours)
        templates, op = rule.sources[release.layout]
        infos = [release.tensor(t.format(i=i), ours) for t in templates]
        used.update(x.name for x in infos)
        src = infos[0]
        if spec is not None:
            rows, cols = sum(x.shape[0] for x in infos), src.shape[1]
            d_in = shape[1] * 32 // spec.bits if leaf == "weight" else shape[1] * spec.group_size
            want = (rows, cols * spec.bits // 32) if leaf == "weight" else (rows, cols // spec.group_size)
            if want != shape or any(x.dtype not in FLOATS or x.shape[1:] != (cols,) for x in infos):
                raise _mismatch(release, src, ours, f"float [{shape[0]}, {d_in}] (to store as {spec})")
            dtype = {"weight": "U32", "scales": "U8" if spec.mode == "mxfp8" else src.dtype, "biases": src.dtype}[leaf]
            out.append(Planned(ours, dtype, shape, QLIN_OPS[leaf], infos, spec))
        elif op in (COPY, CONCAT):
            want = kind if kind != "float" else " or ".join(FLOATS)
            got = (sum(x.shape[0] for x in infos), *src.shape[1:]) if op == CONCAT else src.shape
            dtypes_ok = all(x.dtype == src.dtype for x in infos) and (src.dtype in FLOATS or src.dtype == kind)
            if got != shape or not dtypes_ok:
                bad = next((x for x in infos if x.dtype != src.dtype), src)
                raise _mismatch(release, bad, ours, f"{want} {list(shape)}" + (" after stacking" if op == CONCAT else ""))
            out.append(Planned(ours, src.dtype, shape, op, infos))
        elif op == BLOCKS:
            want_shape = (*shape[:-1], shape[-1] // 4, 16)
            if src.shape != want_shape or src.dtype != "U8":
                raise _mismatch(release, src, ours, f"U8 {list(want_shape)}")
            out.append(Planned(ours, "U32", shape, op, infos))
        elif op == INTERLEAVE:
            E, n2, *rest = shape
            want_shape = (E, n2 // 2, *rest)
            dtype_ok = src.dtype in FLOATS if kind == "float" else src.dtype == kind
            if not dtype_ok or any(x.shape != want_shape or x.dtype != src.dtype for x in infos):
                bad = next((x for x in infos if x.shape != want_shape or x.dtype != src.dtype), src)
                raise _mismatch(release, bad, ours, f"{kind} {list(want_shape)} (each half of the interleaved rows)")
            out.append(Planned(ours, src.dtype, shape, op, infos))
        elif op in (QUANT_W, QUANT_S, QUANT_WT, QUANT_ST):
            E, d_out, packed = shape
            d_in = packed * (8 if op in (QUANT_W, QUANT_WT) else 32)
            want_shape, how = (
                ((E, d_out, d_in), "[E, out, in]") if op in (QUANT_WT, QUANT_ST) else ((E, d_in, d_out), "[E, in, out]")
            )
            if src.shape != want_shape or src.dtype not in FLOATS:
                raise _mismatch(release, src, ours, f"float {list(want_shape)} (experts as {how})")
            out.append(Planned(ours, "U32" if op in (QUANT_W, QUANT_WT) else "U8", shape, op, infos))
        else:  # pragma: no cover - the table only names the ops above
            raise AssertionError(op)
    unused = sorted(set(release.tensors) - used)
    if unused:
        more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
        raise ConversionError(
            f"{release.root}: tensor(s) not described by config.json: {', '.join(unused[:5])}{more} "
            "(does num_hidden_layers / num_local_experts match the weights?)"
        )
    return out


def _quantize_expert(info: TensorInfo, e: int, fh: BinaryIO, transposed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Dense expert e [in, out] ([out, in] when ``transposed``) -> MXFP4 codes [out, in/8] u32, scales [out, in/32] u8."""
    d_in, d_out = info.shape[2:0:-1] if transposed else info.shape[1:]
    size = DTYPE_SIZE[info.dtype] * d_in * d_out
    fh.seek(info.begin + e * size)
    raw = np.frombuffer(
        fh.read(size), dtype=np.uint16 if info.dtype == "BF16" else {"F16": np.float16, "F32": np.float32}[info.dtype]
    )
    w = mx.array(raw).view(mx.bfloat16) if info.dtype == "BF16" else mx.array(raw)
    w = w.reshape(d_out, d_in) if transposed else w.reshape(d_in, d_out).T
    codes, scales = mx.quantize(w.astype(mx.float32), group_size=32, bits=4, mode="mxfp4")
    mx.eval(codes, scales)
    return np.array(codes), np.array(scales)


def _rows(infos: list[TensorInfo], fh, max_bytes: int = 64 << 20) -> Iterable[np.ndarray]:
    """The rows of the stacked source tensors, a chunk at a time, as float arrays (bf16 as uint16)."""
    for info in infos:
        row_bytes = DTYPE_SIZE[info.dtype] * info.shape[1]
        step = max(1, max_bytes // row_bytes)
        for r in range(0, info.shape[0], step):
            n = min(step, info.shape[0] - r)
            f = fh(info.file)
            f.seek(info.begin + r * row_bytes)
            yield (
                info.dtype,
                np.frombuffer(
                    f.read(n * row_bytes), dtype={"BF16": np.uint16, "F16": np.float16, "F32": np.float32}[info.dtype]
                ).reshape(n, -1),
            )


def _quantize_rows(dtype: str, rows: np.ndarray, spec: QuantSpec) -> dict[str, np.ndarray]:

    w = mx.array(rows).view(mx.bfloat16) if dtype == "BF16" else mx.array(rows)
    parts = mx.quantize(w, group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
    mx.eval(parts)
    out = {"weight": parts[0], "scales": parts[1]}
    if len(parts) > 2:
        out["biases"] = parts[2]
    # bf16 scales/biases leave as their bit patterns (numpy has no bfloat16)
    return {k: np.array(v.view(mx.uint16) if v.dtype == mx.bfloat16 else v) for k, v in out.items()}


class _Streamer:
    """Produces the bytes of planned tensors, one chunk (or one expert) at a time."""

    def __init__(self) -> None:
        self._files: dict[Path, BinaryIO] = {}
        self._scales: dict[str, list[np.ndarray]] = {}
        self._qparts: dict[tuple, dict[str, list[np.ndarray]]] = {}

    def fh(self, path: Path) -> BinaryIO:
        if path not in self._files:
            self._files[path] = open(path, "rb")
        return self._files[path]

    def chunks(self, p: Planned) -> Iterable[bytes | np.ndarray]:
        if p.op in (QLIN_W, QLIN_S, QLIN_B):
            leaf = {QLIN_W: "weight", QLIN_S: "scales", QLIN_B: "biases"}[p.op]
            key = tuple(x.name for x in p.sources)
            memo = self._qparts.get(key)
            if memo is not None and leaf in memo:
                yield from memo.pop(leaf)
                return
            kept: dict[str, list[np.ndarray]] = {}
            for dtype, rows in _rows(p.sources, self.fh):
                parts = _quantize_rows(dtype, rows, p.spec)
                for k, v in parts.items():
                    if k != leaf:
                        kept.setdefault(k, []).append(v)
                yield parts[leaf]
            self._qparts[key] = kept  # the other parts of this module follow
            return
        if p.op in (COPY, CONCAT, BLOCKS):
            for info in p.sources:
                yield from info.iter_chunks(self.fh(info.file))
            return
        if p.op == INTERLEAVE:  # one expert at a time: gate row j, then up row j
            a, b = p.sources
            half = a.nbytes // a.shape[0]
            for e in range(a.shape[0]):
                rows = [np.frombuffer(self._read(x, e * half, half), np.uint8).reshape(x.shape[1], -1) for x in (a, b)]
                yield np.stack(rows, axis=1).tobytes()
            return
        info = p.sources[0]
        if p.op in (QUANT_S, QUANT_ST) and info.name in self._scales:
            yield from self._scales.pop(info.name)
            return
        scales = []
        for e in range(info.shape[0]):
            codes, s = _quantize_expert(info, e, self.fh(info.file), transposed=p.op in (QUANT_WT, QUANT_ST))
            scales.append(s)
            yield codes if p.op in (QUANT_W, QUANT_WT) else s
        if p.op in (QUANT_W, QUANT_WT):
            self._scales[info.name] = scales  # the matching .scales tensor follows

    def _read(self, info: TensorInfo, offset: int, n: int) -> bytes:
        f = self.fh(info.file)
        f.seek(info.begin + offset)
        data = f.read(n)
        if len(data) != n:
            raise ConversionError(f"{info.file}: truncated while reading tensor {info.name!r}")
        return data

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def is_output(name: str) -> bool:
    """Whether a file name is one a conversion writes (what ``force`` may replace, and ``mlx-gptoss rm`` delete)."""
    return name in ("config.json", INDEX, TIKTOKEN_FILE, *TOKENIZER_FILES) or bool(_SHARD_NAME.match(name))


def _harmony_vocab(release: Release) -> bytes | None:
    """The release tokenizer's vocabulary in tiktoken form, None if it is not o200k_harmony.

    Read before any weight is written, so a corrupt tokenizer.json costs no conversion time.
    """
    if release.tokenizer_dir is None:
        return None
    path = release.tokenizer_dir / "tokenizer.json"
    try:
        data = tiktoken_from_tokenizer_json(path)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read it ({e.strerror})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(
            f"{path}: not a valid tokenizer.json ({e.__class__.__name__}: {e}); replace it with the release's "
            "tokenizer.json, or remove it (then copy the tokenizer files in by hand)"
        ) from None
    return data if hashlib.sha256(data).hexdigest() == O200K_BASE_SHA256 else None


def _write_metadata(release: Release, out_config: GptOssConfig, dst: Path, src_label: str, weight_map: dict[str, str],
                    total: int, vocab: bytes | None) -> list[str]:  # fmt: skip
    notes = []
    config = out_config.to_dict()
    config["mlx_gptoss"] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "converter_version": __version__,
        "source": src_label,
        "source_layout": release.layout,
        "experts": "mxfp4 (released codes and scales, bit-exact)" if release.layout not in DENSE_LAYOUTS
        else "mxfp4 (quantized from dense experts by the converter)",
    }  # fmt: skip
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    index = {"metadata": {"total_size": total, "format": FORMAT_NAME}, "weight_map": weight_map}
    (dst / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if release.tokenizer_dir is None:
        notes.append("no tokenizer.json found next to the weights: copy the tokenizer files in by hand")
        return notes
    for name in TOKENIZER_FILES:
        if (release.tokenizer_dir / name).is_file():
            shutil.copy2(release.tokenizer_dir / name, dst / name)
    if vocab is None:
        notes.append(
            f"tokenizer.json is not o200k_harmony: {TIKTOKEN_FILE} was not written, "
            "so harmony will need $TIKTOKEN_ENCODINGS_BASE or a network connection"
        )
    else:
        (dst / TIKTOKEN_FILE).write_bytes(vocab)
    return notes


def _write(release: Release, out_config: GptOssConfig, shards: list[list[Planned]], total: int, vocab: bytes | None,
           dst: Path, src_label: str, show: bool) -> list[str]:  # fmt: skip
    """Write the conversion into a hidden sibling of ``dst``, then rename it into place (replacing ``dst``)."""
    streamer = _Streamer()

    bar = tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not show)
    try:
        with staged(dst) as tmp:
            weight_map = {}
            for n, shard in enumerate(shards):
                fname = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
                entries = [(p.name, p.dtype, p.shape) for p in shard]
                with SafetensorsWriter(tmp / fname, entries, {"format": "mlx"}) as w:
                    for p in shard:
                        for chunk in streamer.chunks(p):
                            w.write(p.name, chunk)
                            bar.update(len(chunk) if isinstance(chunk, bytes) else chunk.nbytes)
                        weight_map[p.name] = fname
            notes = _write_metadata(release, out_config, tmp, src_label, weight_map, total, vocab)
    finally:
        streamer.close()
        bar.close()
    return notes


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    force: bool = False,
    layout: str | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    quantization: dict[str, QuantSpec | None] | None = None,
    progress: bool | Callable | None = None,
) -> Path:
    """Convert a released gpt-oss checkpoint folder (HF layout, original/, or dense experts) to ours.

    Args:
        src: the released checkpoint's folder.
        dst: the folder to create. It must not overlap ``src``. An existing one is refused unless
            ``force``, and even then only an empty folder or an earlier mlx-gptoss conversion is replaced.
        layout: force a source layout ("hf", "hf-dense", "original"); detected from tensor names if None.
        shard_bytes: largest output shard.
        quantization: store non-expert components quantized, e.g. ``{"attention": QuantSpec(bits=8),
            "lm_head": QuantSpec(bits=6)}`` (components: attention, lm_head, embed_tokens). The
            MXFP4 experts are never touched.
        progress: show a progress bar (default: when stderr is a terminal).

    Returns the destination path. Every check (paths, headers, tokenizer, free space) runs before
    anything is written; one conversion at a time may write into ``dst`` (``.DST.lock`` beside it).
    On any error, SIGTERM or SIGHUP nothing is left at ``dst`` (nor beside it); the hidden folder
    a killed conversion leaves beside ``dst`` is removed by the next conversion into ``dst``.
    Raises ConversionError for a check that fails, OSError for a failed write.
    """
    src, given = Path(src).expanduser(), dst
    dst = destination(dst)
    taken = f"{given}: already exists (use --force to replace an earlier conversion)"
    if (dst.exists() or dst.is_symlink()) and not force:
        raise ConversionError(taken)
    release = open_release(src, layout)
    check_no_overlap([src, release.root], dst)
    if dst.exists() or dst.is_symlink():
        check_replaceable(dst, is_output)
    vocab = _harmony_vocab(release)
    out_config = release.config
    if quantization:
        stored = dict(release.config.quantization)
        for c, q in quantization.items():
            if c in stored and q != stored[c]:
                raise ConversionError(
                    f"{release.root}: {c} is stored {stored[c]} in the source; mlx-gptoss keeps it as it is and will not "
                    f"re-quantize it to {q or 'float'} (leave that option out)"
                )
        chosen = {**stored, **{c: q for c, q in quantization.items() if q is not None}}
        out_config = dataclasses.replace(release.config, quantization=tuple(sorted(chosen.items())))
    planned = plan(release, out_config)
    shards = split_into_shards(planned, lambda p: p.nbytes, shard_bytes)
    total = sum(p.nbytes for p in planned)
    need = total + SPACE_MARGIN
    show = sys.stderr.isatty() if progress is None else bool(progress)

    def recheck() -> None:
        if not force:
            raise ConversionError(taken)
        check_replaceable(dst, is_output)

    with claimed(dst, need, recheck, "conversion"):
        notes = _write(release, out_config, shards, total, vocab, dst, str(src), show)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return dst
