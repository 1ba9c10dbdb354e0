"""What the commands share: the one-line error, numbers and seeds checked as :mod:`mlx_gptoss.options`
checks them (the error names the option), flags that need another one, and each option set defined once."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from ..options import OptionError, check_number, check_seed
from ..paths import DEFAULT_MODEL

Decorator = Callable[[Callable], Callable]
INT_MAX = 2**31 - 1  # MLX counts and indexes with int32: a larger count, length or size cannot be meant


class Fail(click.ClickException):
    """A clear one-line error (click prints it as "Error: ..." and exits with status 1)."""


def _flag(param: click.Parameter | None) -> str:
    """The option as it is typed (``--top-k``), for messages."""
    if param is None:
        return "value"
    return max(param.opts, key=len) if param.opts else str(param.name)


class Number(click.ParamType):
    """A number option checked by :func:`mlx_gptoss.options.check_number` (finite, in range; an integer
    when ``integer``); a value it refuses is a usage error naming the option (``--temp``)."""

    def __init__(self, *, integer: bool = False, min: float | None = None, max: float | None = None,
                 min_open: bool = False, max_open: bool = False) -> None:  # fmt: skip
        self.integer, self.name = integer, "integer" if integer else "float"
        self.bounds = {"min": min, "max": max, "min_open": min_open, "max_open": max_open}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | float:
        if isinstance(value, str):
            try:
                value = int(value) if self.integer else float(value)
            except ValueError:
                pass  # check_number refuses the text, naming the option and what it takes
        try:
            return check_number(_flag(param), value, integer=self.integer, **self.bounds)
        except OptionError as e:
            raise click.UsageError(str(e), ctx) from None


class Seed(click.ParamType):
    """--seed: 0..2**64-1, or -1 for a random seed (then None), checked by :func:`mlx_gptoss.options.check_seed`."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                pass  # check_seed refuses the text, naming the option
        try:
            return check_seed(_flag(param), value)
        except OptionError as e:
            raise click.UsageError(str(e), ctx) from None


def given(ctx: click.Context, name: str) -> bool:
    """Whether the option ``name`` (its parameter name) was set by the user rather than left at its default."""
    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)


def refuse_ignored(ctx: click.Context, rules: dict[str, tuple[bool, str]]) -> None:
    """A usage error for the first option given that would be ignored: ``rules`` maps an option's
    parameter name to (whether it is ignored now, why: e.g. "needs --train-seq-len")."""
    flags = {p.name: _flag(p) for p in ctx.command.params}
    for name, (ignored, why) in rules.items():
        if ignored and given(ctx, name):
            raise click.UsageError(f"{flags[name]} {why}", ctx)


def require_stdout() -> None:
    """Refuse to start when standard output is closed (``>&-``): whatever the command prints would be lost."""
    if sys.stdout is None:
        raise Fail("standard output is closed: the output would be lost (redirect it to a file, or to /dev/null)")


def output_failed(e: OSError) -> Fail:
    """The error for a write to standard output that failed (a closed pipe, a full disk)."""
    try:  # what is still buffered goes nowhere: Python's own flush at exit would fail again, noisily
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # stdout has no file descriptor (replaced by a caller): nothing more to quiet
    return Fail(f"cannot write to standard output ({e.strerror or e}): the output is incomplete")


def _stack(*decorators: Decorator) -> Decorator:
    def apply(f: Callable) -> Callable:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


def model_option(help: str = "A converted folder, or a Hugging Face repo id (downloaded and converted once).") -> Decorator:
    """-m/--model, the default model named."""
    return click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True, help=help)


def download_option(f: Callable) -> Callable:
    """--keep-download/--drop-download for commands that convert a repo id on first use (sets $MLX_GPTOSS_KEEP_DOWNLOAD)."""

    def set_env(ctx: click.Context, param: click.Parameter, value: bool | None) -> None:
        if value is not None:
            os.environ["MLX_GPTOSS_KEEP_DOWNLOAD"] = "1" if value else "0"

    return click.option("--keep-download/--drop-download", default=None, expose_value=False, callback=set_env,
                        help="When a repo id is converted on first use: keep its download in the Hugging Face cache "
                             "[default: keep, or $MLX_GPTOSS_KEEP_DOWNLOAD]")(f)  # fmt: skip


adapter_option = click.option(
    "--adapter",
    default=None,
    type=click.Path(file_okay=False),
    help="A LoRA adapter folder (mlx-gptoss, PEFT or mlx-lm) to apply, unfused.",
)
effort_option = click.option(
    "--reasoning-effort", type=click.Choice(["low", "medium", "high"]), default="medium", show_default=True
)
progress_option = click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
shard_size_option = click.option("--shard-size", default="4GB", show_default=True, help="Largest output file.")


def memory_options(what: str = "the longest prompt + reply") -> Decorator:
    """--memory-budget and --context (what the KV cache is reserved for: ``what``)."""

    def needs_budget(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        # click handles the options given on the command line first, then the others: an unset
        # --memory-budget comes after every option given, so whether they were given is known here
        if value is None:
            refuse_ignored(ctx, {
                "context": (True, "needs --memory-budget: it sizes the KV cache a budget reserves (without a budget "
                                  "the model keeps its whole context)"),
                "show_plan": (True, "needs --memory-budget: the plan is how a budget is spent (without one, "
                                    "everything stays resident)"),
            })  # fmt: skip
        return value

    return _stack(
        click.option(
            "--memory-budget",
            default=None,
            callback=needs_budget,
            help="Keep memory under this, e.g. 9.5GB (see `mlx-gptoss doctor`).",
        ),  # fmt: skip
        click.option(
            "--context",
            default=8192,
            show_default=True,
            type=Number(integer=True, min=1, max=INT_MAX),
            help=f"With --memory-budget: {what} to reserve the KV cache for.",
        ),  # fmt: skip
    )


def sampling_options(f: Callable) -> Callable:
    """--temp, --top-p, --top-k, --min-p and --seed."""
    return _stack(
        click.option("--temp", default=0.0, show_default=True, type=Number(min=0), help="Temperature, >= 0 (0 = greedy)."),
        click.option(
            "--top-p",
            default=1.0,
            show_default=True,
            type=Number(min=0, max=1, min_open=True),
            help="Nucleus sampling: keep the most likely tokens up to this probability, in (0, 1].",
        ),  # fmt: skip
        click.option(
            "--top-k",
            default=0,
            show_default=True,
            type=Number(integer=True, min=0, max=INT_MAX),
            help="Sample from the k most likely tokens (0 = all).",
        ),  # fmt: skip
        click.option(
            "--min-p",
            default=0.0,
            show_default=True,
            type=Number(min=0, max=1, max_open=True),
            help="Drop tokens less likely than min-p times the most likely one, in [0, 1) (0 = none).",
        ),  # fmt: skip
        click.option(
            "--seed", default=None, type=Seed(), help="Random seed for reproducible sampling: 0..2**64-1, or -1 for a random one."
        ),  # fmt: skip
    )(f)


def parse_layers(text: str, num_layers: int) -> tuple[int, ...] | None:
    """--layers: "all", "last:N", or a comma list of layer indices."""
    from ..lora.adapters import last_layers  # the LoRA package (and mlx) only when a command parses layers

    text = text.strip()
    if text == "all":
        return None
    try:
        n = int(text[5:]) if text.startswith("last:") else None
        ids = tuple(int(t) for t in text.split(",")) if n is None else None
    except ValueError:
        raise ValueError(f'--layers: expected "all", "last:N" or indices like 0,1,2, got {text!r}') from None
    return last_layers(n, num_layers) if n is not None else ids
