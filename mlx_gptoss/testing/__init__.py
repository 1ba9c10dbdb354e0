"""Tiny gpt-oss models for tests: yours and ours. No download, no network, a second to load.

    from mlx_gptoss.testing import tiny_model, rig

    path = tiny_model("/tmp/tiny", rig="Hello from a tiny model!")   # converted, real tokenizer
    model = mlx_gptoss.load(path)
    model.chat().send("Hi").final                                     # 'Hello from a tiny model!'

    rig(model, '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>')
    reply = model.chat(tools=[get_weather]).send("Weather?")          # a tool call, as scripted

Every architectural feature of gpt-oss is there (sinks, sliding and full attention, YaRN, top-4
routing over MXFP4 experts), at a few megabytes: 2 layers, hidden size 64, 8 experts. With the real
vocabulary (the default) the o200k_harmony tokenizer comes along, so harmony, chat, tools, the
server and LoRA training all run; the random weights write gibberish unless rigged (:mod:`.rig`).
From the shell: ``mlx-gptoss testing tiny-model DIR [--reply TEXT]``.

Modules: :mod:`.checkpoints` (random checkpoints in the released layouts, any size: the benchmarks'
random 20b too), :mod:`.tokenizer` (the tokenizer.json, offline), :mod:`.rig` (chosen replies).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from mlx_gptoss_convert import convert
from mlx_gptoss_convert.destination import destination
from mlx_gptoss_convert.export import export
from mlx_gptoss_convert.layout import HF

from ..config import GptOssConfig
from ..tokenizer import load_harmony_encoding
from .checkpoints import dequantize_mxfp4, release_nbytes, to_bf16_bits, write_release
from .rig import Rig, reply_chain, reply_text, rig, successors
from .tokenizer import find_o200k_base, write_tokenizer_json

__all__ = [
    "LAYOUTS",
    "REAL_VOCAB",
    "Rig",
    "dequantize_mxfp4",
    "find_o200k_base",
    "release_nbytes",
    "reply_chain",
    "reply_text",
    "rig",
    "successors",
    "tiny_config",
    "tiny_model",
    "to_bf16_bits",
    "write_release",
    "write_tokenizer_json",
]

LAYOUTS = ("converted", "hf", "hf-dense", "original", "mlx-lm")
REAL_VOCAB = 201088  # the release's vocabulary size: room for every o200k_harmony token id


def tiny_config(vocab: str | int = "real", layers: int = 2) -> GptOssConfig:
    """The tiny model's config: :meth:`GptOssConfig.tiny` with ``layers`` blocks and the release's
    vocabulary size (``vocab="real"``) or ``vocab`` ids."""
    if vocab != "real" and (isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 2):
        raise ValueError(f'vocab must be "real" or an integer >= 2; got {vocab!r}')
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= 64:
        raise ValueError(f"layers must be an integer in 1..64; got {layers!r}")
    return GptOssConfig.tiny(vocab_size=REAL_VOCAB if vocab == "real" else vocab, num_hidden_layers=layers)


def tiny_model(dir: str | Path | None = None, *, layout: str = "converted", vocab: str | int = "real", layers: int = 2,
               seed: int = 0, rig: str | None = None) -> Path:  # fmt: skip
    """Write a tiny random gpt-oss checkpoint and return its folder.

    Args:
        dir: the folder to create (it must not exist, or be empty); default: a new temporary folder
            (yours to delete).
        layout: "converted" (what ``mlx_gptoss.load`` and every command load), or a layout to
            convert from: "hf" (the release's Hugging Face layout), "hf-dense" (dense bf16 experts),
            "original" (openai's original/), "mlx-lm" (an mlx-lm folder, as ``mlx-gptoss export``
            writes it).
        vocab: "real" (the release's vocabulary and the o200k_harmony tokenizer: harmony, chat,
            tools and the server work) or a vocabulary size (no tokenizer: token ids only).
        layers: number of transformer blocks (alternating sliding and full attention).
        seed: the random weights (the same seed gives the same model in every layout).
        rig: a reply greedy decoding writes after ``<|start|>assistant``, whatever the prompt: plain
            text (a final answer) or harmony (see :func:`~.rig.reply_text`); needs ``vocab="real"``.

    The folder appears whole or not at all (built beside it, then renamed into place).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    if rig is not None and vocab != "real":
        raise ValueError('rig needs the real vocabulary (vocab="real"): the reply is written with the harmony tokenizer')
    config = tiny_config(vocab, layers)
    if dir is None:
        dst = Path(tempfile.mkdtemp(prefix="mlx-gptoss-tiny-")) / "model"
    else:
        dst = destination(dir)
        if dst.is_symlink() or dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
            raise FileExistsError(f"{dir}: already exists and is not empty; tiny_model writes a new folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    edit = None
    if rig is not None:
        encoding = load_harmony_encoding(find_o200k_base().parent)
        edit = Rig(reply_chain(encoding, rig), config.hidden_size, config.vocab_size).edit
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tiny-", dir=dst.parent))
    try:
        release_layout = {"converted": HF, "mlx-lm": HF}.get(layout, layout)
        release = write_release(work / "release", config, layout=release_layout, seed=seed, tokenizer=vocab == "real", edit=edit)
        out = release
        if layout in ("converted", "mlx-lm"):
            out = convert(release, work / "converted", progress=False)
        if layout == "mlx-lm":
            out = export(out, work / "mlx-lm", fmt="mlx-lm", progress=False)
        if dst.is_dir():
            dst.rmdir()  # an empty folder given as dir: replaced by the finished one
        os.replace(out, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dst
