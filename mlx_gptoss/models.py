"""Models by name: a folder or a Hugging Face repo id, converted once into the cache
(``cache_root()/models``); the cache listed and pruned.

A repo id is converted once into ``models/owner--name`` (``owner--name@revision`` for another
revision than the default); only folders our converter wrote are listed, and ``rm`` deletes only
what ``list`` shows, by the rule ``convert --force`` follows: a conversion holding nothing but the
files a conversion writes. This sits above the converter (it runs it) and the core loader (it
checks what it converted).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from mlx.utils import tree_flatten

from mlx_gptoss_convert import convert as run_conversion
from mlx_gptoss_convert.convert import is_output
from mlx_gptoss_convert.destination import SPACE_MARGIN, check_free_space, check_only_outputs, destination
from mlx_gptoss_convert.hub import (
    KEEP_ENV,
    OFFLINE_HINT,
    download,
    download_size,
    drop_download,
    keep_download_default,
    remote_size,
)

from .config import GptOssConfig
from .converted import FORMAT_NAME, LoadError, read_config
from .loader import load_weights
from .model import GptOss
from .paths import DEFAULT_MODEL as DEFAULT_MODEL
from .paths import cache_root

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(name: str | Path) -> bool:
    """Whether ``name`` reads as a Hugging Face repo id (owner/name) and is not an existing path."""
    return not Path(name).expanduser().exists() and bool(REPO_ID.match(str(name)))


def resolve_model(path_or_repo: str | Path, *, progress: bool | None = None, revision: str | None = None,
                  keep_download: bool | None = None, convert: bool = True) -> Path:  # fmt: skip
    """A converted model folder for a path or a Hugging Face repo id (downloaded and converted once).

    A repo id is looked up in ``cache_root()/models``. The first time, it is downloaded into the
    Hugging Face cache (``$HF_TOKEN`` for private or gated repos) and converted there: where it
    writes and the disk it needs are said on stderr first, free space is checked, and once the
    converted copy is checked the download is kept or dropped (``keep_download``; default
    ``$MLX_GPTOSS_KEEP_DOWNLOAD``, else keep). ``convert=False`` raises :class:`LoadError`
    instead of downloading.
    """
    p = Path(path_or_repo).expanduser()
    if p.exists():
        return p
    name = str(path_or_repo)
    if not REPO_ID.match(name):
        raise LoadError(f"{name}: no such folder, and not a Hugging Face repo id (owner/name)")
    converted = converted_path(name, revision)
    if (converted / "config.json").is_file():
        return converted
    if not convert:
        raise LoadError(f"{name}: not converted yet ({converted} does not exist); `mlx-gptoss convert {name} {converted}` "
                        f"converts it (generate and chat do it on first use)")  # fmt: skip
    hint = (
        f"It has not been converted yet ({converted} does not exist). If you have the release downloaded, "
        "convert it: `mlx-gptoss convert SRC DST`, then run with `--model DST` (in Python: load(DST))."
    )
    return convert_once(name, converted, revision=revision, progress=progress, keep_download=keep_download, offline_hint=hint)


def resolve_config(path_or_repo: str | Path) -> tuple[Path, GptOssConfig]:
    """The converted folder of ``path_or_repo`` (see :func:`resolve_model`) and its config, as the loader reads them."""
    path = resolve_model(path_or_repo)
    if not (path / "config.json").is_file():
        raise LoadError(f"{path}: no config.json")
    return path, read_config(path)


def models_root() -> Path:
    """The folder of converted models: ``$MLX_GPTOSS_CACHE/models`` (default ``~/.cache/mlx-gptoss/models``)."""
    return cache_root() / "models"


def converted_path(repo_id: str, revision: str | None = None) -> Path:
    """Where ``repo_id`` (at ``revision``) is converted once."""
    return models_root() / (repo_id.replace("/", "--") + (f"@{revision.replace('/', '--')}" if revision else ""))


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _say(text: str) -> None:
    print(f"mlx-gptoss: {text}", file=sys.stderr, flush=True)


def convert_once(repo_id: str, dst: Path, *, revision: str | None = None, progress: bool | None = None,
                 keep_download: bool | None = None, offline_hint: str | None = None) -> Path:  # fmt: skip
    """Download ``repo_id`` and convert it into ``dst``, saying where and how much disk first.

    Args:
        keep_download: keep the downloaded copy in the Hugging Face cache after the converted one
            is checked (default ``$MLX_GPTOSS_KEEP_DOWNLOAD``, else keep); when kept, the space
            dropping would free and the command that does it are printed.
        offline_hint: ends the error raised when there is no network and no cached copy.
    """
    keep = keep_download_default() if keep_download is None else keep_download  # a bad setting fails before any download
    src = fetch(repo_id, dst, revision=revision, offline_hint=offline_hint)
    run_conversion(src, dst, progress=progress)
    finish_download(repo_id, src, dst, keep)
    return dst


def fetch(repo_id: str, dst: Path, *, revision: str | None = None, offline_hint: str | None = None) -> Path:
    """Download ``repo_id`` to be converted into ``dst``: where and how much said first, free space checked."""
    dst = destination(dst)
    size = remote_size(repo_id, revision)
    need = f"about {_gb(size)} for the download and as much for the converted copy" if size else "about twice the download"
    _say(f"{repo_id} is not converted yet: downloading it into the Hugging Face cache, then converting it once into "
         f"{dst} ({need})")  # fmt: skip
    if size:
        check_free_space(dst.parent, size + SPACE_MARGIN)
    src = download(repo_id, revision=revision, offline_hint=offline_hint or OFFLINE_HINT)
    check_free_space(dst.parent, download_size(src) + SPACE_MARGIN)
    return src


def finish_download(repo_id: str, src: Path, dst: Path, keep: bool) -> None:
    """Once the conversion in ``dst`` checks out: keep the download (saying what dropping frees) or drop it."""
    verify(dst)
    if keep:
        _say(f"the download is kept in {src}; dropping it would free {_gb(download_size(src))}: "
             f"`hf cache rm model/{repo_id}` (or --drop-download / {KEEP_ENV}=0 next time)")  # fmt: skip
        return
    freed = drop_download(src)
    _say(
        f"dropped the download, {_gb(freed)} freed"
        if freed is not None
        else f"{src} is not a Hugging Face cache revision: left as it is"
    )


def verify(path: Path) -> None:
    """The checks load() makes (format, config, every tensor's name, dtype and shape), reading headers only."""
    config = read_config(path)
    load_weights(path, dict(tree_flatten(GptOss(config).parameters())))


@dataclass
class ModelInfo:
    """One converted model of the cache; ``problem`` says what in its config.json could not be read."""

    name: str
    path: Path
    source: str
    size: int
    quantization: str
    format_version: int | None
    problem: str | None = None

    def row(self) -> list[str]:
        return [self.name, self.source, _gb(self.size), self.quantization, str(self.format_version)]


def _ours(path: Path) -> dict | None:
    """The config.json of a folder our converter wrote, else None."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    fmt = raw.get("mlx_gptoss") if isinstance(raw, dict) else None
    return raw if isinstance(fmt, dict) and fmt.get("format") == FORMAT_NAME else None


def _name(folder: str) -> str:
    return folder.replace("--", "/", 1)


def _visible(p: Path) -> bool:
    """Whether ``list`` looks at the cache entry ``p``: a folder, not a link, not hidden (a hidden one
    is a partial or earlier copy a conversion left, or someone's own)."""
    return not p.name.startswith(".") and p.is_dir() and not p.is_symlink()


def folder_bytes(path: Path) -> int:
    """The bytes of every file under ``path``, subfolders included (symbolic links not followed)."""
    total = 0
    for top, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(top, f)).st_size
            except OSError:
                pass  # gone meanwhile, or unreadable: it frees nothing we can count
    return total


def _quantization(raw: dict) -> tuple[str, str | None]:
    """The QUANTIZATION column for a config.json, and what is wrong with its ``quantization`` (or None)."""
    quant = raw.get("quantization") or {}
    if not isinstance(quant, dict) or not all(isinstance(s, dict) for s in quant.values()):
        return "?", f'config.json has an unreadable "quantization" ({json.dumps(quant)[:60]}): is the folder damaged?'
    q = ", ".join(f"{c} {s.get('mode', 'affine')} {s.get('bits')}-bit" for c, s in sorted(quant.items()))
    return "experts mxfp4" + (f"; {q}" if q else ""), None


def list_models() -> list[ModelInfo]:
    """The converted models in the cache, by name; folders our converter did not write are left out.

    A folder whose config.json has a field that cannot be read is listed all the same, with
    :attr:`ModelInfo.problem` saying what.
    """
    root = models_root()
    out = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        raw = _ours(p) if _visible(p) else None
        if raw is None:
            continue
        meta = raw["mlx_gptoss"]
        quant, problem = _quantization(raw)
        version = meta.get("format_version")
        out.append(ModelInfo(_name(p.name), p, str(meta.get("source", "?")), folder_bytes(p), quant,
                             version if isinstance(version, int) else None, problem))  # fmt: skip
    return out


def find_model(name: str) -> Path:
    """The cache folder of a converted model named ``owner/name`` (or by its folder name), as ``list`` shows it."""
    folder = name.replace("/", "--", 1)
    p = models_root() / folder
    # a hidden folder is a partial or earlier copy (or someone's own): list never shows it, so rm never reaches it
    if "/" not in folder and not folder.startswith(".") and folder != "" and (p.exists() or p.is_symlink()):
        if p.is_symlink() or _ours(p) is None:
            raise LoadError(f"{p}: not a model mlx-gptoss converted; not removed (remove it yourself if you mean to)")
        return p
    known = ", ".join(m.name for m in list_models()) or "none"
    raise LoadError(f"{name}: no such converted model in {models_root()} (converted models: {known})")


def check_removable(path: Path) -> None:
    """Refuse to delete a cache folder holding anything but the files a conversion writes (the rule
    of ``convert --force``): notes, an adapter trained into it... are named in the error, and kept."""
    check_only_outputs(path, is_output, "rm", instead="delete the folder yourself")


def remove_model(name: str) -> tuple[Path, int]:
    """Delete a converted model from the cache (:func:`find_model`, :func:`check_removable`); its
    folder and the bytes freed."""
    path = find_model(name)
    check_removable(path)
    size = folder_bytes(path)
    shutil.rmtree(path)
    return path, size
