"""Numeric options checked in one place, for the Python API, the CLI and the server alike.

Each check names the option as the caller spells it (``temperature`` in Python, ``--temp`` on the
command line, ``temperature`` in a request) and refuses what would otherwise surface later as a
wrong result or MLX's raw error: booleans, non-numbers, NaN and infinities, out-of-range values.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

SEED_MAX = 2**64 - 1  # mx.random.seed takes an unsigned 64-bit integer
RANDOM_SEED = -1  # a seed of -1 means "no seed" (a random one), as in llama.cpp and friends


class OptionError(ValueError):
    """An option with a value it cannot take; the message names the option and what it takes."""


def check_number(name: str, value: Any, *, integer: bool = False, min: float | None = None, max: float | None = None,
                 min_open: bool = False, max_open: bool = False) -> int | float:  # fmt: skip
    """``value`` if it is a finite number (an integer when ``integer``) within the bounds, else
    :class:`OptionError` naming ``name``. Bounds are inclusive unless ``min_open``/``max_open``."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, numbers.Integral) if integer else isinstance(value, numbers.Real)
    if isinstance(value, bool) or not ok_type:
        raise OptionError(f"{name} must be {kind}{_range(min, max, min_open, max_open)}; got {value!r}")
    if not integer and not math.isfinite(value):
        raise OptionError(f"{name} must be a finite number{_range(min, max, min_open, max_open)}; got {value!r}")
    low = min is not None and (value <= min if min_open else value < min)
    high = max is not None and (value >= max if max_open else value > max)
    if low or high:
        raise OptionError(f"{name} must be {kind}{_range(min, max, min_open, max_open)}; got {value!r}")
    return value


def check_seed(name: str, value: Any) -> int | None:
    """A seed for ``mx.random.seed``: an integer in 0..2**64-1; None or -1 mean no seed (random)."""
    if value is None or (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value == RANDOM_SEED):
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= SEED_MAX:
        raise OptionError(f"{name} must be an integer in 0..2**64-1 (or -1 for a random seed); got {value!r}")
    return int(value)


def check_sampling(temp: Any, top_p: Any, top_k: Any, min_p: Any, *,
                   names: tuple[str, str, str, str] = ("temp", "top_p", "top_k", "min_p")) -> None:  # fmt: skip
    """The sampling options: temperature >= 0 (0 = greedy), top_p in (0, 1], top_k >= 0 (0 = all),
    min_p in [0, 1)."""
    check_number(names[0], temp, min=0)
    check_number(names[1], top_p, min=0, max=1, min_open=True)
    check_number(names[2], top_k, integer=True, min=0)
    check_number(names[3], min_p, min=0, max=1, max_open=True)


def _range(min: float | None, max: float | None, min_open: bool, max_open: bool) -> str:
    if min is None and max is None:
        return ""
    if max is None:
        return f" {'>' if min_open else '>='} {_num(min)}"
    if min is None:
        return f" {'<' if max_open else '<='} {_num(max)}"
    return f" in {'(' if min_open else '['}{_num(min)}, {_num(max)}{')' if max_open else ']'}"


def _num(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"  # integers exactly: 2147483647, not 2.14748e+09
