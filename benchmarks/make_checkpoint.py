"""Write a random-weight gpt-oss checkpoint in the released Hugging Face layout.

    python benchmarks/make_checkpoint.py --size 20b /tmp/gpt-oss-20b-random     # ~13 GB, ~2 min

The tensors have the real names, shapes and dtypes (MXFP4 experts as *_blocks/*_scales, bf16
elsewhere) and a config.json like the release's, so both our converter and mlx-lm load it; with the
real vocabulary it carries the o200k_harmony tokenizer.json too (``--no-tokenizer`` leaves it out).
Random weights route tokens almost uniformly over the experts. For a tiny model to try commands
on, ``mlx-gptoss testing tiny-model DIR`` is quicker (and converts it too).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from tqdm import tqdm

from mlx_gptoss.config import GptOssConfig
from mlx_gptoss.testing import REAL_VOCAB, release_nbytes, write_release

SIZES = {"20b": GptOssConfig.gpt_oss_20b, "120b": GptOssConfig.gpt_oss_120b, "tiny": GptOssConfig.tiny}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dst", type=Path)
    ap.add_argument("--size", choices=sorted(SIZES), default="20b")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers (smaller runs)")
    ap.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary size")
    ap.add_argument("--layout", choices=["hf", "hf-dense", "original"], default="hf")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", action=argparse.BooleanOptionalAction, default=None,
                    help="add an o200k_harmony tokenizer.json (default: with the real vocabulary size)")  # fmt: skip
    args = ap.parse_args(argv)
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    cfg = SIZES[args.size](**overrides)
    tokenizer = cfg.vocab_size >= REAL_VOCAB if args.tokenizer is None else args.tokenizer
    if tokenizer and cfg.vocab_size < REAL_VOCAB:
        ap.error(f"--tokenizer needs a vocabulary of {REAL_VOCAB} (harmony's token ids); this one has {cfg.vocab_size}")
    if args.dst.exists():
        ap.error(f"{args.dst}: already exists")
    total = release_nbytes(cfg, args.layout)
    partial = args.dst.with_name(f".{args.dst.name}.partial-{os.getpid()}")  # renamed into place when whole
    t = time.perf_counter()
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {args.size}", file=sys.stderr) as bar:
            write_release(partial, cfg, layout=args.layout, seed=args.seed, tokenizer=tokenizer, progress=bar.update)
        os.replace(partial, args.dst)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"wrote {args.dst} ({total / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
