"""gpt-oss's tokenizer (o200k_harmony), served by openai-harmony from the model folder.

The converter writes ``o200k_base.tiktoken`` into the converted folder; harmony reads it from
``$TIKTOKEN_ENCODINGS_BASE``, so the model works offline. Special-token ids and stop tokens are
read from the encoding, never typed here.

Text goes to openai-harmony only after :func:`check_encode_cost` has bounded how long it would
take to tokenize (see there): its BPE is quadratic in the length of one pre-tokenizer piece.
"""

from __future__ import annotations

import codecs
import os
import threading
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


# -- what text costs to tokenize ---------------------------------------------------------------
#
# openai-harmony runs BPE on each pre-tokenizer piece separately, in time ~4.5e-10 s x bytes**2 of
# the piece, holding the GIL (600k "a" take more than 500 s; past ~1.1M characters in one run its
# regex panics). Pieces never share work, so sum(piece_bytes**2) bounds the time. o200k's pattern
# (the string inside harmony, the same as tiktoken's o200k_base):
#
#   [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?
#   |[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?
#   |\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
#
# so every piece is one of: (A) at most one character, a run of letters and marks, a contraction
# (at most 3 characters: 'll, 're, 'ſ, ...); (B) at most 3 digits; (C) at most one space, a run
# of [^\s\p{L}\p{N}] (punctuation, symbols, marks, controls), a run of [\r\n/]; (D) a run of
# White_Space. Inside one maximal run of a kind the pieces are disjoint, so the sum of the squares
# of the maximal runs' lengths (widened by the prefix and contraction) bounds the sum over the
# pieces. The runs are found in two stages: on the UTF-8 bytes, where ASCII bytes are classified
# exactly and every other byte may be of any kind (ordinary text stops here, ~1 ms per 320k
# characters); only when a long run may exist, on the characters, classified with unicodedata
# into one byte code each.

MIN_PIECE = 256  # bytes: shorter pieces tokenize at the ordinary per-byte rate; they are not counted
ENCODE_BUDGET = 16384**2  # bytes**2: one piece of 16 KiB, ~0.1-0.15 s of harmony's BPE
# openai-harmony>=0.0.8 classifies characters with Unicode 16 tables (regex-syntax 0.8.5). Up to that
# version this Python's letters, marks and numbers are harmony's too (tests/test_encode_cost.py checks
# it); a newer Python may know letters harmony takes as unassigned (punctuation), so then every
# non-ASCII letter, mark and number is counted as possibly punctuation too (a looser bound, still sound)
HARMONY_UNICODE = (16, 0, 0)
UNICODE_VERIFIED = tuple(int(x) for x in unicodedata.unidata_version.split(".")) <= HARMONY_UNICODE

_ASCII_SPACE = "\t\n\x0b\x0c\r "
# Rust's \s is White_Space; Python's str.isspace also takes \x1c-\x1f, which harmony treats as controls
_WHITE_SPACE = frozenset(map(ord, _ASCII_SPACE + "\x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000")) | frozenset(
    range(0x2000, 0x200B)
)


def _byte_table(member: Callable[[str], bool]) -> bytes:
    """A ``bytes.translate`` table: ``x`` for the ASCII bytes of a kind and for every non-ASCII byte
    (a byte of a multi-byte character may belong to a character of any kind), ``.`` for the rest."""
    return bytes(0x78 if b >= 0x80 or member(chr(b)) else 0x2E for b in range(256))


_LETTER_BYTES = _byte_table(str.isalpha)  # (A)
_PUNCT_BYTES = _byte_table(lambda c: c in "\r\n" or not (c.isalnum() or c in _ASCII_SPACE))  # (C), with [\r\n/]
_SPACE_BYTES = _byte_table(lambda c: c in _ASCII_SPACE)  # (D)

# one byte code per character: letter, mark, number, White_Space but \r \n, \r or \n, "/", other
# (punctuation, symbols, controls), unknown (unassigned in this Python: harmony may know it as anything)
_L, _M, _N, _W, _R, _S, _P, _U = b"lmnwrspu"


