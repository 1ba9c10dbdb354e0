"""Streaming access to safetensors files: headers, byte ranges, and a sequential writer.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to
its dtype, shape and byte range, then the data. Reading headers alone lets the converter and the
loader check every shape and size, and catch a truncated file, before touching any data; the
writer streams tensors one at a time, so memory stays bounded (the `safetensors` package's writer
needs every tensor in memory at once).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

DTYPE_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
              "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}  # fmt: skip
# numpy has no bfloat16: BF16 bytes are handled as uint16 and reinterpreted by MLX.
NUMPY_DTYPE = {"U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "F16": np.float16,
               "BF16": np.uint16, "U32": np.uint32, "I32": np.int32, "F32": np.float32, "U64": np.uint64,
               "I64": np.int64, "F64": np.float64}  # fmt: skip
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file that is missing, truncated or malformed; the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: file, absolute byte range, dtype and shape."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def read_bytes(self, fh: BinaryIO | None = None) -> bytes:
        if fh is None:
            with open(self.file, "rb") as f:
                return self.read_bytes(f)
        fh.seek(self.begin)
        data = fh.read(self.nbytes)
        if len(data) != self.nbytes:
            raise SafetensorsError(f"{self.file}: truncated while reading tensor {self.name!r}")
        return data

    def read_numpy(self, fh: BinaryIO | None = None) -> np.ndarray:
        """The tensor as a numpy array (BF16 comes back as its uint16 bit patterns)."""
        return np.frombuffer(self.read_bytes(fh), dtype=NUMPY_DTYPE[self.dtype]).reshape(self.shape)

    def iter_chunks(self, fh: BinaryIO, chunk: int = 64 << 20) -> Iterable[bytes]:
        fh.seek(self.begin)
        left = self.nbytes
        while left:
            data = fh.read(min(chunk, left))
            if not data:
                raise SafetensorsError(f"{self.file}: truncated while reading tensor {self.name!r}")
            left -= len(data)
            yield data


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header and check it completely against the format and the file's size.

    The checks are those of the format (and of the reference ``safetensors`` library): a UTF-8
    JSON object; each entry an object with a known dtype, a shape of non-negative integers and
    integer ``data_offsets`` whose length is dtype x shape; the byte ranges tile the data region
    exactly (no overlap, no gap, nothing past the end, nothing after the last tensor); an optional
    ``__metadata__`` mapping strings to strings.

    Returns ({name: TensorInfo}, metadata). Raises :class:`SafetensorsError` naming the file (and
    the tensor or field) for a missing, truncated or malformed file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path}: truncated ({size} bytes, not even a header length)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER or 8 + n > size:
                raise SafetensorsError(f"{path}: truncated or not safetensors (header of {n} bytes declared, file has {size})")
            raw = f.read(n)
    except FileNotFoundError:
        raise SafetensorsError(f"{path}: file not found") from None
    header = _strict_json(raw, f"{path}: header is")
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header must be a JSON object, found {_kind(header)}")
    metadata = _metadata(path, header.pop("__metadata__", None))
    base = 8 + n
    out = {name: _entry(path, name, h, base) for name, h in header.items()}
    # The ranges must tile the data region: sorted by start, each begins where the last ended.
    at, prev = base, None
    for t in sorted(out.values(), key=lambda t: (t.begin, t.end)):
        if t.begin != at:
            what = (
                f"overlaps tensor {prev!r}"
                if t.begin < at
                else f"leaves a gap of {t.begin - at} bytes after " + (f"tensor {prev!r}" if prev else "the header")
            )
            raise SafetensorsError(
                f"{path}: tensor {t.name!r}: data_offsets {[t.begin - base, t.end - base]} {what} "
                f"(expected it to start at {at - base})"
            )
        at, prev = t.end, t.name
    if at > size:
        raise SafetensorsError(
            f"{path}: truncated: the header declares {at - base} bytes of tensor data, the file holds {size - base}"
        )
    if at < size:
        raise SafetensorsError(
            f"{path}: {size - at} bytes after the last tensor (the header declares {at - base} bytes of tensor "
            f"data, the file holds {size - base})"
        )
    return out, metadata


def read_index(path: str | Path) -> dict[str, str]:
    """The ``weight_map`` of a ``model.safetensors.index.json``: tensor name -> shard file name.

    The index must be a JSON object whose ``weight_map`` is a non-empty object mapping tensor
    names to plain ``*.safetensors`` file names beside the index (no folders, no ``..``).
    Raises :class:`SafetensorsError` naming the file and the entry.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SafetensorsError(f"{path}: file not found") from None
    index = _strict_json(raw, f"{path}:")
    if not isinstance(index, dict):
        raise SafetensorsError(f"{path}: expected a JSON object, found {_kind(index)}")
    if "metadata" in index and not isinstance(index["metadata"], (dict, type(None))):
        raise SafetensorsError(f"{path}: metadata must be an object, found {_kind(index['metadata'])}")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        found = "nothing" if "weight_map" not in index else _kind(weight_map)
        raise SafetensorsError(f"{path}: weight_map must be a non-empty object of tensor -> file name, found {found}")
    for name, fname in weight_map.items():
        plain = isinstance(fname, str) and fname not in ("", ".", "..") and not any(c in fname for c in "/\\\0")
        if not (plain and fname.endswith(".safetensors")):
            raise SafetensorsError(
                f"{path}: weight_map[{name!r}] must be a *.safetensors file name beside the index, found {fname!r}"
            )
    return weight_map


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(f"key {k!r} appears twice")
        out[k] = v
    return out


