"""End-to-end benchmark: mlx-gptoss vs mlx-lm on the same weights, in the same run.

    python benchmarks/bench_e2e.py --release /tmp/gpt-oss-20b-random --converted /tmp/gpt-oss-20b-mlx \\
        --prompt-tokens 16 --gen-tokens 8 --json bench-out/e2e.json --markdown bench-out/e2e.md

``--release`` is a checkpoint in the released layout (mlx-lm loads it directly); ``--converted``
is the same checkpoint after ``mlx-gptoss convert``. Each engine runs in its own process (so peak
memory is its own) through the same measuring loop: load (including reading every weight), a
warm-up (short prefill + a few decode steps, timed separately), then prefill of a fresh prompt
and greedy decode. If an engine fails (e.g. runs out of memory), that is its recorded result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from mlx_gptoss.generate import peak_rss_gb  # noqa: F401 - bench_budget imports it from here


def _load(engine: str, path: str):
    """Returns (forward(ids[1, T], cache) -> logits, make_cache)."""
    import mlx.core as mx

    if engine.startswith("mlx-gptoss"):
        import mlx_gptoss
        from mlx_gptoss import decode, kernels

        # options after ':' — "twin": the pure-MLX twins instead of the custom kernels;
        # "eager"/"compile": force the compiled decode step off/on (default: mlx_gptoss.decode's)
        opts = set(engine.split(":")[1:])
        if opts - {"twin", "eager", "compile"}:
            raise ValueError(f"unknown engine options {opts - {'twin', 'eager', 'compile'}} in {engine!r}")
        kernels.set_mode("twin" if "twin" in opts else "auto")
        decode.set_enabled(True if "compile" in opts else False if "eager" in opts else None)
        model = mlx_gptoss.load(path)
        mx.eval(model.parameters())
        return (lambda ids, cache: model(ids, cache)), (lambda n: model.make_cache(reserve=n))  # as generate() does
    if engine == "mlx-lm":
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.utils import load_model

        model, _ = load_model(Path(path))  # reads every weight (not lazy)
        return (lambda ids, cache: model(ids, cache=cache)), (lambda n: make_prompt_cache(model))
    raise ValueError(engine)


def _run(forward, make_cache, prompt: list[int], n_gen: int, prefill_step: int, reserve: int) -> dict:
    """Prefill ``prompt`` (in chunks), then greedy-decode ``n_gen`` tokens; timings in seconds."""
    import mlx.core as mx

    cache = make_cache(reserve)
    t0 = time.perf_counter()
    for i in range(0, len(prompt) - 1, prefill_step):
        forward(mx.array(prompt[i : min(i + prefill_step, len(prompt) - 1)])[None], cache)
        mx.eval([c.state for c in cache])
    y = mx.argmax(forward(mx.array(prompt[-1:])[None], cache)[:, -1, :], axis=-1)
    mx.eval(y)
    t1 = time.perf_counter()
    tokens = [y.item()]
    for _ in range(n_gen - 1):
        y = mx.argmax(forward(y[:, None], cache)[:, -1, :], axis=-1)
        mx.async_eval(y)
        tokens.append(y.item())
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": tokens}


def _split(forward, make_cache, prompt: list[int], reserve: int, steps: int = 16) -> dict:
    """Where a decode step's time goes: building its graph in Python (the forward call) and
    evaluating it (mx.eval, synchronous: no overlap with the next step). Medians in ms."""
    import mlx.core as mx

    cache = make_cache(reserve)
    y = mx.argmax(forward(mx.array(prompt)[None], cache)[:, -1, :], axis=-1)
    mx.eval(y)
    build, run = [], []
    for _ in range(steps):
        t = time.perf_counter()
        logits = forward(y[:, None], cache)
        y = mx.argmax(logits[:, -1, :], axis=-1)
        t1 = time.perf_counter()
        mx.eval(y)
        build.append(t1 - t)
        run.append(time.perf_counter() - t1)
    return {"decode_build_ms": 1e3 * sorted(build)[steps // 2], "decode_eval_ms": 1e3 * sorted(run)[steps // 2]}


def worker(engine: str, path: str, prompt_tokens: int, gen_tokens: int, warmup_tokens: int, prefill_step: int, seed: int) -> dict:
    import mlx.core as mx
    import numpy as np

    out: dict = {"engine": engine}
    __import__("mlx_gptoss.loader" if engine.startswith("mlx-gptoss") else "mlx_lm.utils")  # import time is not load time
    t = time.perf_counter()
    forward, make_cache = _load(engine, path)
    out["load_s"] = time.perf_counter() - t
    rng = np.random.default_rng(seed)
    vocab = min(json.loads((Path(path) / "config.json").read_text())["vocab_size"], 199998)  # ordinary tokens
    # the warm-up's cache has the measured run's size: the compiled decode step is traced for it here
    warm = _run(forward, make_cache, rng.integers(0, vocab, warmup_tokens).tolist(), 3, prefill_step, prompt_tokens + gen_tokens)
    out["warmup_s"] = warm["prefill_s"] + warm["decode_s"]
    mx.reset_peak_memory()
    r = _run(
        forward, make_cache, rng.integers(0, vocab, prompt_tokens).tolist(), gen_tokens, prefill_step, prompt_tokens + gen_tokens
    )
    out["prefill_tok_s"] = prompt_tokens / r["prefill_s"]
    out["decode_tok_s"] = (gen_tokens - 1) / r["decode_s"] if gen_tokens > 1 else None
    out["tokens"] = r["tokens"]
    out["peak_mlx_gb"] = mx.get_peak_memory() / 1e9
    out.update(_split(forward, make_cache, rng.integers(0, vocab, 16).tolist(), prompt_tokens + gen_tokens))
    out["peak_rss_gb"] = peak_rss_gb()
    out["device"] = str(mx.default_device())
    if engine.startswith("mlx-gptoss"):
        from mlx_gptoss import decode, kernels

        out["kernels"], out["compiled_decode"] = kernels.backend(), decode.enabled()
    return out


def machine() -> dict:
    import mlx.core as mx

    info = {"platform": platform.platform(), "python": platform.python_version(), "mlx": mx.__version__,
            "cpu_count": os.cpu_count(), "device": str(mx.default_device())}  # fmt: skip
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
        info.update(cpu=cpu, ram_gb=round(mem / 1e6, 1))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    for pkg in ("mlx_gptoss", "mlx_lm"):
        try:
            info[pkg.replace("_", "-")] = __import__(pkg).__version__
        except ImportError:
            info[pkg.replace("_", "-")] = None
    return info


def markdown(res: dict) -> str:
    m, a = res["machine"], res["args"]
    rows = ["| engine | load s | warm-up s | prefill tok/s | decode tok/s | peak MLX GB | peak RSS GB |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in res["results"]:
        if "error" in r:
            rows.append(f"| {r['engine']} | failed: {r['error']} | | | | | |")
            continue
        dec = f"{r['decode_tok_s']:.3f}" if r.get("decode_tok_s") else "-"
        rows.append(f"| {r['engine']} | {r['load_s']:.1f} | {r['warmup_s']:.1f} | {r['prefill_tok_s']:.3f} | {dec} "
                    f"| {r['peak_mlx_gb']:.2f} | {r['peak_rss_gb']:.2f} |")  # fmt: skip
    ok = {r["engine"]: r for r in res["results"] if "error" not in r}
    agree = []
    for name in [e for e in ok if e.startswith("mlx-gptoss")] if "mlx-lm" in ok else []:
        ours, peer = ok[name], ok["mlx-lm"]
        ratio = lambda k: f"{ours[k] / peer[k]:.2f}x" if ours.get(k) and peer.get(k) else "-"  # noqa: E731
        rows.append(f"| **ratio** ({name} / mlx-lm) | | | {ratio('prefill_tok_s')} | {ratio('decode_tok_s')} | | |")
        same = sum(a == b for a, b in zip(ours["tokens"], peer["tokens"]))
        agree.append(f"{name}: {same} of {len(ours['tokens'])}")
    if agree:
        rows.append("\nGreedy tokens agreeing with mlx-lm (bf16 both): " + "; ".join(agree) + ".")
    head = (f"Run {res['date']} on {m.get('cpu')} ({m['cpu_count']} cores, {m.get('ram_gb')} GB RAM), "
            f"{m['platform']}, device {m['device']}; mlx {m['mlx']}, mlx-lm {m.get('mlx-lm')}, "
            f"mlx-gptoss {m.get('mlx-gptoss')}.  \nWeights: {a['release']} (released layout, for mlx-lm) and "
            f"{a['converted']} (converted, for mlx-gptoss); prompt {a['prompt_tokens']} tokens, "
            f"{a['gen_tokens']} decoded (greedy), warm-up {a['warmup_tokens']} + 3 tokens.")  # fmt: skip
    return head + "\n\n" + "\n".join(rows) + "\n"


def run_worker(script: str, args: list[str]) -> dict:
    """Run ``python script *args`` in its own process (so its peak memory is its own) and return the
    JSON of its ``RESULT`` line, or ``{"error": ...}`` naming how it failed."""
    p = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode == 0 and line is not None:
        return json.loads(line[len("RESULT ") :])
    if p.returncode < 0:
        sig = signal.Signals(-p.returncode).name
        why = f"killed by {sig}" + (" (out of memory?)" if sig == "SIGKILL" else "")
    else:
        why = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {p.returncode}: {why}"}


def run_engines(script: str, argv: list[str] | None, engines: str) -> list[dict]:
    """Each of the comma-separated ``engines`` run as ``script`` with the same arguments and
    ``--worker ENGINE``, one process after another; their results in order, failures included."""
    results = []
    for engine in engines.split(","):
        print(f"running {engine} ...", file=sys.stderr, flush=True)
        res = run_worker(script, [*(argv if argv is not None else sys.argv[1:]), "--worker", engine])
        results.append({"engine": engine, **res})  # a worker's own result starts with its engine
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


def record(args: argparse.Namespace, *internal: str) -> dict:
    """The head of a benchmark's JSON: when, on what machine, with which arguments (less the
    output paths and the ``internal`` ones, which only the workers read)."""
    hidden = ("worker", "json", "markdown", *internal)
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "args": {k: v for k, v in vars(args).items() if k not in hidden}}  # fmt: skip


def write_outputs(res: dict, md: str, json_path: Path | None, md_path: Path | None) -> None:
    """Print the markdown table; write the JSON and the table where asked."""
    print(md)
    for path, text in ((json_path, json.dumps(res, indent=2)), (md_path, md)):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--release", required=True, help="checkpoint in the released layout (for mlx-lm)")
    ap.add_argument("--converted", required=True, help="the same checkpoint converted by mlx-gptoss")
    ap.add_argument("--engines", default="mlx-gptoss,mlx-lm")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=8)
    ap.add_argument("--warmup-tokens", type=int, default=4)
    ap.add_argument("--prefill-step", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        path = args.converted if args.worker.startswith("mlx-gptoss") else args.release
        res = worker(args.worker, path, args.prompt_tokens, args.gen_tokens, args.warmup_tokens, args.prefill_step, args.seed)
        print("RESULT " + json.dumps(res), flush=True)
        return
    results = run_engines(__file__, argv, args.engines)
    res = {**record(args), "results": results}
    write_outputs(res, markdown(res), args.json, args.markdown)


if __name__ == "__main__":
    main()
