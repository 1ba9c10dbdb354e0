"""Fetching a checkpoint by Hugging Face repo id (into the usual HF cache), and dropping it again.

The token is ``$HF_TOKEN`` (huggingface_hub's own variable), else the one ``hf auth login`` stored.
"""

from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub  # called through the module: tests stand in for the Hub by patching its functions
from huggingface_hub.errors import (
    CacheNotFound,
    CorruptedCacheException,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects

from .source import ConversionError

# What the converter reads: the top folder only. The release also ships original/ and metal/ copies
# of the weights, which would double the download (the hub's patterns match across "/", so they
# are ignored by name).
PATTERNS = ["*.json", "*.safetensors", "chat_template.jinja", "tokenizer*"]
IGNORE = ["*/*"]
KEEP_ENV = "MLX_GPTOSS_KEEP_DOWNLOAD"


OFFLINE_HINT = "Download it on a connected machine and give its folder as SRC instead of the repo id."


def download(repo_id: str, *, revision: str | None = None, offline_hint: str = OFFLINE_HINT) -> Path:
    """Download (or find in the HF cache) the files of ``repo_id`` the converter needs.

    ``revision`` is a branch, tag or commit (default: main). ``offline_hint`` ends the error
    raised when there is no network and no cached copy.
    """
    token = os.environ.get("HF_TOKEN") or None  # None: huggingface_hub falls back to a stored login
    try:
        return Path(
            huggingface_hub.snapshot_download(
                repo_id, revision=revision, allow_patterns=PATTERNS, ignore_patterns=IGNORE, token=token
            )
        )
    except LocalEntryNotFoundError as e:
        raise ConversionError(
            f"cannot download {repo_id}: no network connection and no copy in the Hugging Face cache "
            f"({e.__class__.__name__}). {offline_hint}"
        ) from None
    except (GatedRepoError, RepositoryNotFoundError) as e:
        how = "HF_TOKEN is set but was refused" if token else "set HF_TOKEN to a token with access (or `hf auth login`)"
        raise ConversionError(
            f"cannot download {repo_id}: no access ({e.__class__.__name__}; a private or gated repo?): {how}"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise ConversionError(f"cannot download {repo_id}: {e}") from None


def remote_size(repo_id: str, revision: str | None = None) -> int | None:
    """Bytes the files ``download`` fetches, asked of the Hub before downloading; None when it cannot say (offline)."""
    try:
        info = huggingface_hub.HfApi().model_info(
            repo_id, revision=revision, files_metadata=True, token=os.environ.get("HF_TOKEN") or None
        )
    except Exception:  # noqa: BLE001 - offline, no access, whichever HTTP client the hub uses: the download will say
        return None
    files = filter_repo_objects(info.siblings or [], allow_patterns=PATTERNS, ignore_patterns=IGNORE, key=lambda f: f.rfilename)
    return sum(f.size or 0 for f in files) or None


def download_size(snapshot: Path) -> int:
    """Bytes the files of a downloaded snapshot take (symbolic links into the cache's blobs followed)."""
    return sum(p.resolve().stat().st_size for p in snapshot.rglob("*") if p.is_file())


def keep_download_default() -> bool:
    """``$MLX_GPTOSS_KEEP_DOWNLOAD`` (1/0, yes/no, true/false); keeping is the default."""
    value = os.environ.get(KEEP_ENV, "1").strip().lower()
    if value in ("1", "yes", "true", "on", ""):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"${KEEP_ENV}={value!r}: expected 1 or 0 (keep or drop the download after converting)")


def drop_download(snapshot: Path) -> int | None:
    """Delete a downloaded snapshot from the Hugging Face cache; bytes freed, None when it is not a cached revision.

    Only a revision of the cache is ever deleted (through huggingface_hub), never a folder the user gave.
    """
    snapshot = snapshot.resolve()
    if len(snapshot.parents) < 3 or snapshot.parent.name != "snapshots":
        return None
    try:
        info = huggingface_hub.scan_cache_dir(snapshot.parents[2])  # <cache>/models--owner--name/snapshots/<commit>
    except (CacheNotFound, CorruptedCacheException):
        return None
    for repo in info.repos:
        for rev in repo.revisions:
            if Path(rev.snapshot_path).resolve() == snapshot:
                strategy = info.delete_revisions(rev.commit_hash)
                strategy.execute()
                return strategy.expected_freed_size
    return None
