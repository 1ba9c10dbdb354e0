"""The encode-cost guard (mlx_gptoss.tokenizer.check_encode_cost): openai-harmony's BPE is quadratic in
the length of one pre-tokenizer piece, so text whose long pieces cost too much is refused before
harmony sees it; everything else is tokenized by harmony, unchanged.

The truth the bound is checked against comes from a reference pre-tokenizer: o200k's pattern in the
third-party ``regex`` module, with ``\\s`` spelled out as White_Space (``regex``'s own ``\\s``, like
``str.isspace``, also takes \\x1c-\\x1f). Its Unicode tables (17 here) are newer than harmony's (16) and
Python's (14), so the corpus uses only code points the three agree on: those Python has assigned
(harmony agrees on every one of them: ``test_harmony_agrees_with_this_pythons_unicode``), a few
that only harmony and ``regex`` know (Unicode 15/16 letters, checked against harmony), and a few
unassigned everywhere. Every text's reference pieces are checked against harmony itself: encoded
piece by piece they must give harmony's tokens for the whole text.
"""

from __future__ import annotations

import random
import unicodedata
from pathlib import Path

import pytest
from openai_harmony import Author, Message, Role

from mlx_gptoss import tokenizer
from mlx_gptoss.harmony import MAX_NESTING, check_render_cost, developer_message, render_for_completion, system_message
from mlx_gptoss.testing import find_o200k_base
from mlx_gptoss.tokenizer import (
    ENCODE_BUDGET,
    MIN_PIECE,
    TextTooCostlyError,
    Tokenizer,
    TokenizerError,
    check_encode_cost,
    encode_cost,
    load_harmony_encoding,
)

regex = pytest.importorskip("regex", reason="the reference pre-tokenizer needs the regex module (a transformers dependency)")

WS = r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
PATTERN = regex.compile(
    "|".join([
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        rf" ?[^{WS}\p{{L}}\p{{N}}]+[\r\n/]*",
        rf"[{WS}]*[\r\n]+",
        rf"[{WS}]+(?![^{WS}])",
        rf"[{WS}]+",
    ]),
    regex.V0,
)  # fmt: skip
# Unicode 15/16 letters: unassigned for Python 3.11 (the guard's wildcard), letters for harmony and regex
NEWER_LETTERS = [0x1E030, 0x11F04, 0x31350, 0x1C89, 0xA7CB, 0x10D4A, 0x16D40]
UNASSIGNED = [0x378, 0x379, 0xFFFE, 0xFFFF, 0x1FFFE, 0x10FFFF]  # noncharacters and never-assigned: punctuation


@pytest.fixture(scope="module")
def enc():
    return load_harmony_encoding(find_o200k_base().parent)


def nbytes(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass"))


def true_cost(enc, text: str, min_piece: int = MIN_PIECE) -> int:
    """sum(bytes**2) over the pieces of at least ``min_piece`` bytes, from the reference pre-tokenizer
    (asserted to agree with harmony on ``text``)."""
    pieces = PATTERN.findall(text)
    assert "".join(pieces) == text
    ids = enc.encode(text, disallowed_special=())
    assert [t for p in pieces for t in enc.encode(p, disallowed_special=())] == ids, (
        f"the reference pre-tokenizer disagrees with harmony on {text[:60]!r}: fix the reference, not the guard"
    )
    return sum(nbytes(p) ** 2 for p in pieces if nbytes(p) >= min_piece)


# -- a corpus of awkward text -------------------------------------------------------------------

BLOCKS = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x530, 0x5FF),
          (0x600, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x11FF), (0x1E00, 0x1EFF), (0x2000, 0x206F),
          (0x2190, 0x23FF), (0x2460, 0x24FF), (0x3000, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0xFF00, 0xFFEF),
          (0x1F300, 0x1F6FF), (0x1F900, 0x1F9FF), (0x1D400, 0x1D7FF), (0x0, 0x1F), (0x80, 0x9F), (0xE000, 0xE0FF)]  # fmt: skip
