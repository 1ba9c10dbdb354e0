"""What the commands share: the one-line error, and each option set defined once."""

from __future__ import annotations

import os
from collections.abc import Callable

import click

from ..paths import DEFAULT_MODEL

Decorator = Callable[[Callable], Callable]


class Fail(click.ClickException):
    """A clear one-line error (click prints it as "Error: ..." and exits with status 1)."""


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
    return _stack(
        click.option("--memory-budget", default=None, help="Keep memory under this, e.g. 9.5GB (see `mlx-gptoss doctor`)."),
        click.option(
            "--context",
            default=8192,
            show_default=True,
            type=click.IntRange(min=1),
            help=f"With --memory-budget: {what} to reserve the KV cache for.",
        ),  # fmt: skip
    )


def sampling_options(f: Callable) -> Callable:
    """--temp, --top-p, --top-k, --min-p and --seed."""
    return _stack(
        click.option("--temp", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 = greedy."),
        click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True)),
        click.option(
            "--top-k",
            default=0,
            show_default=True,
            type=click.IntRange(min=0),
            help="Sample from the k most likely tokens (0 = all).",
        ),  # fmt: skip
        click.option(
            "--min-p",
            default=0.0,
            show_default=True,
            type=click.FloatRange(0, 1, max_open=True),
            help="Drop tokens less likely than min-p times the most likely one (0 = none).",
        ),  # fmt: skip
        click.option("--seed", default=None, type=int, help="Random seed, for reproducible sampling."),
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