def _strict_json(raw: bytes, where: str) -> Any:
    """``raw`` parsed as UTF-8 JSON with no key twice in an object; else a SafetensorsError
    "``where`` not UTF-8 / not valid JSON (why)"."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as e:
        raise SafetensorsError(f"{where} not UTF-8 ({e})") from None
    except (json.JSONDecodeError, _DuplicateKey) as e:
        raise SafetensorsError(f"{where} not valid JSON ({e})") from None


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), f"a number ({v!r})"
    )


def _is_uint(v: Any) -> bool:
    return type(v) is int and v >= 0  # bool is an int subclass: excluded on purpose


def _metadata(path: Path, meta: Any) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise SafetensorsError(f"{path}: __metadata__ must be an object of strings, found {_kind(meta)}")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise SafetensorsError(f"{path}: __metadata__[{k!r}] must be a string, found {_kind(v)}")
    return meta


def _entry(path: Path, name: str, h: Any, base: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(h, dict):
        raise SafetensorsError(f"{where}: expected an object with dtype, shape and data_offsets, found {_kind(h)}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in h:
            raise SafetensorsError(f"{where}: no {key!r}")
    dtype, shape, offsets = h["dtype"], h["shape"], h["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZE:
        raise SafetensorsError(f"{where}: unsupported dtype {dtype!r} (expected one of {', '.join(DTYPE_SIZE)})")
    if not isinstance(shape, list) or not all(_is_uint(s) for s in shape):
        raise SafetensorsError(f"{where}: shape must be a list of non-negative integers, found {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
        raise SafetensorsError(f"{where}: data_offsets must be two non-negative integers, found {offsets!r}")
    b, e = offsets
    if e < b:
        raise SafetensorsError(f"{where}: data_offsets {offsets} end before they begin")
    want = tensor_nbytes(dtype, tuple(shape))
    if e - b != want:
        raise SafetensorsError(f"{where}: data_offsets {offsets} hold {e - b} bytes, expected {want} for {dtype} {shape}")
    return TensorInfo(path, name, dtype, tuple(shape), base + b, base + e)


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor, in the order the entries were declared.

    Use as a context manager; leaving the block before every tensor was written raises.
    """

    def __init__(self, path: str | Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        self.path = Path(path)
        header: dict = {"__metadata__": {k: str(v) for k, v in (metadata or {}).items()}}
        offset = 0
        self._sizes: list[tuple[str, int]] = []
        for name, dtype, shape in entries:
            nbytes = tensor_nbytes(dtype, shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._sizes.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._fh = open(self.path, "wb")
        self._fh.write(len(raw).to_bytes(8, "little"))
        self._fh.write(raw)
        self._next = 0
        self._written = 0

    def write(self, name: str, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        """Append bytes of the next declared tensor (may be called several times per tensor)."""
        if self._next >= len(self._sizes):
            raise ValueError(f"{self.path}: no more tensors declared, got {name!r}")
        want_name, want = self._sizes[self._next]
        if name != want_name:
            raise ValueError(f"{self.path}: expected tensor {want_name!r} next, got {name!r}")
        buf = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else memoryview(data)
        if self._written + buf.nbytes > want:
            raise ValueError(f"{self.path}: tensor {name!r} gets more than its {want} bytes")
        self._fh.write(buf)
        self._written += buf.nbytes
        if self._written == want:
            self._next, self._written = self._next + 1, 0

    def close(self) -> None:
        self._fh.close()
        if self._next != len(self._sizes):
            missing = self._sizes[self._next][0]
            raise ValueError(f"{self.path}: closed before tensor {missing!r} was written")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._fh.close()


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return DTYPE_SIZE[dtype] * math.prod(shape)  # Python ints: a huge shape cannot wrap around


def split_into_shards(items: list, nbytes: Callable[[Any], int], shard_bytes: int) -> list[list]:
    """Consecutive groups of ``items`` of at most ``shard_bytes`` each (an item larger alone gets its own)."""
    shards: list[list] = [[]]
    size = 0
    for it in items:
        n = nbytes(it)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += n
    return shards


def fsync_dir(path: Path) -> None:
    """Make a rename durable (best effort; not every platform can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
