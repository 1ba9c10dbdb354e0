"""``doctor``: this machine, a model's memory plan, the kernels' self-check."""

from __future__ import annotations

import click

from .common import Fail, parse_layers


@click.command()
@click.option("-m", "--model", default=None, help="A converted model folder, or a repo id converted before, to size up.")
@click.option("--context", default=8192, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--train-seq-len", default=None, type=click.IntRange(min=2), help="Plan LoRA training on sequences this long instead."
)
@click.option("--lora-rank", default=8, show_default=True, type=click.IntRange(min=1), help="With --train-seq-len.")
@click.option("--lora-targets", default="attention", show_default=True, help="With --train-seq-len: attention, router, experts.")
@click.option("--lora-layers", default="all", show_default=True, help='With --train-seq-len: "all", "last:N" or 0,1,2.')
@click.option("--kernels", "check_kernels", is_flag=True,
              help="Check the custom GPU kernels against their twins and time them: a report to paste into an issue.")  # fmt: skip
def doctor(model: str | None, context: int, train_seq_len: int | None, lora_rank: int, lora_targets: str, lora_layers: str,
           check_kernels: bool) -> None:  # fmt: skip
    """This machine's memory and GPU limit, the model's components, and a budget that fits."""
    from mlx_gptoss.doctor import kernels_report, report

    if check_kernels:
        click.echo(kernels_report())
        return
    from mlx_gptoss.config import GptOssConfig
    from mlx_gptoss.lora.adapters import LoRASpec
    from mlx_gptoss.models import resolve_model

    try:
        spec = None
        # a repo id names its converted copy in the cache; doctor never starts a download
        path = None if model is None else resolve_model(model, convert=False)
        if train_seq_len is not None and path is not None:
            n_layers = GptOssConfig.from_file(path / "config.json").num_hidden_layers
            spec = LoRASpec(rank=lora_rank, alpha=2.0 * lora_rank, targets=tuple(t.strip() for t in lora_targets.split(",")),
                            layers=parse_layers(lora_layers, n_layers))  # fmt: skip
        click.echo(report(path, context, train_seq_len=train_seq_len, lora_spec=spec))
    except (ValueError, OSError) as e:
        raise Fail(str(e)) from None
