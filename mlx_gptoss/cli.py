"""``mlx-gptoss``: thin commands over the library (heavy imports happen inside each command)."""

from __future__ import annotations

import json
import sys

import click

DEFAULT_MODEL = "openai/gpt-oss-20b"


class _Fail(click.ClickException):
    """A clear one-line error (click prints it as "Error: ..." and exits with status 1)."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-gptoss")
def main() -> None:
    """gpt-oss on MLX: convert released checkpoints, generate text, chat."""


@main.command()
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace DST if it is an earlier mlx-gptoss conversion (or empty).")
@click.option("--layout", type=click.Choice(["hf", "hf-dense", "hf-dense-t", "original", "mlx-lm"]), default=None,
              help="Source layout (default: detected from the tensor names; hf-dense-t: dense experts [E, out, in]).")  # fmt: skip
@click.option("--shard-size", default="4GB", show_default=True, help="Largest output file.")
@click.option(
    "--preset",
    type=click.Choice(["none", "16gb"]),
    default="none",
    show_default=True,
    help="Storage of the non-expert weights: 16gb = attention and unembedding 8-bit, embedding 8-bit.",
)
@click.option("--attention", default=None, help="Attention weights: 8, 6, 4 (affine, groups of 64), 4g32, mxfp8 or none.")
@click.option("--lm-head", default=None, help="Unembedding: as --attention.")
@click.option("--embedding", default=None, help="Embedding: as --attention.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
@click.option("--revision", default=None, help="With a repo id: the branch, tag or commit to download (default: main).")
@click.option("--keep-download/--drop-download", default=None,
              help="With a repo id: keep the download in the Hugging Face cache after converting  [default: keep, "
                   "or $MLX_GPTOSS_KEEP_DOWNLOAD]")  # fmt: skip
def convert(src: str, dst: str, force: bool, layout: str | None, shard_size: str, preset: str, attention: str | None,
            lm_head: str | None, embedding: str | None, progress: bool | None, revision: str | None,
            keep_download: bool | None) -> None:  # fmt: skip
    """Convert a checkpoint SRC (folder or Hugging Face repo id) into DST.

    SRC may be in the released Hugging Face layout (MXFP4 experts), openai's original/ layout,
    mlx-lm's layout (mlx-community exports, mlx-vlm's language_model. prefix included), or a
    Hugging Face layout with dense experts (quantized to MXFP4 here). MXFP4 experts are kept
    bit-exact, and layers an mlx-lm checkpoint stores quantized are kept as stored.
    """
    from pathlib import Path

    from mlx_gptoss.config import QuantSpec
    from mlx_gptoss.loader import _REPO_ID
    from mlx_gptoss.memory import parse_size
    from mlx_gptoss_convert import PRESETS, ConversionError
    from mlx_gptoss_convert import convert as run
    from mlx_gptoss_convert.destination import describe_os_error

    try:
        shard_bytes = parse_size(shard_size)
        quantization = dict(PRESETS[preset])
        for comp, text in (("attention", attention), ("lm_head", lm_head), ("embed_tokens", embedding)):
            if text is not None:
                quantization[comp] = QuantSpec.parse(text)
        source, hub = src, not Path(src).expanduser().exists() and _REPO_ID.match(src)
        if revision is not None and not hub:
            raise ValueError(f"--revision is for a Hugging Face repo id; {src} is a folder")
        if hub:
            from mlx_gptoss.models import fetch, finish_download
            from mlx_gptoss_convert.hub import keep_download_default

            keep = keep_download_default() if keep_download is None else keep_download  # a bad setting fails first
            if Path(dst).expanduser().exists() and not force:  # before a download, not after
                raise ValueError(f"{dst}: already exists (use --force to replace an earlier conversion)")
            source = fetch(src, Path(dst), revision=revision)
        out = run(source, dst, force=force, layout=layout, shard_bytes=shard_bytes, quantization=quantization,
                  progress=progress)  # fmt: skip
        if hub:
            finish_download(src, source, out, keep)
    except (ConversionError, ValueError) as e:
        raise _Fail(str(e)) from None
    except OSError as e:  # a write that failed (read-only or full disk): the partial output is already removed
        raise _Fail(describe_os_error(e, dst)) from None
    click.echo(f"converted {src} -> {out}", err=True)


def _download_option(f):
    """--keep-download/--drop-download for commands that convert a repo id on first use (sets $MLX_GPTOSS_KEEP_DOWNLOAD)."""
    import os

    def set_env(ctx, param, value) -> None:  # noqa: ANN001
        if value is not None:
            os.environ["MLX_GPTOSS_KEEP_DOWNLOAD"] = "1" if value else "0"

    return click.option("--keep-download/--drop-download", default=None, expose_value=False, callback=set_env,
                        help="When a repo id is converted on first use: keep its download in the Hugging Face cache "
                             "[default: keep, or $MLX_GPTOSS_KEEP_DOWNLOAD]")(f)  # fmt: skip


@main.command("list")
def list_() -> None:
    """The converted models in the cache (name, source, size, quantization, format version)."""
    from mlx_gptoss.models import list_models, models_root

    models = list_models()
    if not models:
        click.echo(f"no converted models in {models_root()}", err=True)
        return
    rows = [["NAME", "SOURCE", "SIZE", "QUANTIZATION", "FORMAT"], *(m.row() for m in models)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@main.command()
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def rm(name: str, yes: bool) -> None:
    """Delete the converted model NAME (as `mlx-gptoss list` shows it) from the cache."""
    from mlx_gptoss.models import find_model, remove_model

    try:
        path = find_model(name)
        if not yes:
            if not sys.stdin.isatty():
                raise ValueError(f"{path}: not removed; confirm with --yes (no terminal to ask on)")
            click.confirm(f"delete {path}?", abort=True, err=True)
        path, size = remove_model(name)
    except (ValueError, OSError) as e:
        raise _Fail(str(e)) from None
    click.echo(f"removed {path} ({size / 1e9:.2f} GB freed)", err=True)


@main.command()
@click.argument("model")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["mlx-lm", "hf"]),
    required=True,
    help="mlx-lm: a folder mlx_lm.load loads; hf: the released Hugging Face layout (mxfp4 quantization_config).",
)
@click.option("--dequantize", is_flag=True, help="hf: write layers held quantized as bf16 (then not the release's bytes).")
@click.option("--force", is_flag=True, help="Replace DST if it is an earlier export or conversion (or empty).")
@click.option("--shard-size", default="4GB", show_default=True, help="Largest output file.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
def export(model: str, dst: str, fmt: str, dequantize: bool, force: bool, shard_size: str, progress: bool | None) -> None:
    """Export a converted MODEL (folder or repo id) to DST in mlx-lm's or the released layout.

    The MXFP4 experts leave bit-exact in both; an hf export of a model converted without
    quantizing other layers is the release, tensor for tensor.
    """
    from mlx_gptoss.memory import parse_size
    from mlx_gptoss_convert import ConversionError
    from mlx_gptoss_convert.destination import describe_os_error
    from mlx_gptoss_convert.export import export as run

    try:
        out = run(model, dst, fmt=fmt, force=force, dequantize=dequantize, shard_bytes=parse_size(shard_size),
                  progress=progress)  # fmt: skip
    except (ConversionError, ValueError) as e:
        raise _Fail(str(e)) from None
    except OSError as e:  # a write that failed: the partial output is already removed
        raise _Fail(describe_os_error(e, dst)) from None
    click.echo(f"exported {model} -> {out} ({fmt})", err=True)


@main.command()
@click.argument("prompt", required=False)
@click.option(
    "-m",
    "--model",
    default=DEFAULT_MODEL,
    show_default=True,
    help="A converted folder, or a Hugging Face repo id (downloaded and converted once).",
)
@click.option("--system", default=None, help="Instructions (harmony developer message).")
@click.option("--reasoning-effort", type=click.Choice(["low", "medium", "high"]), default="medium", show_default=True)
@click.option("--show-reasoning", is_flag=True, help="Stream the reasoning (analysis channel) to stderr.")
@click.option("--raw", is_flag=True, help="Feed the prompt as is, without the harmony format.")
@click.option("--max-tokens", default=512, show_default=True, type=click.IntRange(min=1))
@click.option("--temp", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option(
    "--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="Sample from the k most likely tokens (0 = all)."
)
@click.option(
    "--min-p",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1, max_open=True),
    help="Drop tokens less likely than min-p times the most likely one (0 = none).",
)
@click.option("--seed", default=None, type=int, help="Random seed, for reproducible sampling.")
@click.option(
    "--prefill-step", default=None, type=click.IntRange(min=1), help="Prefill chunk (default 512, or the memory plan's)."
)
@click.option("--memory-budget", default=None, help="Keep memory under this, e.g. 9.5GB (see `mlx-gptoss doctor`).")
@click.option(
    "--context",
    default=8192,
    show_default=True,
    type=click.IntRange(min=1),
    help="With --memory-budget: the longest prompt + reply to reserve the KV cache for.",
)
@click.option("--show-plan", is_flag=True, help="Print the memory plan (with --memory-budget).")
@click.option(
    "--adapter",
    default=None,
    type=click.Path(file_okay=False),
    help="A LoRA adapter folder (mlx-gptoss, PEFT or mlx-lm) to apply, unfused.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON result instead of streaming.")
@_download_option
def generate(prompt: str | None, model: str, system: str | None, reasoning_effort: str, show_reasoning: bool,
             raw: bool, max_tokens: int, temp: float, top_p: float, top_k: int, min_p: float, seed: int | None,
             prefill_step: int | None, memory_budget: str | None, context: int, show_plan: bool, adapter: str | None,
             as_json: bool) -> None:  # fmt: skip
    """Generate a reply to PROMPT (or to standard input when PROMPT is omitted or "-")."""
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise click.UsageError("give a PROMPT, or pipe one into standard input")
        prompt = sys.stdin.read()
    from mlx_gptoss.generate import generate as run
    from mlx_gptoss.loader import load
    from mlx_gptoss.tokenizer import TokenizerError

    try:
        lm = load(model, memory_budget=memory_budget, context=context, verbose=show_plan, adapter=adapter)
    except (ValueError, OSError, TokenizerError) as e:
        raise _Fail(str(e)) from None

    def on_text(channel: str | None, text: str) -> None:
        if channel in (None, "final"):
            sys.stdout.write(text)
            sys.stdout.flush()
        elif show_reasoning:
            click.secho(text, err=True, nl=False, dim=True)

    try:
        result = run(lm, prompt, raw=raw, system=system, reasoning_effort=reasoning_effort,
                     max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                     prefill_step=prefill_step, on_text=None if as_json else on_text)  # fmt: skip
    except (ValueError, TokenizerError) as e:
        raise _Fail(str(e)) from None
    except KeyboardInterrupt:  # Ctrl-C: stop quietly, with the shell's status for SIGINT
        click.echo("\ninterrupted", err=True)
        sys.exit(130)
    if not as_json:
        sys.stdout.write("\n")  # end the streamed answer's line
    for problem in result.problems:  # malformed harmony output: the text was kept, say what was wrong
        click.echo(f"warning: {problem}", err=True)
    if as_json:
        out = result.to_dict()
        if lm.stream_stats is not None:
            out["expert_cache"] = lm.stream_stats.as_dict()
        click.echo(json.dumps(out))
        return
    click.echo(
        f"prompt: {result.prompt_tokens} tokens, {result.prompt_tps:.2f} tok/s | "
        f"generation: {result.generation_tokens} tokens, {result.generation_tps:.2f} tok/s "
        f"({result.finish_reason}) | peak memory {result.peak_memory_gb:.2f} GB, "
        f"peak RSS {result.peak_rss_gb:.2f} GB",
        err=True,
    )
    if lm.stream_stats is not None:
        st = lm.stream_stats.as_dict()
        click.echo(f"expert cache: hit rate {st['hit_rate']:.1%}, {st['bytes_read_per_token'] / 1e6:.1f} MB read per token, "
                   f"{st['stall_s']:.2f} s waiting for reads", err=True)  # fmt: skip


@main.command()
@click.option(
    "-m",
    "--model",
    default=DEFAULT_MODEL,
    show_default=True,
    help="A converted folder, or a Hugging Face repo id (downloaded and converted once).",
)
@click.option("--system", "instructions", default=None, help="Instructions (harmony developer message).")
@click.option("--reasoning-effort", type=click.Choice(["low", "medium", "high"]), default="medium", show_default=True)
@click.option("--hide-reasoning", is_flag=True, help="Do not show the reasoning (toggle with /reasoning).")
@click.option(
    "--max-tokens",
    default=None,
    type=click.IntRange(min=1),
    help="Longest reply  [default: 2048, or half the context when that is less]",
)
@click.option("--temp", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option(
    "--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="Sample from the k most likely tokens (0 = all)."
)
@click.option(
    "--min-p",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1, max_open=True),
    help="Drop tokens less likely than min-p times the most likely one (0 = none).",
)
@click.option("--seed", default=None, type=int, help="Random seed, for reproducible sampling.")
@click.option(
    "--context-policy",
    type=click.Choice(["rolling", "drop_oldest", "error"]),
    default="rolling",
    show_default=True,
    help="When the conversation fills the context: hide the oldest turns down to half of it (rolling), "
    "as few as fit (drop_oldest), or refuse the message (error).",
)
@click.option(
    "--load",
    "load_file",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="Continue a conversation saved with /save.",
)
@click.option("--memory-budget", default=None, help="Keep memory under this, e.g. 9.5GB (see `mlx-gptoss doctor`).")
@click.option(
    "--context",
    default=8192,
    show_default=True,
    type=click.IntRange(min=1),
    help="With --memory-budget: the longest conversation to reserve the KV cache for.",
)
@click.option(
    "--adapter",
    default=None,
    type=click.Path(file_okay=False),
    help="A LoRA adapter folder (mlx-gptoss, PEFT or mlx-lm) to apply, unfused.",
)
@_download_option
def chat(model: str, instructions: str | None, reasoning_effort: str, hide_reasoning: bool, max_tokens: int | None,
         temp: float, top_p: float, top_k: int, min_p: float, seed: int | None, context_policy: str,
         load_file: str | None, memory_budget: str | None, context: int, adapter: str | None) -> None:  # fmt: skip
    """Chat in the terminal: streaming answers, reasoning dimmed, /help for commands and keys."""
    from pathlib import Path

    from mlx_gptoss.chat import DEFAULT_MAX_TOKENS, ChatSession, context_size
    from mlx_gptoss.loader import load
    from mlx_gptoss.repl import Repl, enable_history
    from mlx_gptoss.tokenizer import TokenizerError

    try:
        lm = load(model, memory_budget=memory_budget, context=context, verbose=memory_budget is not None, adapter=adapter)
        n_ctx = context_size(lm)
        if max_tokens is None and n_ctx // 2 < DEFAULT_MAX_TOKENS or max_tokens is not None and max_tokens >= n_ctx:
            # a reply as long as the context would leave no room for the conversation
            why = f"--max-tokens {max_tokens} does not fit the context of" if max_tokens is not None else "the context is"
            max_tokens = n_ctx // 2
            click.echo(f"({why} {n_ctx} tokens: replies up to {max_tokens} tokens; --max-tokens to change)", err=True)
        defaults = {"max_tokens": max_tokens, "temperature": temp, "top_p": top_p, "top_k": top_k, "min_p": min_p,
                    "context_policy": context_policy}  # fmt: skip
        if load_file:
            session = ChatSession.from_json(lm, Path(load_file).read_text(), **defaults)
        else:
            session = ChatSession(lm, instructions=instructions, reasoning_effort=reasoning_effort, **defaults)
    except (ValueError, OSError, TokenizerError) as e:
        raise _Fail(str(e)) from None
    if seed is not None:
        import mlx.core as mx

        mx.random.seed(seed)
    save_history = enable_history() if sys.stdin.isatty() else None  # readline only for a person at a terminal
    try:
        Repl(session, show_reasoning=not hide_reasoning).run()
    finally:
        if save_history is not None:
            save_history()


@main.command()
@click.option(
    "-m",
    "--model",
    default=DEFAULT_MODEL,
    show_default=True,
    help="A converted folder, or a Hugging Face repo id (downloaded and converted once).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; other than loopback needs --api-key.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--api-key",
    default=None,
    envvar="MLX_GPTOSS_API_KEY",
    help="Require 'Authorization: Bearer KEY' (or set MLX_GPTOSS_API_KEY).",
)
@click.option(
    "--adapter",
    default=None,
    type=click.Path(file_okay=False),
    help="A LoRA adapter folder (mlx-gptoss, PEFT or mlx-lm) to apply, unfused.",
)
@click.option("--memory-budget", default=None, help="Keep memory under this, e.g. 9.5GB (see `mlx-gptoss doctor`).")
@click.option(
    "--context",
    default=8192,
    show_default=True,
    type=click.IntRange(min=1),
    help="With --memory-budget: the longest prompt + reply to reserve the KV cache for.",
)
@click.option(
    "--max-queue", default=16, show_default=True, type=click.IntRange(min=1), help="Requests waiting beyond this get 429."
)
@click.option(
    "--max-tokens",
    default=None,
    type=click.IntRange(min=1),
    help="Longest reply a request may ask for  [default: half the context]",
)
@click.option("--cors-origin", default=None, help="The one browser origin allowed to call the API (default: none).")
@_download_option
def serve(model: str, host: str, port: int, api_key: str | None, adapter: str | None, memory_budget: str | None, context: int,
          max_queue: int, max_tokens: int | None, cors_origin: str | None) -> None:  # fmt: skip
    """Serve the model over HTTP: OpenAI's Responses API and Chat Completions (see README "Serve")."""
    try:
        from mlx_gptoss.server.app import is_loopback
        from mlx_gptoss.server.app import serve as run
    except ImportError as e:
        raise _Fail(f"the server needs its extra: pip install 'mlx-gptoss[server]' ({e.name} is missing)") from None
    from mlx_gptoss.tokenizer import TokenizerError

    if not is_loopback(host) and not api_key:  # checked before the model loads: fail fast
        raise _Fail(f"--host {host} is reachable from other machines: set --api-key too (or serve on 127.0.0.1)")
    try:
        run(model, host=host, port=port, api_key=api_key, adapter=adapter, memory_budget=memory_budget, context=context,
            max_queue=max_queue, max_tokens=max_tokens, cors_origin=cors_origin)  # fmt: skip
    except (ValueError, OSError, TokenizerError) as e:
        raise _Fail(str(e)) from None


