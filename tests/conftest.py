"""Shared fixtures: tiny random checkpoints in the released layouts, converted once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_gptoss.config import GptOssConfig
from mlx_gptoss.testing import write_release, write_tokenizer_json
from mlx_gptoss_convert import convert

TINY = GptOssConfig.tiny()
# Big enough for harmony's token ids (the release's vocabulary size), small elsewhere.
TINY_VOCAB = GptOssConfig.tiny(vocab_size=201088, num_hidden_layers=2)


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    write_tokenizer_json(path)
    return path


@pytest.fixture(scope="session")
def releases(tmp_path_factory) -> dict[str, Path]:
    """The same tiny random model in each released layout."""
    root = tmp_path_factory.mktemp("releases")
    return {lay: write_release(root / lay, TINY, layout=lay, seed=0) for lay in ("hf", "hf-dense", "original")}


@pytest.fixture(scope="session")
def tiny_model_dir(releases, tmp_path_factory) -> Path:
    return convert(releases["hf"], tmp_path_factory.mktemp("converted") / "tiny")


@pytest.fixture(scope="session")
def vocab_model_dir(tokenizer_json, tmp_path_factory) -> Path:
    """A tiny model with the real vocabulary size and tokenizer (for harmony and the CLI)."""
    root = tmp_path_factory.mktemp("vocab")
    rel = write_release(root / "release", TINY_VOCAB, seed=3, tokenizer=tokenizer_json)
    return convert(rel, root / "converted")
