"""``lora``: the command group, and ``train`` an adapter on your data (:mod:`.adapters` adds the adapter-file commands)."""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from pathlib import Path

import click

from .common import Fail, download_option, model_option, parse_layers, progress_option


@click.group()
def lora() -> None:
    """LoRA fine-tuning: train adapters for a model on your own data."""


@click.command("train")
@model_option()
@click.option(
    "--data",
    required=True,
    type=click.Path(dir_okay=False),
    help="Training data: JSON lines (chats, harmony conversations, prompt/completion, text).",
)
@click.option("--valid", default=None, type=click.Path(dir_okay=False), help="Validation data, same formats.")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(file_okay=False),
    help="The adapter folder; it also holds the checkpoints and metrics.",
)
@click.option("--rank", default=8, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--alpha",
    default=16.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="The update is scaled by alpha / rank.",
)
@click.option("--targets", default="attention", show_default=True, help="Comma list of attention, router, experts.")
@click.option("--layers", default="all", show_default=True, help='"all", "last:N" or layer indices like 0,1,2.')
@click.option("--lr", default=1e-4, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Peak learning rate.")
@click.option("--warmup", default=None, type=click.IntRange(min=0), help="Warm-up steps (default: 10%% of the run, at most 100).")
@click.option("--schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True)
@click.option("--iters", default=None, type=click.IntRange(min=1), help="Optimizer steps (or --epochs; default 1 epoch).")
@click.option("--epochs", default=None, type=click.IntRange(min=1), help="Passes over the training data.")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--grad-accum", default=1, show_default=True, type=click.IntRange(min=1), help="Micro-batches per step.")
@click.option("--max-seq-len", default=2048, show_default=True, type=click.IntRange(min=2))
@click.option(
    "--train-on",
    type=click.Choice(["final", "assistant"]),
    default="final",
    show_default=True,
    help="Train the final answers only, or everything the assistant writes (reasoning, tool calls, final).",
)
@click.option(
    "--overflow",
    type=click.Choice(["skip", "truncate"]),
    default="skip",
    show_default=True,
    help="What to do with an example longer than --max-seq-len.",
)
@click.option(
    "--memory-budget",
    default=None,
    help="Keep memory under this, e.g. 9.5GB, planned for training: adapters, AdamW, one step's activations for --max-seq-len (see `mlx-gptoss doctor --train-seq-len`).",
)
@click.option(
    "--save-every", default=100, show_default=True, type=click.IntRange(min=0), help="Checkpoint every N steps (0: at the end)."
)
@click.option(
    "--eval-every",
    default=100,
    show_default=True,
    type=click.IntRange(min=0),
    help="Validation loss every N steps (0: at the end).",
)
@click.option("--eval-batches", default=25, show_default=True, type=click.IntRange(min=1))
@click.option("--resume", is_flag=True, help="Continue the run saved in the output folder (its adapter options are kept).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--metrics", default=None, type=click.Path(dir_okay=False), help="JSON lines of metrics (default: OUTPUT/metrics.jsonl)."
)
@click.option("--plot", is_flag=True, help="Draw the loss curve into OUTPUT/loss.png (needs matplotlib).")
@progress_option
@download_option
def lora_train(model: str, data: str, valid: str | None, output: str, rank: int, alpha: float, targets: str, layers: str,
               lr: float, warmup: int | None, schedule: str, iters: int | None, epochs: int | None, batch_size: int,
               grad_accum: int, max_seq_len: int, train_on: str, overflow: str, memory_budget: str | None,
               save_every: int, eval_every: int, eval_batches: int, resume: bool, seed: int, metrics: str | None,
               plot: bool, progress: bool | None) -> None:  # fmt: skip
    """Train a LoRA adapter on --data into OUTPUT (Ctrl-C saves a checkpoint; --resume continues)."""
    from tqdm import tqdm

    from mlx_gptoss.api import load
    from mlx_gptoss.lora.adapters import LoRASpec, apply_lora
    from mlx_gptoss.lora.checkpoint import latest_checkpoint, resume_state
    from mlx_gptoss.lora.data import load_dataset
    from mlx_gptoss.lora.plan import training_plan
    from mlx_gptoss.lora.plot import plot_metrics, require_matplotlib
    from mlx_gptoss.lora.train import TrainConfig, refuse_finished_adapter, refuse_model_folder, train
    from mlx_gptoss.models import resolve_config
    from mlx_gptoss.tokenizer import TokenizerError

    out = Path(output).expanduser()
    cfg = TrainConfig(out, iterations=iters, epochs=epochs, batch_size=batch_size, grad_accumulation=grad_accum,
                      learning_rate=lr, schedule=schedule, warmup=warmup, seed=seed, max_seq_len=max_seq_len,
                      save_every=save_every, eval_every=eval_every, eval_batches=eval_batches, metrics_file=metrics)  # fmt: skip
    try:
        cfg.validate()
        if plot:
            require_matplotlib()
        refuse_model_folder(out)  # before the model loads: fail fast
        saved_spec = resume_state(out)["spec"] if resume else None
        if not resume and latest_checkpoint(out) is not None:  # before the model loads: fail fast
            raise ValueError(f"{out} holds a training checkpoint: add --resume, or train into another folder")
        if not resume:
            refuse_finished_adapter(out)
        for path in (data, valid):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{path}: no such file")
        path, config = resolve_config(model)
        if saved_spec is not None:
            spec = LoRASpec.from_dict(saved_spec)
        else:
            spec = LoRASpec(rank=rank, alpha=alpha, targets=tuple(t.strip() for t in targets.split(",")),
                            layers=parse_layers(layers, config.num_hidden_layers))  # fmt: skip
        # the budget planned for training (adapters, optimizer, activations), not for inference
        plan = None if memory_budget is None else training_plan(path, spec, cfg, memory_budget)
        lm = load(path, memory_budget=plan, verbose=plan is not None)
        if lm.tokenizer is None:
            raise ValueError(f"{model}: no tokenizer next to the weights; training data cannot be tokenized")
        opts = {"train_on": train_on, "max_seq_len": max_seq_len, "overflow": overflow}
        train_ds = load_dataset(data, lm.tokenizer.encoding, **opts)
        click.echo(train_ds.summary(), err=True)
        valid_ds = None
        if valid is not None:
            valid_ds = load_dataset(valid, lm.tokenizer.encoding, **opts)
            click.echo(valid_ds.summary(), err=True)
        if not train_ds.examples:
            raise ValueError(f"{data}: no example left to train on")
        apply_lora(lm, spec, seed=seed)
    except (ValueError, OSError, TokenizerError, NotImplementedError) as e:
        raise Fail(str(e)) from None
    click.echo(f"LoRA rank {spec.rank}, alpha {spec.alpha:g} on {', '.join(spec.targets)}, "
               f"layers {'all' if spec.layers is None else ','.join(map(str, spec.layers))}", err=True)  # fmt: skip

    cancel = threading.Event()

    def on_sigint(signum, frame) -> None:  # noqa: ANN001
        if cancel.is_set():  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        cancel.set()
        click.echo("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)", err=True)

    bar = tqdm(total=cfg.total_steps(len(train_ds.examples)), unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=not (sys.stderr.isatty() if progress is None else progress))  # fmt: skip

    def on_progress(p) -> None:  # noqa: ANN001
        if p.kind == "eval":
            if p.val_loss is not None:
                bar.write(f"step {p.step}: validation loss {p.val_loss:.4f}", file=sys.stderr)
            return
        bar.update(p.step - bar.n)
        loss = "skipped" if p.loss is None else f"{p.loss:.4f}"
        bar.set_postfix_str(f"loss {loss}, {p.tokens_per_s:.0f} tok/s, peak {p.peak_memory_gb:.2f} GB", refresh=False)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = train(lm, train_ds, valid_ds, cfg, spec=spec, on_progress=on_progress, cancel=cancel, resume=resume)
    except (ValueError, OSError) as e:
        raise Fail(str(e)) from None
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
    val = "" if result.val_loss is None else f", validation loss {result.val_loss:.4f}"
    last = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
    click.echo(f"{result.status} at step {result.steps}/{result.total_steps}: loss {last}{val}, "
               f"{result.trained_tokens:,} trained tokens in {result.elapsed_s:.1f} s, "
               f"peak memory {result.peak_memory_gb:.2f} GB; adapter in {out}", err=True)  # fmt: skip
    if result.status == "cancelled":
        args = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
        click.echo(f"checkpoint saved; resume with: {shlex.join(['mlx-gptoss', *args])}", err=True)
    if plot:
        click.echo(f"loss curve: {plot_metrics(cfg.metrics_path, out / 'loss.png')}", err=True)


lora.add_command(lora_train)
