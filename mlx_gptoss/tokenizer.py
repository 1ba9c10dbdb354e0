"""gpt-oss's tokenizer (o200k_harmony), served by openai-harmony from the model folder.

The converter writes ``o200k_base.tiktoken`` into the converted folder; harmony reads it from
``$TIKTOKEN_ENCODINGS_BASE``, so the model works offline. Special-token ids and stop tokens are
read from the encoding, never typed here.
"""

from __future__ import annotations

import codecs
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from openai_harmony import HarmonyEncoding

VOCAB_FILE = "o200k_base.tiktoken"
_lock = threading.Lock()
_encodings: dict[str, HarmonyEncoding] = {}


class TokenizerError(ValueError, RuntimeError):
    """The harmony vocabulary could not be loaded, or openai-harmony failed on some text.

    A ValueError (bad input) and, as before, a RuntimeError.
    """


@contextmanager
def harmony_errors(what: str) -> Iterator[None]:
    """Turn a panic inside openai-harmony's Rust code into a :class:`TokenizerError`.

    pyo3's PanicException derives from BaseException, so ``except Exception`` would miss it; a
    very long run of one character (no piece boundary) overflows harmony's regex, for example.
    """
    try:
        yield
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        reason = str(e).splitlines()[0] if str(e) else "a panic"
        raise TokenizerError(
            f"openai-harmony failed to {what} ({reason}); very long runs of one character without a space "
            "or newline trigger this: break such runs up or shorten the text"
        ) from None


def load_harmony_encoding(vocab_dir: str | Path | None = None) -> HarmonyEncoding:
    """The o200k_harmony encoding, with its vocabulary read from ``vocab_dir`` when it has one."""
    # openai-harmony takes ~0.7 s to import: the loader builds a Tokenizer for every model, the encoding loads on first use
    from openai_harmony import HarmonyEncodingName, HarmonyError
    from openai_harmony import load_harmony_encoding as _load

    local = vocab_dir is not None and (Path(vocab_dir) / VOCAB_FILE).is_file()
    key = str(Path(vocab_dir).resolve()) if local else ""
    with _lock:
        if key in _encodings:
            return _encodings[key]
        old = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
        if local:
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = key
        try:
            enc = _load(HarmonyEncodingName.HARMONY_GPT_OSS)
        except HarmonyError as e:
            where = f"{vocab_dir} has no {VOCAB_FILE}, and " if vocab_dir is not None and not local else ""
            raise TokenizerError(
                f"could not load the o200k_harmony vocabulary: {where}openai-harmony said: {e}. "
                f"Put {VOCAB_FILE} in the model folder or in $TIKTOKEN_ENCODINGS_BASE."
            ) from None
        finally:
            if local:
                if old is None:
                    os.environ.pop("TIKTOKEN_ENCODINGS_BASE", None)
                else:
                    os.environ["TIKTOKEN_ENCODINGS_BASE"] = old
        _encodings[key] = enc
        return enc


class StreamingDetokenizer:
    """Turns token ids into text as they arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, encoding: HarmonyEncoding):
        self._enc = encoding
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return self._utf8.decode(bytes(self._enc._inner.decode_bytes([token])))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """o200k_harmony: ``encode``/``decode`` text, stop tokens, and the harmony encoding itself."""

    def __init__(self, vocab_dir: str | Path | None):
        self.vocab_dir = Path(vocab_dir) if vocab_dir is not None else None

    @cached_property
    def encoding(self) -> HarmonyEncoding:
        """The openai-harmony encoding (loaded on first use: ~0.6 s)."""
        return load_harmony_encoding(self.vocab_dir)

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Text -> ids. Special-token text (``<|start|>``) stays plain text unless ``allow_special``."""
        enc = self.encoding
        with harmony_errors(f"encode a text of {len(text):,} characters"):
            if allow_special:
                return enc.encode(text, allowed_special="all")
            return enc.encode(text, disallowed_special=())

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text."""
        enc = self.encoding
        with harmony_errors(f"decode {len(ids):,} tokens"):
            return enc.decode(list(ids))

    @property
    def stop_tokens(self) -> list[int]:
        """Tokens that end a completion: ``<|return|>`` and ``<|call|>``.

        ``<|end|>`` is not among them: it closes the analysis message, and the answer follows.
        """
        return self.encoding.stop_tokens_for_assistant_actions()

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self.encoding)
