"""``lora``: the command group, and ``train`` an adapter on your data (:mod:`.adapters` adds the adapter-file commands)."""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
from pathlib import Path

import click

from ..options import SEED_MAX
from .common import INT_MAX, Fail, Number, download_option, given, model_option, parse_layers, progress_option


@click.group()
def lora() -> None:
    """LoRA fine-tuning: train adapters for a model on your own data."""


# A resume continues the run its checkpoint records. Adapter and data options are fixed by it (a
# value given that differs is refused); schedule options may change (said on stderr); an option
# left out takes the checkpoint's value. Each: (parameter, section of state.json, field there).
_FIXED = (("seed", "config", "seed"), ("batch_size", "config", "batch_size"), ("grad_accum", "config", "grad_accumulation"),
          ("max_seq_len", "config", "max_seq_len"), ("train_on", "data", "train_on"), ("overflow", "data", "overflow"))  # fmt: skip
_SCHEDULE = (("lr", "learning_rate"), ("warmup", "warmup"), ("schedule", "schedule"), ("save_every", "save_every"),
             ("eval_every", "eval_every"), ("eval_batches", "eval_batches"))  # fmt: skip
_SPEC = ("rank", "alpha", "targets", "layers")


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
    help="The adapter folder (a folder of its own); it also holds the checkpoints and metrics.",
)
@click.option("--rank", default=8, show_default=True, type=Number(integer=True, min=1, max=INT_MAX))
@click.option(
    "--alpha",
    default=16.0,
    show_default=True,
    type=Number(min=0, min_open=True),
    help="The update is scaled by alpha / rank.",
)
@click.option("--targets", default="attention", show_default=True, help="Comma list of attention, router, experts.")
@click.option("--layers", default="all", show_default=True, help='"all", "last:N" or layer indices like 0,1,2.')
@click.option("--lr", default=1e-4, show_default=True, type=Number(min=0, min_open=True), help="Peak learning rate.")
@click.option("--warmup", default=None, type=Number(integer=True, min=0, max=INT_MAX),
              help="Warm-up steps (default: 10% of the run, at most 100).")  # fmt: skip
