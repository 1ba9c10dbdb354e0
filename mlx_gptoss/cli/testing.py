"""``testing``: tiny models to try every command on, and to test apps against."""

from __future__ import annotations

import click

from .common import Fail, Number

MAX_VOCAB = 2**20  # a "tiny" model's embedding stays under a few hundred MB (the release's vocabulary: 201,088)


@click.group()
def testing() -> None:
    """Tools for tests: tiny random models (no download)."""


@testing.command("tiny-model")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--layout", type=click.Choice(["converted", "hf", "hf-dense", "original", "mlx-lm"]), default="converted",
              show_default=True, help="converted: ready to load; the others: a folder to try `mlx-gptoss convert` on.")  # fmt: skip
@click.option("--vocab", default="real", show_default=True,
              help='"real": the release\'s vocabulary and tokenizer (chat, tools, server work); or a vocabulary size (token ids only).')  # fmt: skip
@click.option("--layers", default=2, show_default=True, type=Number(integer=True, min=1, max=64))
@click.option("--seed", default=0, show_default=True, type=Number(integer=True, min=0, max=2**63 - 1))
@click.option("--reply", default=None,
              help="Rig the weights so greedy decoding answers this, whatever the prompt (plain text, or harmony).")  # fmt: skip
def tiny_model(dst: str, layout: str, vocab: str, layers: int, seed: int, reply: str | None) -> None:
    """Write a tiny random gpt-oss model (a few MB, loads in a second) into DST."""
    from mlx_gptoss.options import OptionError, check_number
    from mlx_gptoss.testing import tiny_model as write

    try:
        size: str | int = "real" if vocab == "real" else check_number("--vocab", int(vocab), integer=True, min=2, max=MAX_VOCAB)
    except OptionError as e:  # before anything is allocated
        raise Fail(f'{e} (or "real")') from None
    except ValueError:
        raise Fail(f'--vocab: expected "real" or a number, got {vocab!r}') from None
    try:
        out = write(dst, layout=layout, vocab=size, layers=layers, seed=seed, rig=reply)
    except (ValueError, OSError) as e:
        raise Fail(str(e)) from None
    click.echo(f"wrote a tiny model ({layout}) into {out}", err=True)
    if layout == "converted":
        click.echo(f"try: mlx-gptoss generate -m {out} 'Hello'", err=True)
    else:
        click.echo(f"try: mlx-gptoss convert {out} {out}-converted", err=True)