SPACES = [" ", "\t", "\n", "\r", "\r\n", "\u3000", "\xa0", "\x0b", "\x0c", "\x1c", "\x1f", "\u2028", "\u200b", "\x85"]
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'Re", "'ſ", "’s", "'x", "''s"]
WORDS = "the quick brown fox naïve café résumé Straße İstanbul ǅemal ΣΊΣΥΦΟΣ москва".split()
SPECIAL = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>"]
LONG = ["a", "A", "!", "😀", "中", " ", "\n", "\t\n", "-", "\u0e01\u0e34", "\u0301", "!/\n", "aB", "\U0001e030", "\ue000"]


def _char(rng: random.Random) -> str:
    k = rng.random()
    if k < 0.03:
        return chr(rng.choice(NEWER_LETTERS))
    if k < 0.04:
        return chr(rng.choice(UNASSIGNED))
    while True:
        a, b = rng.choice(BLOCKS)
        c = chr(rng.randint(a, b))
        if unicodedata.category(c) != "Cn":  # unassigned for Python: harmony and regex may differ
            return c


def _fragment(rng: random.Random) -> str:
    k = rng.random()
    if k < 0.15:
        return "".join(_char(rng) for _ in range(rng.randint(1, 12)))
    if k < 0.28:
        return "".join(rng.choice(SPACES) for _ in range(rng.randint(1, 9)))
    if k < 0.36:
        return "".join(rng.choice("0123456789٠١٢३४५⑤½") for _ in range(rng.randint(1, 9)))
    if k < 0.46:
        return rng.choice(WORDS) + rng.choice(CONTRACTIONS)
    if k < 0.50:
        return rng.choice(SPECIAL)
    if k < 0.57:
        return "".join(rng.choice("/\n\r!?.-=*#|") for _ in range(rng.randint(1, 12)))
    if k < 0.65:  # runs around the guard's threshold (up to ~1200 bytes)
        return rng.choice(LONG) * rng.randint(2, 300)
    if k < 0.72:
        return rng.choice(WORDS).upper() + rng.choice(WORDS).capitalize()
    if k < 0.80:  # CJK, Korean, Thai and Devanagari with marks, without spaces
        return "".join(rng.choice("αβγδ日本語한국어ไทยที่นี่हिन्दी́̈") for _ in range(rng.randint(1, 40)))
    return rng.choice([" ", ""]) + rng.choice(WORDS)