def _code(o: int) -> int:
    if o in (10, 13):
        return _R
    if o in _WHITE_SPACE:
        return _W
    if o == 0x2F:
        return _S
    if 0xD800 <= o < 0xE000:
        return _P  # harmony receives a lone surrogate as U+FFFD, a symbol
    cat = unicodedata.category(chr(o))
    if cat == "Cn":
        return _U
    kind = {"L": _L, "M": _M, "N": _N}.get(cat[0], _P)
    if UNICODE_VERIFIED or o < 0x80 or kind == _P:
        return kind
    return _U if kind in (_L, _M) else _P  # harmony may not know this letter or number yet: also punctuation


_codes_table: Any = None  # numpy uint8 [0x110000]: the code of each code point, 0 until first seen
_CODE_TABLE = {k: bytes(0x78 if c in members else 0x2E for c in range(256)) for k, members in
               (("letters", b"lmu"), ("punct", b"psmur"), ("space", b"wr"))}  # fmt: skip


def _char_codes(text: str) -> bytes:
    """One code byte per character of ``text``, classified on first sight of each code point."""
    global _codes_table
    import numpy as np  # numpy's import (~0.1 s) is paid only by texts that may hold a long run

    table = _codes_table
    if table is None:  # two threads may each make one: the one that stays is as good
        table = _codes_table = np.zeros(0x110000, np.uint8)
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    codes = table[cps]
    if not codes.all():
        for o in np.unique(cps[codes == 0]).tolist():
            table[o] = _code(o)  # the same value whichever thread writes it
        codes = table[cps]
    return codes.tobytes()


def _punct_pieces(codes: bytes, s: int, e: int, k: int = 1) -> Iterator[tuple[int, int]]:
    """(start, end) of each (C) piece in ``codes[s:e]``, a run of punctuation, marks, unknowns, "/"
    and newlines, parsed as ``[psmu]+[rs]*`` from left to right: the first piece starts at the first
    character but a newline; a new one at each punctuation character (not "/") whose nearest
    preceding character other than "/" is a newline within the pieces (the "/"s between belong to
    the piece before). Only the pieces of at least ``k`` characters; vectorized, as 320k characters of
    "-----\\n" lines are 53k pieces."""
    import numpy as np  # numpy's import is paid only by texts that may hold a long run

    a = np.frombuffer(codes, np.uint8, e - s, s)
    first = int(np.argmax(a != _R))
    if a[first] == _R:
        return  # newlines only: White_Space, counted as such
    punct = (a == _P) | (a == _M) | (a == _U)
    run_starts = np.flatnonzero(punct & ~np.concatenate(([False], punct[:-1])))
    not_slash = np.flatnonzero(a != _S)
    before = not_slash[np.maximum(np.searchsorted(not_slash, run_starts) - 1, 0)]  # the nearest but "/"
    # ... a newline after the first piece began (the "/"s after the leading newlines begin that piece)
    after_newline = run_starts[(before > first) & (a[before] == _R)]
    starts = np.concatenate(([first], after_newline))
    ends = np.append(starts[1:], e - s)
    long = ends - starts >= k
    for i, j in zip(starts[long].tolist(), ends[long].tolist()):
        yield s + i, s + j