@main.command()
@click.option("-m", "--model", default=None, help="A converted model folder, or a repo id converted before, to size up.")
@click.option("--context", default=8192, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--train-seq-len", default=None, type=click.IntRange(min=2), help="Plan LoRA training on sequences this long instead."
)
@click.option("--lora-rank", default=8, show_default=True, type=click.IntRange(min=1), help="With --train-seq-len.")
@click.option("--lora-targets", default="attention", show_default=True, help="With --train-seq-len: attention, router, experts.")
@click.option("--lora-layers", default="all", show_default=True, help='With --train-seq-len: "all", "last:N" or 0,1,2.')
@click.option(
    "--kernels",
    "check_kernels",
    is_flag=True,
    help="Check the custom GPU kernels against their twins and time them: a report to paste into an issue.",
)
def doctor(model: str | None, context: int, train_seq_len: int | None, lora_rank: int, lora_targets: str, lora_layers: str,
           check_kernels: bool) -> None:  # fmt: skip
    """This machine's memory and GPU limit, the model's components, and a budget that fits."""
    from mlx_gptoss.doctor import kernels_report, report

    if check_kernels:
        click.echo(kernels_report())
        return
    from mlx_gptoss.loader import resolve_model

    try:
        spec = None
        # a repo id names its converted copy in the cache; doctor never starts a download
        path = None if model is None else resolve_model(model, convert=False)
        if train_seq_len is not None and path is not None:
            from mlx_gptoss.config import GptOssConfig
            from mlx_gptoss.lora.adapters import LoRASpec

            n_layers = GptOssConfig.from_file(path / "config.json").num_hidden_layers
            spec = LoRASpec(rank=lora_rank, alpha=2.0 * lora_rank, targets=tuple(t.strip() for t in lora_targets.split(",")),
                            layers=_parse_layers(lora_layers, n_layers))  # fmt: skip
        click.echo(report(path, context, train_seq_len=train_seq_len, lora_spec=spec))
    except (ValueError, OSError) as e:
        raise _Fail(str(e)) from None