@click.option("--schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True)
@click.option("--iters", default=None, type=Number(integer=True, min=1, max=INT_MAX),
              help="Optimizer steps (or --epochs; default 1 epoch).")  # fmt: skip
@click.option("--epochs", default=None, type=Number(integer=True, min=1, max=INT_MAX), help="Passes over the training data.")
@click.option("--batch-size", default=1, show_default=True, type=Number(integer=True, min=1, max=INT_MAX))
@click.option("--grad-accum", default=1, show_default=True, type=Number(integer=True, min=1, max=INT_MAX),
              help="Micro-batches per step.")  # fmt: skip
@click.option("--max-seq-len", default=2048, show_default=True, type=Number(integer=True, min=2, max=INT_MAX))
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
@click.option("--save-every", default=100, show_default=True, type=Number(integer=True, min=0, max=INT_MAX),
              help="Checkpoint every N steps (0: at the end).")  # fmt: skip
@click.option("--eval-every", default=100, show_default=True, type=Number(integer=True, min=0, max=INT_MAX),
              help="Validation loss every N steps (0: at the end).")  # fmt: skip
@click.option("--eval-batches", default=25, show_default=True, type=Number(integer=True, min=1, max=INT_MAX))
@click.option("--resume", is_flag=True,
              help="Continue the run saved in the output folder (its adapter, data and seed options are kept; "
                   "schedule options may change).")  # fmt: skip
@click.option("--seed", default=0, show_default=True, type=Number(integer=True, min=0, max=SEED_MAX))
@click.option(
    "--metrics",
    default=None,
    type=click.Path(dir_okay=False),
    help="JSON lines of metrics (default: OUTPUT/metrics.jsonl): a new file, or one lora train wrote.",
)
@click.option("--plot", is_flag=True, help="Draw the loss curve into OUTPUT/loss.png (needs matplotlib).")
@progress_option
@download_option
@click.pass_context
def lora_train(ctx: click.Context, model: str, data: str, valid: str | None, output: str, rank: int, alpha: float,
               targets: str, layers: str, lr: float, warmup: int | None, schedule: str, iters: int | None,
               epochs: int | None, batch_size: int, grad_accum: int, max_seq_len: int, train_on: str, overflow: str,
               memory_budget: str | None, save_every: int, eval_every: int, eval_batches: int, resume: bool, seed: int,
               metrics: str | None, plot: bool, progress: bool | None) -> None:  # fmt: skip
    """Train a LoRA adapter on --data into OUTPUT (Ctrl-C saves a checkpoint and exits 130; --resume continues).

    Exit status: 0 completed, 1 an error (a refused option, folder or checkpoint; a run that
    diverged), 2 a usage error, 130 stopped by Ctrl-C (a checkpoint was saved).
    """
    from mlx_gptoss.lora.train import check_output_dir, output_lock, refuse_model_folder

    out = Path(output).expanduser()
    with contextlib.ExitStack() as held:
        try:
            check_output_dir(output, name="-o/--output")  # the filesystem root, '', the current or home folder
            refuse_model_folder(out)  # before the model loads: fail fast
            out.parent.mkdir(parents=True, exist_ok=True)
            held.enter_context(output_lock(out))  # before anything loads: a busy folder is refused at once
        except (ValueError, OSError) as e:
            raise Fail(str(e)) from None
        _train(ctx, out, dict(ctx.params))


def _train(ctx: click.Context, out: Path, o: dict) -> None:
    """``lora train`` holding OUTPUT's lock: the checks that need no model, then the model, the data and the run."""
    from tqdm import tqdm

    from mlx_gptoss.api import load
    from mlx_gptoss.lora.adapters import LoRASpec, apply_lora
    from mlx_gptoss.lora.checkpoint import latest_checkpoint, resume_state
    from mlx_gptoss.lora.data import load_dataset
    from mlx_gptoss.lora.io import base_fingerprint
    from mlx_gptoss.lora.plan import check_adapter_memory, training_plan
    from mlx_gptoss.lora.plot import plot_metrics, require_matplotlib
    from mlx_gptoss.lora.train import (
        TrainConfig,
        TrainingDivergedError,
        check_metrics_file,
        refuse_finished_adapter,
        train,
    )
    from mlx_gptoss.models import resolve_config
    from mlx_gptoss.tokenizer import TokenizerError

    notes: list[str] = []
    try:
        if o["iters"] is not None and o["epochs"] is not None:
            raise ValueError("give --iters or --epochs, not both")
        if o["plot"]:
            require_matplotlib()
        state = resume_state(out) if o["resume"] else None
        if state is None and latest_checkpoint(out) is not None:  # before the model loads: fail fast
            found = resume_state(out)
            at = f"step {found['step']}/{found['total_steps']}"
            if found["step"] >= found["total_steps"]:
                raise ValueError(f"{out} holds a finished training run ({at}): train into another folder, or train it "
                                 "further with --resume and a larger --iters (or --epochs)")  # fmt: skip
            raise ValueError(f"{out} holds a training checkpoint at {at}: add --resume to continue it, or train into "
                             "another folder")  # fmt: skip
        if state is None:
            refuse_finished_adapter(out)
        for path in (o["data"], o["valid"]):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{path}: no such file")
        if state is not None:
            notes = _resume_options(ctx, o, state, out)
        metrics = Path(o["metrics"]) if o["metrics"] is not None else None
        cfg = TrainConfig(out, iterations=o["iters"], epochs=o["epochs"], batch_size=o["batch_size"],
                          grad_accumulation=o["grad_accum"], learning_rate=o["lr"], schedule=o["schedule"],
                          warmup=o["warmup"], seed=o["seed"], max_seq_len=o["max_seq_len"], save_every=o["save_every"],
                          eval_every=o["eval_every"], eval_batches=o["eval_batches"], metrics_file=metrics)  # fmt: skip
        cfg.validate()
        files = [("training data (--data)", o["data"]), ("validation data (--valid)", o["valid"])]
        model_dir = Path(o["model"]) if Path(o["model"]).is_dir() else None
        name = "--metrics" if o["metrics"] is not None else "the metrics file"
        check_metrics_file(cfg.metrics_path, data_files=files, model_dir=model_dir, name=name)
        if state is not None:
            _resume_progress(state, cfg, out, o["data"])
        path, config = resolve_config(o["model"])
        check_metrics_file(cfg.metrics_path, data_files=files, model_dir=path, name=name)
        if state is not None:
            spec = _resume_spec(ctx, o, state, config.num_hidden_layers)
            found_fp, saved_fp = base_fingerprint(path), state["base_fingerprint"]
            if found_fp != saved_fp:
                raise ValueError(f"{o['model']}: this base model is {found_fp[:19]}..., but the run in {out} was trained on "
                                 f"{saved_fp[:19]}...: resume it on the model it was trained on, or train into another folder")  # fmt: skip
        else:
            spec = LoRASpec(rank=o["rank"], alpha=o["alpha"], targets=tuple(t.strip() for t in o["targets"].split(",")),
                            layers=parse_layers(o["layers"], config.num_hidden_layers))  # fmt: skip
        check_adapter_memory(config, spec, o["memory_budget"], rank_name="--rank")  # before anything is allocated
        for line in notes:
            click.echo(line, err=True)
        # the budget planned for training (adapters, optimizer, activations), not for inference
        plan = None if o["memory_budget"] is None else training_plan(path, spec, cfg, o["memory_budget"])
        lm = load(path, memory_budget=plan, verbose=plan is not None)
        if lm.tokenizer is None:
            raise ValueError(f"{o['model']}: no tokenizer next to the weights; training data cannot be tokenized")
        opts = {"train_on": o["train_on"], "max_seq_len": cfg.max_seq_len, "overflow": o["overflow"]}
        train_ds = load_dataset(o["data"], lm.tokenizer.encoding, **opts)
        click.echo(train_ds.summary(), err=True)
        valid_ds = None
        if o["valid"] is not None:
            valid_ds = load_dataset(o["valid"], lm.tokenizer.encoding, **opts)
            click.echo(valid_ds.summary(), err=True)
        if not train_ds.examples:
            raise ValueError(f"{o['data']}: no example left to train on")
        apply_lora(lm, spec, seed=cfg.seed)
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
               disable=not (sys.stderr.isatty() if o["progress"] is None else o["progress"]))  # fmt: skip

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
        result = train(lm, train_ds, valid_ds, cfg, spec=spec, on_progress=on_progress, cancel=cancel, resume=o["resume"])
    except TrainingDivergedError as e:
        raise Fail(_diverged(e, cfg.learning_rate)) from None
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
    if o["plot"]:
        click.echo(f"loss curve: {plot_metrics(cfg.metrics_path, out / 'loss.png')}", err=True)
    if result.status == "cancelled":
        ctx.exit(130)  # stopped by Ctrl-C, as generate: 128 + SIGINT


