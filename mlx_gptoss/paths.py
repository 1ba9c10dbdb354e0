"""Names and places: the model used when none is named, and where this library keeps its own files
(converted models, the kernels' self-check verdicts). Light on purpose: the CLI reads it at start-up."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "openai/gpt-oss-20b"
CACHE_ENV = "MLX_GPTOSS_CACHE"


def cache_root() -> Path:
    """``$MLX_GPTOSS_CACHE`` or ``~/.cache/mlx-gptoss``: converted models, the kernels' self-check cache.

    Always an absolute path. An empty ``$MLX_GPTOSS_CACHE`` counts as unset (a shell's ``VAR=`` is
    not meant to make the current directory the cache); ``~`` is expanded, and a relative value is
    taken from the current directory, as any relative path given to a command is.
    """
    value = os.environ.get(CACHE_ENV, "")
    root = Path(value).expanduser() if value.strip() else Path.home() / ".cache" / "mlx-gptoss"
    return root.absolute()
