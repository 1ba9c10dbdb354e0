"""One lock per loaded model, so generations from several threads run one after another.

MLX evaluates an array only in the thread whose stream built it, and a model's caches, expert
slots and random state are shared: two generations interleaved on one model would corrupt each
other or fail inside MLX. Everything that runs the model for a generation holds this lock.
"""

from __future__ import annotations

import threading
from typing import Any

_guard = threading.Lock()
_ATTR = "_mlx_gptoss_generation_lock"


def model_lock(model: Any) -> threading.RLock:
    """The re-entrant lock that serialises generations on ``model`` (created on first use)."""
    with _guard:
        # kept in the instance __dict__, not as an nn.Module child (modules are unhashable dicts)
        lock = model.__dict__.get(_ATTR)
        if lock is None:
            lock = model.__dict__[_ATTR] = threading.RLock()
        return lock
