"""mlx_gptoss.options: the one place numeric options are checked (API, CLI and server alike)."""

from __future__ import annotations

import math

import pytest

from mlx_gptoss.options import SEED_MAX, OptionError, check_number, check_sampling, check_seed


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "1", None, [1]])
def test_non_finite_and_non_numbers_are_refused_by_name(value):
    with pytest.raises(OptionError, match=r"^--temp must be"):
        check_number("--temp", value, min=0)


def test_bounds_and_integers():
    assert check_number("x", 0, min=0) == 0 and check_number("x", 1.0, min=0, max=1) == 1.0
    with pytest.raises(OptionError, match=r"x must be a number in \(0, 1\]; got 0"):
        check_number("x", 0, min=0, max=1, min_open=True)
    with pytest.raises(OptionError, match=r"x must be a number in \[0, 1\); got 1"):
        check_number("x", 1, min=0, max=1, max_open=True)
    with pytest.raises(OptionError, match=r"n must be an integer >= 1; got 2.5"):
        check_number("n", 2.5, integer=True, min=1)
    with pytest.raises(OptionError, match=r"n must be an integer >= 1; got -5"):
        check_number("n", -5, integer=True, min=1)


def test_seeds():
    assert check_seed("seed", None) is None and check_seed("seed", -1) is None  # -1: a random seed
    assert check_seed("seed", 0) == 0 and check_seed("seed", SEED_MAX) == SEED_MAX
    for bad in (-5, SEED_MAX + 1, 10**24, 1.5, True, "3"):
        with pytest.raises(OptionError, match=r"seed must be an integer in 0\.\.2\*\*64-1 \(or -1 for a random seed\)"):
            check_seed("seed", bad)


def test_sampling_names_the_option_as_the_caller_spells_it():
    check_sampling(0.0, 1.0, 0, 0.0)
    with pytest.raises(OptionError, match="^temperature must be a finite number"):
        check_sampling(math.nan, 1.0, 0, 0.0, names=("temperature", "top_p", "top_k", "min_p"))
    with pytest.raises(OptionError, match=r"^--top-k must be an integer >= 0"):
        check_sampling(0.0, 1.0, -1, 0.0, names=("--temp", "--top-p", "--top-k", "--min-p"))