def _resume_options(ctx: click.Context, o: dict, state: dict, out: Path) -> list[str]:
    """Fill ``o`` from the checkpoint (``state``) for every option left out; refuse a fixed option
    given with another value; return the notes for the schedule options given with another value."""
    from mlx_gptoss.lora.train import recorded_metrics_path

    config, notes = state["config"], []
    flags = {p.name: max(p.opts, key=len) for p in ctx.command.params if p.opts}
    for param, section, key in _FIXED:
        saved = state[section].get(key)
        if saved is None:  # not recorded (a run trained through the Python API on plain lists): the option holds
            continue
        if given(ctx, param) and o[param] != saved:
            raise ValueError(f"{flags[param]} {o[param]}: the checkpoint in {out} was made with {saved}; what shapes the "
                             "run's data and its order (--train-on, --max-seq-len, --overflow, --seed, --batch-size, "
                             f"--grad-accum) is fixed by its checkpoint: leave {flags[param]} out (or train into "
                             "another folder)")  # fmt: skip
        o[param] = saved
    length = ("iters", "epochs")
    if any(given(ctx, p) for p in length):  # the length of the run: both from the command line, or both kept
        saved = (config.get("iterations"), config.get("epochs"))
        if (o["iters"], o["epochs"]) != saved:
            notes.append(f"note: {_length(o['iters'], o['epochs'])} instead of the checkpoint's {_length(*saved)} "
                         "(schedule options may change on --resume)")  # fmt: skip
    else:
        o["iters"], o["epochs"] = config.get("iterations"), config.get("epochs")
    for param, key in _SCHEDULE:
        if not given(ctx, param):
            o[param] = config.get(key, o[param])
        elif o[param] != config.get(key):
            notes.append(f"note: {flags[param]} {o[param]} instead of the checkpoint's {config.get(key)} "
                         "(schedule options may change on --resume)")  # fmt: skip
    recorded = recorded_metrics_path(state, out)
    if o["metrics"] is not None and Path(o["metrics"]).resolve() != recorded.resolve():
        raise ValueError(f"--metrics {o['metrics']}: the run in {out} writes its metrics into {recorded} (its checkpoint "
                         "records it): leave --metrics out")  # fmt: skip
    o["metrics"] = str(recorded)
    return notes


