"""``serve``: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import click

from .common import INT_MAX, Fail, Number, adapter_option, download_option, memory_options, model_option


@click.command()
@model_option()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; other than loopback needs --api-key.")
@click.option("--port", default=8000, show_default=True, type=Number(integer=True, min=0, max=65535))
@click.option("--api-key", default=None, envvar="MLX_GPTOSS_API_KEY",
              help="Require 'Authorization: Bearer KEY' (or set MLX_GPTOSS_API_KEY).")  # fmt: skip
@adapter_option
@memory_options()
@click.option(
    "--max-queue",
    default=16,
    show_default=True,
    type=Number(integer=True, min=1, max=INT_MAX),
    help="Requests waiting beyond this get 429.",
)
@click.option("--max-tokens", default=None, type=Number(integer=True, min=1, max=INT_MAX),
              help="Longest reply a request may ask for  [default: half the context]")  # fmt: skip
@click.option("--cors-origin", default=None,
              help="The one browser origin allowed to call the API (default: none; '*' needs --api-key).")  # fmt: skip
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="A Host name to answer besides localhost, 127.0.0.1 and [::1] (any port); repeatable; '*' needs --api-key.")  # fmt: skip
@download_option
def serve(model: str, host: str, port: int, api_key: str | None, adapter: str | None, memory_budget: str | None, context: int,
          max_queue: int, max_tokens: int | None, cors_origin: str | None, allowed_hosts: tuple[str, ...]) -> None:  # fmt: skip
    """Serve the model over HTTP: OpenAI's Responses API and Chat Completions (see docs/server.md)."""
    try:
        from mlx_gptoss.server.app import check_exposure, is_loopback, model_name
        from mlx_gptoss.server.app import serve as run
    except ImportError as e:
        raise Fail(
            f"the server's packages are missing ({e.name}): reinstall mlx-gptoss (pip install mlx-gptoss, or pip install -e . in a checkout)"
        ) from None
    from mlx_gptoss.api import load
    from mlx_gptoss.tokenizer import TokenizerError

    # checked before the model loads: fail fast
    if not is_loopback(host) and not api_key:
        raise Fail(f"--host {host} is reachable from other machines: set --api-key too (or serve on 127.0.0.1)")
    try:
        check_exposure(api_key=api_key, cors_origin=cors_origin, allowed_hosts=allowed_hosts)
    except ValueError as e:
        raise Fail(str(e)) from None
    try:
        lm = load(model, memory_budget=memory_budget, context=context, verbose=memory_budget is not None, adapter=adapter)
        run(lm, model_id=model_name(model), host=host, port=port, api_key=api_key, max_queue=max_queue,
            max_tokens=max_tokens, cors_origin=cors_origin, allowed_hosts=allowed_hosts, adapter=adapter)  # fmt: skip
    except (ValueError, OSError, TokenizerError) as e:
        raise Fail(str(e)) from None
