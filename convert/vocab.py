"""The o200k vocabulary for harmony, derived from the release's tokenizer.json.

openai-harmony loads ``o200k_base.tiktoken`` from ``$TIKTOKEN_ENCODINGS_BASE`` (else it downloads
it) and checks its sha256. tokenizer.json holds the same byte-level BPE vocabulary, so the
converter writes that file into the converted folder and the model works offline from it alone.
"""

from __future__ import annotations

import base64
import hashlib
import json
from functools import lru_cache
from pathlib import Path

TIKTOKEN_FILE = "o200k_base.tiktoken"
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (used by byte-level BPE)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def tiktoken_from_tokenizer_json(tokenizer_json: Path) -> bytes:
    """The mergeable ranks of a byte-level BPE tokenizer.json, in tiktoken's text format."""
    tj = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    specials = {t["content"] for t in tj.get("added_tokens", []) if t.get("special")}
    to_byte = {c: b for b, c in byte_to_unicode().items()}
    ranks = sorted((i, tok) for tok, i in tj["model"]["vocab"].items() if tok not in specials)
    lines = []
    for expected, (rank, tok) in enumerate(ranks):
        if rank != expected:
            raise ValueError(f"{tokenizer_json}: vocabulary ranks are not contiguous at {expected}")
        raw = bytes(to_byte[c] for c in tok)
        lines.append(base64.b64encode(raw) + b" " + str(rank).encode())
    return b"\n".join(lines) + b"\n"


def write_harmony_vocab(tokenizer_json: Path, dst_dir: Path) -> bool:
    """Write o200k_base.tiktoken into dst_dir if tokenizer.json yields exactly o200k_base.

    Returns False (and writes nothing) for any other vocabulary: harmony would reject it.
    """
    data = tiktoken_from_tokenizer_json(tokenizer_json)
    if hashlib.sha256(data).hexdigest() != O200K_BASE_SHA256:
        return False
    (Path(dst_dir) / TIKTOKEN_FILE).write_bytes(data)
    return True
