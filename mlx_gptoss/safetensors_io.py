"""Streaming access to safetensors files: headers, byte ranges, and a sequential writer.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to
its dtype, shape and byte range, then the data. Reading headers alone lets the converter and the
loader check every shape and size, and catch a truncated file, before touching any data; the
writer streams tensors one at a time, so memory stays bounded (the `safetensors` package's writer
needs every tensor in memory at once).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

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
    """Parse a safetensors header and check it against the file's size.

    Returns ({name: TensorInfo}, metadata). Raises :class:`SafetensorsError` naming the file for a
    missing, truncated or malformed file.
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
                raise SafetensorsError(
                    f"{path}: truncated or not safetensors (header of {n} bytes declared, file has {size})"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise SafetensorsError(f"{path}: file not found") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    data_end = 0
    for name, h in header.items():
        try:
            dtype, shape, (b, e) = h["dtype"], tuple(int(s) for s in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: malformed header entry for {name!r}") from None
        if dtype not in DTYPE_SIZE:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        if e - b != DTYPE_SIZE[dtype] * int(np.prod(shape, dtype=np.int64)):
            raise SafetensorsError(f"{path}: tensor {name!r}: byte range does not match shape {list(shape)} {dtype}")
        out[name] = TensorInfo(path, name, dtype, shape, base + b, base + e)
        data_end = max(data_end, base + e)
    if data_end > size:
        raise SafetensorsError(
            f"{path}: truncated: the header declares {data_end - base} bytes of tensor data, "
            f"the file holds {size - base}"
        )
    return out, metadata


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

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._fh.close()


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return DTYPE_SIZE[dtype] * int(np.prod(shape, dtype=np.int64))


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
