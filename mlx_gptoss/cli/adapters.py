"""``lora fuse`` and ``lora export``: the commands on adapter files, on the ``lora`` group of :mod:`.lora`."""

from __future__ import annotations

import click

from .common import INT_MAX, Fail, Number, model_option
from .lora import lora

# how the library's errors spell fuse's options here
_FUSE_FLAGS = {
    "dtype": "--dtype",
    "check_tokens": "--check-tokens",
    "allow_loss": "--allow-loss",
    "experts_bf16": "--experts-bf16",
}


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
    type=Number(integer=True, min=0, max=INT_MAX),
    help="Random tokens for the KL check of fused against unfused (0: skip it; at most the model's context).",
)
@click.option(
    "--allow-loss",
    is_flag=True,
    help="Write the fused model even when the stored precision loses more than half of the update (refused otherwise).",
)
def lora_fuse(model: str, adapter: str, output: str, experts_bf16: bool, dtype: str | None, check_tokens: int,
              allow_loss: bool) -> None:  # fmt: skip
    """Merge an adapter's attention and router updates into a new model folder; report the error."""
    from mlx_gptoss.lora.fuse import fuse
    from mlx_gptoss.tokenizer import TokenizerError

    try:
        fuse(model, adapter, output, experts_bf16=experts_bf16, dtype=dtype, check_tokens=check_tokens,
             allow_loss=allow_loss, names=_FUSE_FLAGS)  # fmt: skip
    except (ValueError, TokenizerError) as e:
        raise Fail(str(e)) from None
    except OSError as e:  # a failed write: the partial folder is already removed
        raise Fail(
            f"{output}: fuse failed, nothing was left behind: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
        ) from None


@lora.command("export")
@click.argument("adapter", type=click.Path(file_okay=False))
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--format", "fmt", required=True, type=click.Choice(["peft", "mlx-lm"]), help="The tool to write the adapter for.")
@click.option(
    "-m",
    "--model",
    default=None,
    help="The base model: needed to read a PEFT or mlx-lm adapter (their shapes are read against it); "
    "an mlx-gptoss adapter is checked against it when given.",
)
@click.option(
    "--force", is_flag=True, help="Replace DST if it is empty or holds an earlier export of this format and nothing else."
)
def lora_export(adapter: str, dst: str, fmt: str, model: str | None, force: bool) -> None:
    """Write ADAPTER (mlx-gptoss, PEFT or mlx-lm) as a PEFT or mlx-lm adapter folder DST."""
    from mlx_gptoss.lora.io import export_adapter
    from mlx_gptoss.tokenizer import TokenizerError

    try:
        out = export_adapter(adapter, dst, fmt=fmt, model=model, force=force, names={"force": "--force", "model": "-m MODEL"})
    except (ValueError, TokenizerError) as e:
        raise Fail(str(e)) from None
    except OSError as e:  # a failed write: the partial folder is already removed
        raise Fail(
            f"{dst}: export failed, nothing was left behind: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
        ) from None
    click.echo(f"wrote the {fmt} adapter {out}", err=True)
