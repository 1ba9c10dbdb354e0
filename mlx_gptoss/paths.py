"""Names and places: the model used when none is named, and where this library keeps its own files
(converted models, the kernels' self-check verdicts). Light on purpose: the CLI reads it at start-up."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "openai/gpt-oss-20b"


def cache_root() -> Path:
    """``$MLX_GPTOSS_CACHE`` or ``~/.cache/mlx-gptoss``: converted models, the kernels' self-check cache."""
    return Path(os.environ.get("MLX_GPTOSS_CACHE", Path.home() / ".cache" / "mlx-gptoss"))
