"""Answers: ``generate`` (one reply, streamed or as JSON) and ``chat`` (the terminal chat)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .common import (
    INT_MAX,
    Fail,
    Number,
    adapter_option,
    download_option,
    effort_option,
    given,
    memory_options,
    model_option,
    output_failed,
    refuse_ignored,
    require_stdout,
    sampling_options,
)


def _write(text: str) -> None:
    """``text`` to standard output, now; a write that fails is the command's one error."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as e:  # a closed pipe, a full disk: the reply cannot reach its reader
        raise output_failed(e) from None


@click.command()
@click.argument("prompt", required=False)
@model_option()
@click.option("--system", default=None, help="Instructions (harmony developer message).")
@effort_option
@click.option("--show-reasoning", is_flag=True, help="Stream the reasoning (analysis channel) to stderr.")
@click.option("--raw", is_flag=True, help="Feed the prompt as is, without the harmony format.")
@click.option("--max-tokens", default=512, show_default=True, type=Number(integer=True, min=1, max=INT_MAX))
@sampling_options
@click.option("--prefill-step", default=None, type=Number(integer=True, min=1, max=INT_MAX),
              help="Prefill chunk (default 512, or the memory plan's).")  # fmt: skip
@memory_options()
@click.option("--show-plan", is_flag=True, help="Print the memory plan (with --memory-budget).")
@adapter_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON result instead of streaming.")
@download_option
def generate(prompt: str | None, model: str, system: str | None, reasoning_effort: str, show_reasoning: bool,
             raw: bool, max_tokens: int, temp: float, top_p: float, top_k: int, min_p: float, seed: int | None,
             prefill_step: int | None, memory_budget: str | None, context: int, show_plan: bool, adapter: str | None,
             as_json: bool) -> None:  # fmt: skip
    """Generate a reply to PROMPT (or to standard input when PROMPT is omitted or "-")."""
    harmony_only = "has no effect with --raw (the prompt is fed as is, without the harmony format)"
    refuse_ignored(click.get_current_context(), {"system": (raw, harmony_only), "reasoning_effort": (raw, harmony_only),
                                                 "show_reasoning": (raw, harmony_only)})  # fmt: skip
    require_stdout()  # before the model loads: the reply would be lost
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise click.UsageError("give a PROMPT, or pipe one into standard input")
        prompt = sys.stdin.read()
    from mlx_gptoss.api import generate as run
    from mlx_gptoss.api import load
    from mlx_gptoss.tokenizer import TokenizerError

    try:
        lm = load(model, memory_budget=memory_budget, context=context, verbose=show_plan, adapter=adapter)
    except (ValueError, OSError, TokenizerError) as e:
        raise Fail(str(e)) from None

    def on_text(channel: str | None, text: str) -> None:
        if channel in (None, "final"):
            _write(text)  # its Fail ends the token loop as any exception does
        elif show_reasoning:
            click.secho(text, err=True, nl=False, dim=True)

    try:
        result = run(lm, prompt, raw=raw, system=system, reasoning_effort=reasoning_effort,
                     max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                     prefill_step=prefill_step, on_text=None if as_json else on_text)  # fmt: skip
    except (ValueError, TokenizerError) as e:
        raise Fail(str(e)) from None
    except KeyboardInterrupt:  # Ctrl-C: stop quietly, with the shell's status for SIGINT
        click.echo("\ninterrupted", err=True)
        sys.exit(130)
    if not as_json:
        _write("\n")  # end the streamed answer's line
    for problem in result.problems:  # malformed harmony output: the text was kept, say what was wrong
        click.echo(f"warning: {problem}", err=True)
    if as_json:
        out = result.to_dict()
        if lm.stream_stats is not None:
            out["expert_cache"] = lm.stream_stats.as_dict()
        _write(json.dumps(out) + "\n")
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


@click.command()
@model_option()
@click.option("--system", "instructions", default=None, help="Instructions (harmony developer message).")
@effort_option
@click.option("--hide-reasoning", is_flag=True, help="Do not show the reasoning (toggle with /reasoning).")
@click.option("--max-tokens", default=None, type=Number(integer=True, min=1, max=INT_MAX),
              help="Longest reply  [default: 2048, or half the context when that is less]")  # fmt: skip
@sampling_options
@click.option("--context-policy", type=click.Choice(["rolling", "drop_oldest", "error"]), default="rolling", show_default=True,
              help="When the conversation fills the context: hide the oldest turns down to half of it (rolling), "
                   "as few as fit (drop_oldest), or refuse the message (error).")  # fmt: skip
@click.option("--load", "load_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Continue a conversation saved with /save (its instructions come with it).")  # fmt: skip
@memory_options("the longest conversation")
@adapter_option
@download_option
def chat(model: str, instructions: str | None, reasoning_effort: str, hide_reasoning: bool, max_tokens: int | None,
         temp: float, top_p: float, top_k: int, min_p: float, seed: int | None, context_policy: str,
         load_file: str | None, memory_budget: str | None, context: int, adapter: str | None) -> None:  # fmt: skip
    """Chat in the terminal: streaming answers, reasoning dimmed, /help for commands and keys."""
    ctx = click.get_current_context()
    refuse_ignored(ctx, {"instructions": (load_file is not None, "has no effect with --load: the saved conversation "
                                                                 "carries its own instructions")})  # fmt: skip
    require_stdout()  # before the model loads: the chat would answer into nothing
    import mlx.core as mx

    from mlx_gptoss.api import load
    from mlx_gptoss.chat import DEFAULT_MAX_TOKENS, ChatSession, context_size
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
        if not load_file:
            session = ChatSession(lm, instructions=instructions, reasoning_effort=reasoning_effort, **defaults)
    except (ValueError, OSError, TokenizerError) as e:
        raise Fail(str(e)) from None
    if load_file:
        try:
            session = ChatSession.from_json(lm, Path(load_file).read_text(), **defaults)
        except OSError as e:
            raise Fail(f"{load_file}: cannot read it ({e.strerror or e})") from None
        except ValueError as e:  # not a conversation this model can be given: named with the file
            raise Fail(f"{load_file}: {e}") from None
        except RecursionError:  # json's decoder recurses once per nesting level (should from_json let it through)
            raise Fail(f"{load_file}: not a saved conversation: it is nested too deeply") from None
        if given(ctx, "reasoning_effort"):  # the saved effort, unless the command line names one
            session.reasoning_effort = reasoning_effort
    if seed is not None:
        mx.random.seed(seed)
    save_history = enable_history() if sys.stdin.isatty() else None  # readline only for a person at a terminal
    try:
        Repl(session, show_reasoning=not hide_reasoning, adapter=adapter, loaded=load_file).run()
    finally:
        if save_history is not None:
            save_history()
