"""What the research hooks cost: decode and prefill with no hook, against the code before the seam,
and with routing recorded / the residual stream captured — all in one run, as ratios.

    python benchmarks/bench_inspect.py --model /tmp/tiny --baseline 2675d62 --rounds 5 --json bench-out/inspect.json

``--baseline`` is a commit without the hook seam: it is checked out into a temporary git worktree
and measured through the same driver, in alternating rounds with the current code (each round a
fresh process per variant, so neither warms the other up). Variants:

- ``baseline``: the code at ``--baseline``
- ``plain``: this code, no hook registered (the seam's cost)
- ``routing``: this code, ``inspect.record_routing`` (every layer's top-k, every token)
- ``residual``: this code, ``inspect.trace(model, "blocks.*.resid.post")`` (every block's output)

Each measurement: load, a warm-up, then prefill of ``--prompt-tokens`` and greedy decode of
``--gen-tokens`` with the generation loop (``mlx_gptoss.generate.stream_tokens``). Reported: the
median over rounds of tokens/s, and each variant's ratio to ``baseline`` (and to ``plain``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("baseline", "plain", "routing", "residual")


def driver(model_path: str, variant: str, prompt_tokens: int, gen_tokens: int) -> dict:
    """One measurement in this process (the code on sys.path: the baseline's or this one)."""
    import contextlib

    import mlx.core as mx
    import numpy as np

    import mlx_gptoss
    from mlx_gptoss.generate import stream_tokens

    model = mlx_gptoss.load(model_path)
    mx.eval(model.parameters())
    vocab = min(model.config.vocab_size, 199998)
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, vocab, prompt_tokens)]
    ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
    if variant == "routing":
        from mlx_gptoss import inspect

        ctx = inspect.record_routing(model)
    elif variant == "residual":
        from mlx_gptoss import inspect

        ctx = inspect.trace(model, "blocks.*.resid.post")
    with ctx:
        list(stream_tokens(model, prompt[:8], max_tokens=4))  # warm-up
        times = {}
        t0 = time.perf_counter()
        first = [None]

        def prefilled() -> None:
            first[0] = time.perf_counter()

        n = 0
        for _ in stream_tokens(model, prompt, max_tokens=gen_tokens, on_prefilled=prefilled):
            n += 1
            if n == 1:
                t1 = time.perf_counter()
        t2 = time.perf_counter()
    times["prefill_tok_s"] = (prompt_tokens - 1) / (first[0] - t0)
    times["decode_tok_s"] = (n - 1) / (t2 - t1)
    times["first_token_s"] = t1 - t0
    return times


def _worktree(ref: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), ref], check=True,
                   capture_output=True, text=True)  # fmt: skip
    (where / "mlx_gptoss_convert").symlink_to(where / "convert")  # the package-dir mapping of pyproject, on sys.path
    return where


def _measure(code_root: Path, args: argparse.Namespace, variant: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--driver", variant, "--model", args.model,
           "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens)]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if r.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a converted model folder")
    ap.add_argument("--baseline", default=None, help="a commit without the hook seam (default: none, skip that variant)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--driver", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.driver:
        print(json.dumps(driver(args.model, args.driver, args.prompt_tokens, args.gen_tokens)))
        return
    variants = [v for v in VARIANTS if v != "baseline" or args.baseline]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        base = _worktree(args.baseline, Path(tmp) / "baseline") if args.baseline else None
        try:
            for r in range(args.rounds):
                for v in variants if r % 2 == 0 else variants[::-1]:  # alternate the order: no variant always first
                    results[v].append(_measure(base if v == "baseline" else ROOT, args, v))
                    print(f"round {r + 1}/{args.rounds} {v}: {results[v][-1]}", file=sys.stderr)
        finally:
            if base is not None:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)
    med = {v: {k: statistics.median(x[k] for x in rs) for k in ("prefill_tok_s", "decode_tok_s")} for v, rs in results.items()}
    ref = "baseline" if args.baseline else "plain"
    ratios = {v: {k: med[v][k] / med[ref][k] for k in med[v]} for v in med}
    out = {
        "model": args.model, "baseline": args.baseline, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
        "rounds": args.rounds, "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "median": med, f"ratio_to_{ref}": ratios, "runs": results,
    }  # fmt: skip
    print(f"| variant | prefill tok/s | decode tok/s | prefill / {ref} | decode / {ref} |\n|---|---|---|---|---|")
    for v in variants:
        print(f"| {v} | {med[v]['prefill_tok_s']:.1f} | {med[v]['decode_tok_s']:.2f} | "
              f"{ratios[v]['prefill_tok_s']:.3f} | {ratios[v]['decode_tok_s']:.3f} |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
