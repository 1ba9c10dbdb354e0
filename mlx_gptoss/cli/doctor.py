"""``doctor``: this machine, a model's memory plan, the kernels' self-check."""

from __future__ import annotations

import click

from .common import INT_MAX, Fail, Number, parse_layers, refuse_ignored


@click.command()
@click.option("-m", "--model", default=None, help="A converted model folder, or a repo id converted before, to size up.")
@click.option("--context", default=8192, show_default=True, type=Number(integer=True, min=1, max=INT_MAX),
              help="With -m: the context to plan the KV cache for.")  # fmt: skip
@click.option("--train-seq-len", default=None, type=Number(integer=True, min=2, max=INT_MAX),
              help="With -m: plan LoRA training on sequences this long instead.")  # fmt: skip
@click.option("--lora-rank", default=8, show_default=True, type=Number(integer=True, min=1, max=INT_MAX),
              help="With --train-seq-len.")  # fmt: skip
@click.option("--lora-targets", default="attention", show_default=True, help="With --train-seq-len: attention, router, experts.")
@click.option("--lora-layers", default="all", show_default=True, help='With --train-seq-len: "all", "last:N" or 0,1,2.')
@click.option("--kernels", "check_kernels", is_flag=True,
              help="Check the custom GPU kernels against their twins and time them: a report to paste into an issue.")  # fmt: skip
def doctor(model: str | None, context: int, train_seq_len: int | None, lora_rank: int, lora_targets: str, lora_layers: str,
           check_kernels: bool) -> None:  # fmt: skip
    """This machine's memory and GPU limit, the model's components, and a budget that fits."""
    from mlx_gptoss.doctor import kernels_report, report

    lora = ("lora_rank", "lora_targets", "lora_layers")
    if check_kernels:
        rules = {name: (True, "has no effect with --kernels (it checks the kernels, it sizes up no model)")
                 for name in ("model", "context", "train_seq_len", *lora)}  # fmt: skip
    else:
        rules = {"context": (model is None, "needs -m/--model: it sizes up a model"),
                 "train_seq_len": (model is None, "needs -m/--model: it sizes up a model"),
                 **{name: (train_seq_len is None, "needs --train-seq-len: only then does doctor plan LoRA training")
                    for name in lora}}  # fmt: skip
    refuse_ignored(click.get_current_context(), rules)
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
        if train_seq_len is not None:
            n_layers = GptOssConfig.from_file(path / "config.json").num_hidden_layers
            spec = LoRASpec(rank=lora_rank, alpha=2.0 * lora_rank, targets=tuple(t.strip() for t in lora_targets.split(",")),
                            layers=parse_layers(lora_layers, n_layers))  # fmt: skip
        click.echo(report(path, context, train_seq_len=train_seq_len, lora_spec=spec))
    except (ValueError, OSError) as e:
        raise Fail(str(e)) from None