def _length(iters: int | None, epochs: int | None) -> str:
    return f"--iters {iters}" if iters is not None else f"--epochs {epochs or 1}"


def _resume_progress(state: dict, cfg, out: Path, data: str) -> None:  # noqa: ANN001 (a TrainConfig)
    """Refuse a resume with nothing left to train, or on data that changed since its checkpoint."""
    import hashlib

    step, total = state["step"], cfg.total_steps(state["run"]["n_train"])
    if step >= total:
        more = "--iters (or --epochs)" if step == total else f"--iters beyond {step}"
        done = "finished at" if step == total else "is past this run's length, at"
        raise ValueError(f"{out}: the run {done} step {step}/{total}: nothing left to train; give a larger {more} "
                         "with --resume to train it further")  # fmt: skip
    saved = state["data"].get("train_sha256")
    if saved is not None and hashlib.sha256(Path(data).read_bytes()).hexdigest() != saved:
        raise ValueError(f"--data {data}: its content changed since the checkpoint in {out} (sha256 {saved[:12]}... then); "
                         "a resumed run trains on the same data: restore it, or train into another folder")  # fmt: skip


def _resume_spec(ctx: click.Context, o: dict, state: dict, num_layers: int):  # noqa: ANN202 (a LoRASpec)
    """The checkpoint's adapter; an adapter option given with another value is refused."""
    from mlx_gptoss.lora.adapters import LoRASpec

    if state["spec"] is None:
        raise ValueError("the checkpoint holds no LoRA adapter (a run of the Python API training other weights)")
    saved = LoRASpec.from_dict(state["spec"])
    asked = {}
    if given(ctx, "rank"):
        asked["rank"] = (o["rank"], saved.rank)
    if given(ctx, "alpha"):
        asked["alpha"] = (o["alpha"], saved.alpha)
    if given(ctx, "targets"):
        targets = LoRASpec(targets=tuple(t.strip() for t in o["targets"].split(","))).targets
        asked["targets"] = (",".join(targets), ",".join(saved.targets))
    if given(ctx, "layers"):
        ids = LoRASpec(layers=parse_layers(o["layers"], num_layers)).layer_ids(num_layers)
        have = saved.layer_ids(num_layers)
        asked["layers"] = (",".join(map(str, ids)), ",".join(map(str, have)))
    for name, (value, kept) in asked.items():
        if value != kept:
            shown = o[name] if name in ("targets", "layers") else value
            raise ValueError(f"--{name} {shown}: the checkpoint's adapter has {name} {kept}; adapter options are fixed by "
                             f"the checkpoint: leave --{name} out (or train into another folder)")  # fmt: skip
    return saved


def _diverged(e, peak: float) -> str:  # noqa: ANN001 (a TrainingDivergedError)
    """The CLI's words for a diverged run: the step, and the way on (a lower --lr)."""
    where = (f"the last good state (step {e.step - 1}) is saved: resume it with --resume and a lower --lr"
             if e.checkpoint is not None else "nothing was trained yet: train again with a lower --lr")  # fmt: skip
    return (
        f"training diverged at step {e.step}: its {e.what} is not finite, so it was not applied; {where} "
        f"(e.g. --lr {peak / 10:g}; this step's rate was {e.learning_rate:g})"
    )


lora.add_command(lora_train)
