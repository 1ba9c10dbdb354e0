"""What the encode-cost guard costs beside the encode it protects (mlx_gptoss.tokenizer.check_encode_cost).

    python benchmarks/bench_encode_cost.py [--chars 320000] [--repeat 5]

For texts of ``--chars`` characters of several kinds, the best of ``--repeat`` runs of openai-harmony's
encode and of the check (after one warm-up, so the first-use classification of code points is not
counted), and the check's share of the two. Then how fast the texts the check refuses are refused
(harmony would take from ~20 s to minutes on each, or panic).
"""

from __future__ import annotations

import argparse
import base64
import random
import time
from pathlib import Path

from mlx_gptoss.testing import find_o200k_base
from mlx_gptoss.tokenizer import TextTooCostlyError, check_encode_cost, load_harmony_encoding

ROOT = Path(__file__).resolve().parents[1]


def _fill(text: str, n: int) -> str:
    return (text * (n // max(1, len(text)) + 1))[:n]


def texts(n: int) -> dict[str, str]:
    rng = random.Random(0)
    words = "the of and to in is that for it as with was on be by this are or from at".split()
    docs = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(ROOT.glob("docs/*.md")))
    code = "\n".join(p.read_text(encoding="utf-8") for p in sorted(ROOT.glob("mlx_gptoss/*.py")))
    cjk = "".join(rng.choice("的一是不了人我在有他这为之大来以个中上们，。、") for _ in range(4000)) + "\n"
    thai = " ".join("".join(rng.choice("กขคงจฉชซดตถทนบปผพฟมยรลวสหอฮะาิีุู่้็ั") for _ in range(rng.randint(3, 30))) for _ in range(500))
    mixed = " ".join(
        rng.choice([*words, "naïve", "Straße", "москва", "日本語", "😀", "42", "'s", "\n", "->"]) for _ in range(5000)
    )
    return {
        "docs (prose, markdown)": _fill(docs, n),
        "python code": _fill(code, n),
        "random words": _fill(" ".join(rng.choice(words) for _ in range(20000)), n),
        "CJK + punctuation": _fill(cjk, n),
        "Thai words": _fill(thai + "\n", n),
        "mixed scripts": _fill(mixed, n),
        "base64 blob, 76-char lines": _fill("\n".join(base64.b64encode(rng.randbytes(57)).decode() for _ in range(2000)), n),
        "'-----\\n' repeated": _fill("-----\n", n),
    }  # fmt: skip


def best(f, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chars", type=int, default=320_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    enc = load_harmony_encoding(find_o200k_base().parent)
    print(f"{'text':30s} {'encode s':>9s} {'check ms':>9s} {'share':>6s}")
    for name, text in texts(args.chars).items():
        check_encode_cost([text])  # warm-up: code points classified on first sight
        t_enc = best(lambda text=text: enc.encode(text, disallowed_special=()), args.repeat)
        t_chk = best(lambda text=text: check_encode_cost([text]), args.repeat)
        print(f"{name:30s} {t_enc:9.3f} {t_chk * 1e3:9.2f} {t_chk / (t_enc + t_chk):6.1%}")
    print("\nrefused (harmony itself: ~20 s for 200k 'a', minutes for the emoji, a panic past ~1.1M):")
    for name, text in [("'a' * 200_000", "a" * 200_000), ("' ' * 200_000", " " * 200_000),
                       ("'😀' * 50_000", "😀" * 50_000), ("'\\n' * 1_200_000", "\n" * 1_200_000)]:  # fmt: skip
        t = time.perf_counter()
        try:
            check_encode_cost([text])
            print(f"  {name:20s} accepted?!")
        except TextTooCostlyError:
            print(f"  {name:20s} refused in {(time.perf_counter() - t) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
