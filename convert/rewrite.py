"""A new converted folder made from another, tensor by tensor: the rest copied byte for byte.

For the tools that derive a model from a converted one (expert pruning; fusing an adapter does the
same steps): each shard is written again under its name, a tensor either copied or replaced by
new bytes of a declared dtype and shape, a tensor may be dropped; config.json edited, the index
and the tokenizer files written; all into a hidden sibling of the destination under its lock,
renamed into place only when complete (the converter's destination rules).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlx_gptoss.config import read_json
from mlx_gptoss.converted import INDEX, shard_files
from mlx_gptoss.safetensors_io import SafetensorsWriter, TensorInfo, read_header, tensor_nbytes
from mlx_gptoss.version import __version__

from .convert import TOKENIZER_FILES
from .destination import SPACE_MARGIN, check_no_overlap, claimed, destination, staged
from .source import ConversionError
from .vocab import TIKTOKEN_FILE


@dataclass(frozen=True)
class Replacement:
    """A tensor's new dtype and shape, and its bytes: ``chunks(fh)`` reads the source file ``fh``
    (the tensor's own shard, open) and yields bytes or arrays in order."""

    dtype: str
    shape: tuple[int, ...]
    chunks: Callable[[Any], Iterable[bytes | np.ndarray]]


DROP = None  # what ``replace`` returns for a tensor the new folder leaves out


def rewrite(src: Path, dst: str | Path, *, replace: Callable[[TensorInfo], Replacement | TensorInfo | None],
            edit_config: Callable[[dict], dict], what: str,
            before_rename: Callable[[Path], None] | None = None) -> Path:  # fmt: skip
    """Write a new converted folder ``dst`` from the converted folder ``src``.

    Args:
        replace: for each source tensor, the tensor itself (copied as is), a :class:`Replacement`,
            or :data:`DROP`.
        edit_config: the new config.json from the source's (parsed); ``converter_version`` is set.
        what: what the folder is ("pruning", ...), for the lock and messages.
        before_rename: called with the finished temporary folder, before it is renamed into place
            (a check that raises discards everything).

    ``dst`` must not exist; it must not overlap ``src``. Raises ConversionError (a ValueError) or
    OSError; nothing is left at or beside ``dst`` then.
    """
    src, given = Path(src), dst
    dst = destination(dst)
    if dst.exists() or dst.is_symlink():
        raise ConversionError(f"{given}: already exists; {what} writes a new folder (choose another name)")
    check_no_overlap([src], dst)
    plan: dict[Path, list[tuple[TensorInfo, Replacement | TensorInfo]]] = {}
    for f in shard_files(src):
        kept = []
        for info in sorted(read_header(f)[0].values(), key=lambda i: i.begin):
            new = replace(info)
            if new is not DROP:
                kept.append((info, new))
        plan[f] = kept
    total = sum(tensor_nbytes(n.dtype, n.shape) for v in plan.values() for _, n in v)

    def exists() -> None:  # another run may have finished meanwhile
        raise ConversionError(f"{given}: already exists; {what} writes a new folder (choose another name)")

    with claimed(dst, total + SPACE_MARGIN, exists, what), staged(dst) as tmp:
        weight_map = {}
        for f, entries in plan.items():
            with open(f, "rb") as fh, SafetensorsWriter(tmp / f.name, [(i.name, n.dtype, n.shape) for i, n in entries],
                                                        {"format": "mlx"}) as w:  # fmt: skip
                for info, new in entries:
                    chunks = info.iter_chunks(fh) if isinstance(new, TensorInfo) else new.chunks(fh)
                    for chunk in chunks:
                        w.write(info.name, chunk)
                    weight_map[info.name] = f.name
        config = edit_config(read_json(src / "config.json"))
        config["mlx_gptoss"]["converter_version"] = __version__
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        index = {"metadata": {"total_size": total, "format": "mlx-gptoss"}, "weight_map": weight_map}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        for name in (*TOKENIZER_FILES, TIKTOKEN_FILE):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        if before_rename is not None:
            before_rename(tmp)
    return dst


def rows(info: TensorInfo, keep: list[int]) -> Replacement:
    """``info`` with only the rows ``keep`` of its first axis (in that order), read row by row."""
    per = info.nbytes // info.shape[0]

    def chunks(fh: Any) -> Iterable[bytes]:
        for r in keep:
            fh.seek(info.begin + r * per)
            data = fh.read(per)
            if len(data) != per:
                raise ConversionError(f"{info.file}: truncated while reading tensor {info.name!r}")
            yield data

    return Replacement(info.dtype, (len(keep), *info.shape[1:]), chunks)
