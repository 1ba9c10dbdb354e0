"""``lora fuse`` (and the other commands on adapter files), on the ``lora`` group of :mod:`.lora`."""

from __future__ import annotations

import click

from .common import Fail, model_option
from .lora import lora


@lora.command("fuse")
@model_option("The converted base model the adapter was trained on.")
@click.option(
    "--adapter", required=True, type=click.Path(file_okay=False), help="The adapter folder (mlx-gptoss, PEFT or mlx-lm)."
)
@click.option(
    "-o", "--output", required=True, type=click.Path(file_okay=False), help="The fused model's folder (must not exist)."
)
@click.option("--experts-bf16", is_flag=True, help="Fuse expert adapters into dense bf16 experts (not supported yet: says why).")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default=None,
    help="Storage of the merged float weights (default: the base's; float32 keeps the whole update).",
)
@click.option(
    "--check-tokens",
    default=64,
    show_default=True,
    type=click.IntRange(min=0),
    help="Random tokens for the KL check of fused against unfused (0: skip it).",
)
def lora_fuse(model: str, adapter: str, output: str, experts_bf16: bool, dtype: str | None, check_tokens: int) -> None:
    """Merge an adapter's attention and router updates into a new model folder; report the error."""
    from mlx_gptoss.lora.fuse import fuse
    from mlx_gptoss.tokenizer import TokenizerError

    try:
        fuse(model, adapter, output, experts_bf16=experts_bf16, dtype=dtype, check_tokens=check_tokens)
    except (ValueError, TokenizerError) as e:
        raise Fail(str(e)) from None
    except OSError as e:  # a failed write: the partial folder is already removed
        raise Fail(
            f"{output}: fuse failed, nothing was left behind: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
        ) from None
