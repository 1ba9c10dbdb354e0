"""The kernel mode ("auto" or "twin") and the backend the MoE ops run on: read by the dispatcher
(:mod:`mlx_gptoss.kernels`) and by the self-check's report, so neither imports the other."""

from __future__ import annotations

import os

import mlx.core as mx

_MODES = ("auto", "twin")
_mode = os.environ.get("MLX_GPTOSS_KERNELS", "auto")
if _mode not in _MODES:
    raise ValueError(f"MLX_GPTOSS_KERNELS must be one of {_MODES}, got {_mode!r}")


def set_mode(mode: str) -> None:
    """ "auto": custom kernels where the backend has them; "twin": the pure-MLX twins everywhere."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    _mode = mode


def mode() -> str:
    """The current mode: "auto" or "twin" (see :func:`set_mode`)."""
    return _mode


def backend() -> str:
    """ "metal", "cuda" or "twin": what the MoE ops run on, for the default device."""
    if _mode == "twin" or mx.default_device() != mx.gpu:
        return "twin"
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "twin"