@main.group()
def lora() -> None:
    """LoRA fine-tuning: train adapters for a model on your own data."""


def _parse_layers(text: str, num_layers: int) -> tuple[int, ...] | None:
    """--layers: "all", "last:N", or a comma list of layer indices."""
    from mlx_gptoss.lora.adapters import last_layers

    text = text.strip()
    if text == "all":
        return None
    try:
        n = int(text[5:]) if text.startswith("last:") else None
        ids = tuple(int(t) for t in text.split(",")) if n is None else None
    except ValueError:
        raise ValueError(f'--layers: expected "all", "last:N" or indices like 0,1,2, got {text!r}') from None
    return last_layers(n, num_layers) if n is not None else ids


@lora.command("train")
@click.option(
    "-m",
    "--model",
    default=DEFAULT_MODEL,
    show_default=True,
    help="A converted folder, or a Hugging Face repo id (downloaded and converted once).",
)
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
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
@_download_option
def lora_train(model: str, data: str, valid: str | None, output: str, rank: int, alpha: float, targets: str, layers: str,
               lr: float, warmup: int | None, schedule: str, iters: int | None, epochs: int | None, batch_size: int,
               grad_accum: int, max_seq_len: int, train_on: str, overflow: str, memory_budget: str | None,
               save_every: int, eval_every: int, eval_batches: int, resume: bool, seed: int, metrics: str | None,
               plot: bool, progress: bool | None) -> None:  # fmt: skip
    """Train a LoRA adapter on --data into OUTPUT (Ctrl-C saves a checkpoint; --resume continues)."""
    import shlex
    import signal
    import threading
    from pathlib import Path

    from tqdm import tqdm

    from mlx_gptoss.loader import load, resolve_config
    from mlx_gptoss.lora.adapters import LoRASpec, apply_lora
    from mlx_gptoss.lora.checkpoint import latest_checkpoint, resume_state
    from mlx_gptoss.lora.data import load_dataset
    from mlx_gptoss.lora.plan import training_plan
    from mlx_gptoss.lora.plot import plot_metrics, require_matplotlib
    from mlx_gptoss.lora.train import TrainConfig, refuse_finished_adapter, refuse_model_folder, train
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
                            layers=_parse_layers(layers, config.num_hidden_layers))  # fmt: skip
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
        raise _Fail(str(e)) from None
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
        raise _Fail(str(e)) from None
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


@lora.command("fuse")
@click.option(
    "-m", "--model", default=DEFAULT_MODEL, show_default=True, help="The converted base model the adapter was trained on."
)
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
        raise _Fail(str(e)) from None
    except OSError as e:  # a failed write: the partial folder is already removed
        raise _Fail(
            f"{output}: fuse failed, nothing was left behind: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
        ) from None


if __name__ == "__main__":  # pragma: no cover
    main()
