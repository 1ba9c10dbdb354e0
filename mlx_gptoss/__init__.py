"""mlx-gptoss: OpenAI's gpt-oss models on MLX.

    import mlx_gptoss
    model = mlx_gptoss.load("path/to/converted")        # or "openai/gpt-oss-20b"
    result = mlx_gptoss.generate(model, "Why is the sky blue?", max_tokens=200)
    print(result.text)

Heavy modules (mlx, harmony) are imported on first use, so ``import mlx_gptoss`` is instant.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "generate", "GptOssConfig", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from .loader import load

        return load
    if name == "generate":
        from .generate import generate

        return generate
    if name == "GptOssConfig":
        from .config import GptOssConfig

        return GptOssConfig
    raise AttributeError(f"module 'mlx_gptoss' has no attribute {name!r}")
