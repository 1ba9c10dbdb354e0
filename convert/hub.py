"""Fetching a released checkpoint by Hugging Face repo id (into the usual HF cache)."""

from __future__ import annotations

from pathlib import Path

from .source import ConversionError

# What the converter reads; the release also ships original/ and metal/ copies of the weights,
# which would double the download.
PATTERNS = ["*.json", "*.safetensors", "chat_template.jinja", "tokenizer*"]


OFFLINE_HINT = "Download it on a connected machine and give its folder as SRC instead of the repo id."


def download(repo_id: str, *, revision: str | None = None, offline_hint: str = OFFLINE_HINT) -> Path:
    """Download (or find in the HF cache) the files of ``repo_id`` the converter needs.

    ``offline_hint`` ends the error raised when there is no network and no cached copy.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=PATTERNS))
    except LocalEntryNotFoundError as e:
        raise ConversionError(
            f"cannot download {repo_id}: no network connection and no copy in the Hugging Face cache "
            f"({e.__class__.__name__}). {offline_hint}"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise ConversionError(f"cannot download {repo_id}: {e}") from None
