"""Model files: ``convert``, ``list``, ``rm``, ``export``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .common import Fail, progress_option, refuse_ignored, shard_size_option


@click.command()
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace DST if it is an earlier mlx-gptoss conversion (or empty).")
@click.option("--layout", type=click.Choice(["hf", "hf-dense", "hf-dense-t", "original", "mlx-lm"]), default=None,
              help="Source layout (default: detected from the tensor names; hf-dense-t: dense experts [E, out, in]).")  # fmt: skip
@shard_size_option
@click.option("--preset", type=click.Choice(["none", "16gb"]), default="none", show_default=True,
              help="Storage of the non-expert weights: 16gb = attention and unembedding 8-bit, embedding 8-bit.")  # fmt: skip
@click.option("--attention", default=None, help="Attention weights: 8, 6, 4 (affine, groups of 64), 4g32, mxfp8 or none.")
@click.option("--lm-head", default=None, help="Unembedding: as --attention.")
@click.option("--embedding", default=None, help="Embedding: as --attention.")
@progress_option
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
    from mlx_gptoss.config import QuantSpec
    from mlx_gptoss.memory import parse_size
    from mlx_gptoss.models import fetch, finish_download, is_repo_id
    from mlx_gptoss_convert import PRESETS, ConversionError
    from mlx_gptoss_convert import convert as run
    from mlx_gptoss_convert.destination import describe_os_error
    from mlx_gptoss_convert.hub import keep_download_default

    try:
        shard_bytes = parse_size(shard_size)
        quantization = dict(PRESETS[preset])
        for comp, text in (("attention", attention), ("lm_head", lm_head), ("embed_tokens", embedding)):
            if text is not None:
                quantization[comp] = QuantSpec.parse(text)
        source, hub = src, is_repo_id(src)
        if revision is not None and not hub:
            raise ValueError(f"--revision is for a Hugging Face repo id; {src} is a folder")
        if hub:
            keep = keep_download_default() if keep_download is None else keep_download  # a bad setting fails first
            if Path(dst).expanduser().exists() and not force:  # before a download, not after
                raise ValueError(f"{dst}: already exists (use --force to replace an earlier conversion)")
            source = fetch(src, Path(dst), revision=revision)
        out = run(source, dst, force=force, layout=layout, shard_bytes=shard_bytes, quantization=quantization,
                  progress=progress)  # fmt: skip
        if hub:
            finish_download(src, source, out, keep)
    except (ConversionError, ValueError) as e:
        raise Fail(str(e)) from None
    except OSError as e:  # a write that failed (read-only or full disk): the partial output is already removed
        raise Fail(describe_os_error(e, dst)) from None
    click.echo(f"converted {src} -> {out}", err=True)


@click.command("list")
def list_() -> None:
    """The converted models in the cache (name, source, size, quantization, format version)."""
    from mlx_gptoss.models import list_models, models_root

    models = list_models()
    for m in models:
        if m.problem is not None:  # listed all the same: one damaged folder hides no other model
            click.echo(f"warning: {m.path}: {m.problem}", err=True)
    if not models:
        click.echo(f"no converted models in {models_root()}", err=True)
        return
    rows = [["NAME", "SOURCE", "SIZE", "QUANTIZATION", "FORMAT"], *(m.row() for m in models)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@click.command()
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def rm(name: str, yes: bool) -> None:
    """Delete the converted model NAME (as `mlx-gptoss list` shows it) from the cache.

    Only a folder holding nothing but what a conversion writes is deleted (the rule of convert
    --force): move your own files (notes, adapters) out of it first.
    """
    from mlx_gptoss.models import check_removable, find_model, remove_model

    try:
        path = find_model(name)
        check_removable(path)  # before asking: a folder that would be refused is not worth a question
        if not yes:
            if not sys.stdin.isatty():
                raise ValueError(f"{path}: not removed; confirm with --yes (no terminal to ask on)")
            click.confirm(f"delete {path}?", abort=True, err=True)
        path, size = remove_model(name)
    except (ValueError, OSError) as e:
        raise Fail(str(e)) from None
    click.echo(f"removed {path} ({size / 1e9:.2f} GB freed)", err=True)


@click.command()
@click.argument("model")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["mlx-lm", "hf"]), required=True,
              help="mlx-lm: a folder mlx_lm.load loads; hf: the released Hugging Face layout (mxfp4 quantization_config).")  # fmt: skip
@click.option("--dequantize", is_flag=True, help="hf: write layers held quantized as bf16 (then not the release's bytes).")
@click.option("--force", is_flag=True, help="Replace DST if it is an earlier export or conversion (or empty).")
@shard_size_option
@progress_option
def export(model: str, dst: str, fmt: str, dequantize: bool, force: bool, shard_size: str, progress: bool | None) -> None:
    """Export a converted MODEL (folder or repo id) to DST in mlx-lm's or the released layout.

    The MXFP4 experts leave bit-exact in both; an hf export of a model converted without
    quantizing other layers is the release, tensor for tensor.
    """
    refuse_ignored(click.get_current_context(), {"dequantize": (fmt != "hf", "is for --format hf: an mlx-lm export keeps "
                                                                            "quantized layers as they are stored")})  # fmt: skip
    from mlx_gptoss.memory import parse_size
    from mlx_gptoss.models import resolve_model
    from mlx_gptoss_convert import ConversionError
    from mlx_gptoss_convert.destination import describe_os_error
    from mlx_gptoss_convert.export import export as run

    try:
        out = run(resolve_model(model), dst, fmt=fmt, force=force, dequantize=dequantize, shard_bytes=parse_size(shard_size),
                  progress=progress)  # fmt: skip
    except (ConversionError, ValueError) as e:
        raise Fail(str(e)) from None
    except OSError as e:  # a write that failed: the partial output is already removed
        raise Fail(describe_os_error(e, dst)) from None
    click.echo(f"exported {model} -> {out} ({fmt})", err=True)
