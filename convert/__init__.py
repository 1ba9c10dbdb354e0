"""The converter: released gpt-oss checkpoints -> the MLX layout (run as ``mlx-gptoss convert``).

Installed as ``mlx_gptoss_convert``; the source lives in the top-level ``convert/`` folder.
"""

from .convert import PRESETS, convert, plan
from .layout import FORMAT_VERSION, LAYOUTS
from .source import ConversionError, open_release

__all__ = ["PRESETS", "convert", "plan", "open_release", "ConversionError", "FORMAT_VERSION", "LAYOUTS"]