def _runs(s: bytes, table: bytes, k: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each maximal run of at least ``k`` ``table`` members in ``s``."""
    t = s.translate(table)
    needle = b"x" * k
    i = t.find(needle)  # the leftmost k-run after a run's end starts where the next maximal run starts
    while i >= 0:
        j = t.find(b".", i + k)
        j = len(t) if j < 0 else j
        yield i, j
        i = t.find(needle, j)


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class EncodeCost:
    """What :func:`encode_cost` found: ``cost`` bounds sum(bytes**2) over the pieces of at least
    ``MIN_PIECE`` bytes; ``longest`` bounds the longest piece's bytes (0: none is that long), and its
    run starts at character ``start``; ``runs`` is how many runs were counted."""

    cost: int = 0
    longest: int = 0
    start: int = 0
    runs: int = 0


def encode_cost(text: str, *, min_piece: int = MIN_PIECE, context: int = 0) -> EncodeCost:
    """An upper bound on sum(piece_bytes**2) over the pieces of at least ``min_piece`` bytes that
    openai-harmony's pre-tokenizer cuts ``text`` into (the time its BPE takes is ~4.5e-10 s times
    that). ``context``: bytes the text's surroundings may add to a run at either end (0 for a text
    encoded on its own; harmony's templates put a few bytes around each string of a message).

    The bound exceeds the truth by a few bytes per run, or more where the pattern splits a run the
    bound counts whole (mixed case ``aBaB...``). About 1 ms per 320k characters of ordinary text.
    """
    k = max(1, min_piece - 7 - 2 * context)  # a piece that long holds a run this long of one kind
    b = text.encode("utf-8", "surrogatepass")
    if len(b) < k or not any(True for t in (_LETTER_BYTES, _PUNCT_BYTES, _SPACE_BYTES) for _ in _runs(b, t, k)):
        return EncodeCost()
    codes = _char_codes(text)
    kc = max(1, k // 4)  # a run of k bytes has at least k/4 characters
    found: list[tuple[int, int]] = []  # (bytes, start)

    def add(start: int, end: int, run: int) -> None:
        n = _nbytes(text[start:end]) + context * ((start == 0) + (end >= len(text)))
        if n >= min_piece:
            found.append((n, run))

    for s, e in _runs(codes, _CODE_TABLE["letters"], kc):
        add(max(0, s - 1), e + 3, s)  # (A): a prefix character, the letters, a contraction
    for s, e in _runs(codes, _CODE_TABLE["space"], kc):
        add(s, e, s)  # (D)
    for s, e in _runs(codes, _CODE_TABLE["punct"], kc):
        for ps, pe in _punct_pieces(codes, s, e, kc):
            add(max(0, ps - 1), pe, ps)  # (C): a space, the punctuation, newlines
    if not found:
        return EncodeCost()
    longest, start = max(found)
    return EncodeCost(sum(n * n for n, _ in found), longest, start, len(found))


class TextTooCostlyError(TokenizerError):
    """Text openai-harmony would take too long to tokenize (see :func:`check_encode_cost`).

    ``longest``: the longest run's bytes (about); ``index``: which of the checked texts holds it;
    ``start``: the character of that text where the run starts.
    """

    def __init__(self, message: str, *, longest: int = 0, index: int = 0, start: int = 0):
        super().__init__(message)
        self.longest, self.index, self.start = longest, index, start


def check_encode_cost(texts: Iterable[str], *, what: str = "the text", name: Callable[[int], str] | None = None,
                      context: int = 0, budget: int = ENCODE_BUDGET) -> None:  # fmt: skip
    """Refuse ``texts`` (tokenized together, e.g. the strings of one conversation) when tokenizing
    them could take more than ``budget`` bytes**2 of BPE: raise :class:`TextTooCostlyError` (a
    :class:`TokenizerError`, a ValueError) naming ``what``, the longest run and where it starts.

    openai-harmony's BPE takes time quadratic in the length of one pre-tokenizer piece, and a run
    without a break (no space, newline, digit, or change between letters and punctuation) is one
    piece: 200,000 "a" take ~20 s with the GIL held, 1.1M panic. The default budget is one piece of
    16 KiB (~0.1-0.15 s); pieces under ``MIN_PIECE`` bytes are not counted (they cost the ordinary
    per-byte rate). Texts that pass go to harmony unchanged: this only refuses, never alters.
    ``name(i)`` names text ``i`` in the message; ``context`` as :func:`encode_cost`.
    """
    total = count = 0
    worst, where, head = EncodeCost(), 0, ""
    for i, text in enumerate(texts):
        c = encode_cost(text, context=context)
        total, count = total + c.cost, count + c.runs
        if c.longest > worst.longest:
            worst, where, head = c, i, text[c.start : c.start + 12]
    if total <= budget:
        return
    place = f"{name(where)} " if name is not None else "it "
    runs = (
        f"a run of about {worst.longest:,} bytes"
        if count == 1
        else f"{count} long runs, the longest of about {worst.longest:,} bytes,"
    )
    raise TextTooCostlyError(
        f"{what} is too costly to tokenize: {place}has {runs} without a break (starting at character "
        f"{worst.start:,}: {head!r}...); the tokenizer takes such a run as one piece, in a time that grows with "
        f"the square of its length, so runs are limited to about {int(budget**0.5):,} bytes in all: break them up "
        f"with spaces or newlines",
        longest=worst.longest, index=where, start=worst.start,
    )  # fmt: skip


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
        """Text -> ids. Special-token text (``<|start|>``) stays plain text unless ``allow_special``.

        Raises :class:`TextTooCostlyError` for text with too long a run without a break (see
        :func:`check_encode_cost`), before harmony sees it."""
        check_encode_cost([text], what=f"a text of {len(text):,} characters")
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
