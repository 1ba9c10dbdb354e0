"""mlx-gptoss: OpenAI's gpt-oss models on MLX.

    import mlx_gptoss
    model = mlx_gptoss.load("path/to/converted")        # or "openai/gpt-oss-20b"
    result = mlx_gptoss.generate(model, "Why is the sky blue?", max_tokens=200)
    print(result.text)

Heavy modules (mlx, harmony) are imported on first use, so ``import mlx_gptoss`` is instant.
The conveniences (``load`` with repo ids and adapters, ``Model.chat()``, ``generate``) live in
:mod:`mlx_gptoss.api`, the facade; the layers they compose are in ``docs/architecture.md``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from .version import __version__

# public name -> the submodule that defines it (imported on first use)
_LAZY = {
    "load": "api",
    "generate": "api",
    "Model": "api",
    "GenerationResult": "generate",
    "GptOssConfig": "config",
    "ChatSession": "chat",
    "Reply": "chat",
    "Done": "chat",
    "ReasoningDelta": "harmony",
    "FinalDelta": "harmony",
    "CommentaryDelta": "harmony",
    "ToolCall": "harmony",
    "ToolCallStarted": "harmony",
    "ToolCallDelta": "harmony",
    "ToolCallCompleted": "harmony",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mlx_gptoss' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


class _Package(types.ModuleType):
    """Keeps ``mlx_gptoss.generate`` the function.

    Importing the submodule ``mlx_gptoss.generate`` (the token loop) makes the import system set
    the package attribute of the same name to the submodule; that one assignment is ignored.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