def corpus(seed: int, count: int, size: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        parts, n = [], rng.randint(size // 10, size)
        while n > 0:
            parts.append(_fragment(rng))
            n -= len(parts[-1])
        texts.append("".join(parts))
    return texts


def test_the_corpus_letters_newer_than_python_are_letters_for_harmony(enc):
    """The wildcard case is exercised with letters harmony knows and this Python does not (yet)."""
    s = enc.encode("'s", disallowed_special=())
    for o in NEWER_LETTERS:
        c = chr(o)
        assert enc.encode("a" + c + "'s", disallowed_special=())[-1:] == s, hex(o)  # c joins the letters
        if unicodedata.unidata_version.startswith("14."):
            assert unicodedata.category(c) == "Cn", hex(o)


def test_the_bound_is_never_below_the_true_cost_on_a_corpus(enc):
    checked = 0
    for text in corpus(seed=7, count=160, size=3000):
        for min_piece in (9, 64, MIN_PIECE):
            truth = true_cost(enc, text, min_piece)
            assert encode_cost(text, min_piece=min_piece).cost >= truth, (min_piece, text[:80])
            checked += truth > 0
    assert checked > 200  # the corpus does hold pieces of every threshold


def builders(n: int) -> dict[str, str]:
    """Runs of about ``n`` bytes of each kind."""
    return {
        "letters": "a" * n, "Letters+contraction": "!" + "A" * (n - 4) + "'LL", "mixed case": "aB" * (n // 2),
        "CJK": "中" * (n // 3), "thai+marks": "\u0e01\u0e34" * (n // 6), "emoji": "😀" * (n // 4),
        "emoji+marks": "😀" + "\u0301" * (n // 2), "marks only": "\u0301" * (n // 2), "punct": "!" * n,
        "space+punct": " " + "!" * (n - 1), "punct+newlines": "!" * (n // 2) + "\n" * (n // 2),
        "punct+slash/nl": "!" + "/\n" * (n // 2), "spaces": " " * n, "tabs+nl": "\t\n" * (n // 2),
        "nbsp": "\xa0" * (n // 2), "ideographic space": "\u3000" * (n // 3), "NEL": "\x85" * (n // 2),
        "ctrl \\x1c": "\x1c" * n, "newer letter": "\U0001e030" * (n // 4), "private use": "\ue000" * (n // 3),
        "spaces then x": " " * n + "x", "digits": "1" * n, "lone surrogates": "\ud800" * (n // 3),
        "slashes": "/" * n, "newline, slashes": "\n" + "/" * n, "slashes after a piece": "!\n" + "/" * (n // 2) + "!" * 9,
        "lines of dashes": "-----\n" * (n // 6),
    }  # fmt: skip


@pytest.mark.parametrize("n", [MIN_PIECE - 9, MIN_PIECE - 1, MIN_PIECE, MIN_PIECE + 1, 300, 2 * MIN_PIECE + 3, 4096])
def test_the_bound_is_never_below_the_true_cost_at_the_edges(enc, n):
    for kind, core in builders(n).items():
        for before, after in (("", ""), ("x ", " y"), ("\n", "\n"), ("ab", "cd"), ("!", "'s"), (" ", "")):
            text = before + core + after
            # harmony reads a lone surrogate as U+FFFD (as many bytes): the reference splits that text
            truth = true_cost(enc, text.replace("\ud800", "\ufffd"))
            assert encode_cost(text).cost >= truth, (kind, n, before, after)


def test_punctuation_pieces_are_cut_as_the_pattern_cuts_them():
    """The vectorized (C) parse of a run of punctuation, "/" and newlines against the pattern's own
    ``[psmu]+[rs]*`` (on the guard's one-byte codes)."""
    pattern = regex.compile(rb"[psmu]+[rs]*")
    rng = random.Random(3)
    for _ in range(5000):
        run = bytes(rng.choice(b"psmur" if rng.random() < 0.5 else b"pprrss") for _ in range(rng.randint(1, 30)))
        codes = b"l" * rng.randint(0, 3) + run + b"w"
        s, e = codes.index(run), codes.index(run) + len(run)
        assert list(tokenizer._punct_pieces(codes, s, e)) == [m.span() for m in pattern.finditer(codes, s, e)], run


def test_the_bound_is_tight_for_one_run():
    assert encode_cost("a" * 20000).cost == 20000**2
    assert encode_cost(" " * 300).cost == 300**2
    assert encode_cost("hello " * 1000).cost == 0  # short pieces are not counted


def test_context_widens_the_runs_at_the_ends():
    assert encode_cost("a" * 1000, context=16).cost == 1032**2
    # away from the ends: the prefix and 3 characters of a possible contraction, no context
    assert encode_cost("b " + "a" * 1000 + " bcd e", context=16).cost == (1 + 1000 + 3) ** 2
    assert encode_cost("a" * 240).cost == 0 and encode_cost("a" * 240, context=16).cost == 272**2


# -- what is refused, what is accepted ---------------------------------------------------------


@pytest.mark.parametrize("text", ["a" * 200_000, " " * 200_000, "😀" * 50_000, "\n" * 1_200_000, "中" * 70_000],
                         ids=["letters", "spaces", "emoji", "newlines (harmony panics)", "CJK"])  # fmt: skip
def test_long_runs_are_refused_before_harmony(text, enc):
    with pytest.raises(TextTooCostlyError) as e:
        check_encode_cost([text])
    msg = str(e.value)
    assert f"about {nbytes(text):,} bytes" in msg and "starting at character 0" in msg, msg
    assert "spaces or newlines" in msg and isinstance(e.value, TokenizerError) and isinstance(e.value, ValueError)
    assert (e.value.longest, e.value.index, e.value.start) == (nbytes(text), 0, 0)


def test_the_tokenizer_refuses_a_long_run_naming_where_it_starts():
    tok = Tokenizer(find_o200k_base().parent)
    with pytest.raises(TextTooCostlyError, match=r"a text of 200,012 characters .*\(starting at character 6: 'xxxx") as e:
        tok.encode("hello " + "x" * 200_000 + " world", allow_special=True)
    assert e.value.start == 6


def _prose() -> str:
    docs = sorted(Path(__file__).resolve().parents[1].glob("docs/*.md"))
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in docs)
    cjk = "这是一个普通的中文段落，里面有标点符号。" * 20 + "\n" + "ภาษาไทยเขียนติดกันโดยไม่เว้นวรรคระหว่างคำ " * 10 + "\n"
    text = text + "\n" + cjk
    return (text * (320_000 // len(text) + 1))[:320_000]


def test_ordinary_text_is_accepted_and_tokenized_as_harmony_does():
    text = _prose()
    check_encode_cost([text])
    assert encode_cost(text).cost < ENCODE_BUDGET // 100
    tok = Tokenizer(find_o200k_base().parent)
    assert tok.encode(text) == tok.encoding.encode(text, disallowed_special=())
    assert tok.encode(text, allow_special=True) == tok.encoding.encode(text, allowed_special="all")


def test_text_at_the_budget_edge_is_accepted_and_encodes(enc):
    edge = "a" * 16384  # exactly the budget: one piece of 16 KiB
    assert encode_cost(edge).cost == ENCODE_BUDGET
    check_encode_cost([edge])
    assert enc.decode(Tokenizer(find_o200k_base().parent).encode(edge)) == edge
    # 4 pieces of just under 8 KiB (a space, 8180 letters), counted with the slack of the bound
    four = " ".join(["b" * 8180] * 4)
    assert 4 * 8181**2 <= encode_cost(four).cost <= ENCODE_BUDGET
    check_encode_cost([four])
    assert enc.decode(Tokenizer(find_o200k_base().parent).encode(four)) == four
    with pytest.raises(TextTooCostlyError, match="5 long runs, the longest of about 8,184 bytes"):
        check_encode_cost([four + " " + "b" * 8180])
    with pytest.raises(TextTooCostlyError, match="a run of about 16,385 bytes"):
        check_encode_cost(["a" * 16385])
    with pytest.raises(TextTooCostlyError):  # the budget is for the texts together
        check_encode_cost(["a" * 12000, "b" * 12000])


# -- the conversation ---------------------------------------------------------------------------


def _user(text: str) -> Message:
    return Message.from_role_and_content(Role.USER, text)


def test_render_refuses_a_costly_message_naming_it(enc):
    with pytest.raises(TextTooCostlyError, match="the conversation is too costly to tokenize: a user message has a run"):
        render_for_completion(enc, [system_message("low"), _user("a" * 200_000)])
    reply = Message.from_role_and_content(Role.ASSISTANT, "!" * 40_000).with_channel("final")
    with pytest.raises(TextTooCostlyError, match="an assistant message .*reset the conversation"):
        render_for_completion(enc, [system_message("low"), _user("hi"), reply, _user("again")])
    tool = Message.from_author_and_content(Author.new(Role.TOOL, "functions.f"), "\t" * 30_000).with_channel("commentary")
    with pytest.raises(TextTooCostlyError, match="a tool message"):
        render_for_completion(enc, [system_message("low"), _user("hi"), tool])


class _Tool:
    def __init__(self, description: str = "d", parameters: dict | None = None):
        self.name, self.description = "f", description
        self.parameters = parameters or {"type": "object", "properties": {}}


def test_render_checks_instructions_and_tool_schemas(enc):
    costly = "x" * 20_000
    for dev in (developer_message(costly), developer_message(None, [_Tool(description=costly)]),
                developer_message(None, [_Tool(parameters={"type": "object", "properties": {costly: {"type": "string"}}})])):  # fmt: skip
        with pytest.raises(TextTooCostlyError, match="the developer message has a run of about 20,0"):
            render_for_completion(enc, [system_message("low"), dev, _user("hi")])
    deep: dict = {"type": "string"}
    for _ in range(MAX_NESTING):
        deep = {"type": "object", "properties": {"p": deep}}
    with pytest.raises(TextTooCostlyError, match=f"nested more than {MAX_NESTING} levels"):
        check_render_cost([developer_message(None, [_Tool(parameters=deep)])])


def test_render_of_an_ordinary_conversation_is_harmonys_own(enc):
    from openai_harmony import Conversation

    text = _prose()[:100_000]
    messages = [system_message("low"), developer_message("Be brief. " * 100, [_Tool("Looks things up.")]), _user(text),
                Message.from_role_and_content(Role.ASSISTANT, text[:5000]).with_channel("final"), _user("More?")]  # fmt: skip
    plain = enc.render_conversation_for_completion(Conversation.from_messages(messages), Role.ASSISTANT)
    assert render_for_completion(enc, messages) == plain


def test_a_chat_session_refuses_a_costly_message_and_stays_as_it_was(vocab_model_dir):
    import mlx_gptoss

    chat = mlx_gptoss.load(vocab_model_dir).chat()
    with pytest.raises(ValueError, match="too costly to tokenize: a user message"):
        chat.send("a" * 200_000, max_tokens=2)
    assert [m["role"] for m in chat.messages] == ["system"]


# -- Unicode: the guard's tables against harmony's ----------------------------------------------


def test_harmony_agrees_with_this_pythons_unicode(enc):
    """The bound relies on harmony taking every letter, mark and number this Python knows as one
    (and nothing else as one). True for openai-harmony>=0.0.8 (Unicode 16) with Python <= 3.14 (16);
    on a newer Python the guard counts non-ASCII letters as possibly punctuation (UNICODE_VERIFIED)."""
    s = enc.encode("'s", disallowed_special=())
    bad = []
    for o in range(0x80, 0x110000):
        if 0xD800 <= o < 0xE000 or o in tokenizer._WHITE_SPACE:
            continue
        c, cat = chr(o), unicodedata.category(chr(o))
        if cat == "Cn" or (cat == "Co" and o % 64):  # unassigned: the guard's wildcard; private use: a sample
            continue
        # "!"+c+"'s" ends in the "'s" token when c is a letter or number (not punctuation joining the "!")
        if cat[0] == "M":
            ok = enc.encode("a" + c + "'s", disallowed_special=())[-1:] == s
        else:
            ok = (enc.encode("!" + c + "'s", disallowed_special=())[-1:] == s) == (cat[0] in "LN")
        if not ok:
            bad.append(f"U+{o:04X} ({cat})")
    if tokenizer.UNICODE_VERIFIED:
        assert not bad, f"harmony classifies {len(bad)} code points differently from Python: {bad[:10]}"


def test_a_newer_python_than_harmony_counts_letters_as_possible_punctuation(enc, monkeypatch):
    monkeypatch.setattr(tokenizer, "UNICODE_VERIFIED", False)
    monkeypatch.setattr(tokenizer, "_codes_table", None)  # classified again under the flag
    assert tokenizer._char_codes("aé中\u0301٣") == b"luuup"
    # a letter harmony might not know joins the punctuation around it
    assert encode_cost("!" * 200 + "é" + "!" * 200).cost >= nbytes("!" * 200 + "é" + "!" * 200) ** 2
    for text in corpus(seed=11, count=30, size=3000):
        assert encode_cost(text).cost >= true_cost(enc, text)
    check_encode_cost([_prose()])  # still accepts ordinary text
