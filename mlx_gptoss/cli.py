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
@click.option("--layout", type=click.Choice(["hf", "hf-dense", "original"]), default=None,
              help="Source layout (default: detected from the tensor names).")  # fmt: skip
@click.option("--shard-size", default="4GB", show_default=True, help="Largest output file.")
@click.option("--preset", type=click.Choice(["none", "16gb"]), default="none", show_default=True,
              help="Storage of the non-expert weights: 16gb = attention and unembedding 8-bit, embedding 8-bit.")
@click.option("--attention", default=None, help="Attention weights: 8, 6, 4 (affine, groups of 64), 4g32, mxfp8 or none.")
@click.option("--lm-head", default=None, help="Unembedding: as --attention.")
@click.option("--embedding", default=None, help="Embedding: as --attention.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
def convert(src: str, dst: str, force: bool, layout: str | None, shard_size: str, preset: str, attention: str | None,
            lm_head: str | None, embedding: str | None, progress: bool | None) -> None:  # fmt: skip
    """Convert a released checkpoint SRC (folder or Hugging Face repo id) into DST.

    SRC may be in the released Hugging Face layout (MXFP4 experts), openai's original/ layout,
    or a Hugging Face layout with dense experts (quantized to MXFP4 here). Released MXFP4
    experts are kept bit-exact.
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
        source = src
        if not Path(src).expanduser().exists() and _REPO_ID.match(src):
            from mlx_gptoss_convert.hub import download

            source = download(src)
        out = run(source, dst, force=force, layout=layout, shard_bytes=shard_bytes, quantization=quantization,
                  progress=progress)  # fmt: skip
    except (ConversionError, ValueError) as e:
        raise _Fail(str(e)) from None
    except OSError as e:  # a write that failed (read-only or full disk): the partial output is already removed
        raise _Fail(describe_os_error(e, dst)) from None
    click.echo(f"converted {src} -> {out}", err=True)


@main.command()
@click.argument("prompt", required=False)
@click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True,
              help="A converted folder, or a Hugging Face repo id (downloaded and converted once).")
@click.option("--system", default=None, help="Instructions (harmony developer message).")
@click.option("--reasoning-effort", type=click.Choice(["low", "medium", "high"]), default="medium", show_default=True)
@click.option("--show-reasoning", is_flag=True, help="Stream the reasoning (analysis channel) to stderr.")
@click.option("--raw", is_flag=True, help="Feed the prompt as is, without the harmony format.")
@click.option("--max-tokens", default=512, show_default=True, type=click.IntRange(min=1))
@click.option("--temp", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="Sample from the k most likely tokens (0 = all).")
@click.option("--min-p", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Drop tokens less likely than min-p times the most likely one (0 = none).")
@click.option("--seed", default=None, type=int, help="Random seed, for reproducible sampling.")
@click.option("--prefill-step", default=None, type=click.IntRange(min=1), help="Prefill chunk (default 512, or the memory plan's).")
@click.option("--memory-budget", default=None, help="Keep memory under this, e.g. 9.5GB (see `mlx-gptoss doctor`).")
@click.option("--context", default=8192, show_default=True, type=click.IntRange(min=1),
              help="With --memory-budget: the longest prompt + reply to reserve the KV cache for.")
@click.option("--show-plan", is_flag=True, help="Print the memory plan (with --memory-budget).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON result instead of streaming.")
def generate(prompt: str | None, model: str, system: str | None, reasoning_effort: str, show_reasoning: bool,
             raw: bool, max_tokens: int, temp: float, top_p: float, top_k: int, min_p: float, seed: int | None,
             prefill_step: int | None, memory_budget: str | None, context: int, show_plan: bool, as_json: bool) -> None:  # fmt: skip
    """Generate a reply to PROMPT (or to standard input when PROMPT is omitted or "-")."""
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise click.UsageError("give a PROMPT, or pipe one into standard input")
        prompt = sys.stdin.read()
    from mlx_gptoss.generate import generate as run
    from mlx_gptoss.loader import load
    from mlx_gptoss.tokenizer import TokenizerError

    try:
        lm = load(model, memory_budget=memory_budget, context=context, verbose=show_plan)
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
@click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True,
              help="A converted folder, or a Hugging Face repo id (downloaded and converted once).")
@click.option("--system", "instructions", default=None, help="Instructions (harmony developer message).")
@click.option("--reasoning-effort", type=click.Choice(["low", "medium", "high"]), default="medium", show_default=True)
@click.option("--hide-reasoning", is_flag=True, help="Do not show the reasoning (toggle with /reasoning).")
@click.option("--max-tokens", default=2048, show_default=True, type=click.IntRange(min=1))
@click.option("--temp", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--load", "load_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Continue a conversation saved with /save.")
@click.option("--memory-budget", default=None, help="Keep memory under this, e.g. 9.5GB (see `mlx-gptoss doctor`).")
@click.option("--context", default=8192, show_default=True, type=click.IntRange(min=1),
              help="With --memory-budget: the longest conversation to reserve the KV cache for.")
def chat(model: str, instructions: str | None, reasoning_effort: str, hide_reasoning: bool, max_tokens: int,
         temp: float, top_p: float, load_file: str | None, memory_budget: str | None, context: int) -> None:  # fmt: skip
    """Chat in the terminal: streaming answers, reasoning dimmed, /help for commands."""
    from pathlib import Path

    from mlx_gptoss.chat import ChatSession
    from mlx_gptoss.loader import load
    from mlx_gptoss.repl import Repl
    from mlx_gptoss.tokenizer import TokenizerError

    defaults = {"max_tokens": max_tokens, "temperature": temp, "top_p": top_p}
    try:
        lm = load(model, memory_budget=memory_budget, context=context, verbose=memory_budget is not None)
        if load_file:
            session = ChatSession.from_json(lm, Path(load_file).read_text(), **defaults)
        else:
            session = ChatSession(lm, instructions=instructions, reasoning_effort=reasoning_effort, **defaults)
    except (ValueError, OSError, TokenizerError) as e:
        raise _Fail(str(e)) from None
    Repl(session, show_reasoning=not hide_reasoning).run()


@main.command()
@click.option("-m", "--model", default=None, help="A converted model folder to size up.")
@click.option("--context", default=8192, show_default=True, type=click.IntRange(min=1))
def doctor(model: str | None, context: int) -> None:
    """This machine's memory and GPU limit, the model's components, and a budget that fits."""
    from pathlib import Path

    from mlx_gptoss.doctor import report

    try:
        click.echo(report(None if model is None else Path(model).expanduser(), context))
    except (ValueError, OSError) as e:
        raise _Fail(str(e)) from None


if __name__ == "__main__":  # pragma: no cover
    main()
