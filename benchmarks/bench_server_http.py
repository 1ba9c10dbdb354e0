"""Load on loopback: many concurrent clients against one served model, bounded in count and time.

    python benchmarks/bench_server_http.py --model CONVERTED_DIR --clients 50 --waves 5 --json bench-out/server-load.json

Each wave starts ``--clients`` clients at once (threads, httpx, Chat Completions, not streamed,
``--gen-tokens`` greedy tokens each) against ``create_app(Engine(model, max_queue=...))`` served
by uvicorn in this process. Every request must complete (200) or be refused (429) within
``--timeout`` seconds: anything else, or a request still open, is a failure. After each wave the
process's RSS and MLX's active memory are recorded, to show they stay flat across waves. The model
is rigged (``tests/rig.py``, via ``bench_server.rig_for_decode``) to answer in the final channel,
so every reply is ``--gen-tokens`` tokens long.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import machine  # noqa: E402 - the same machine record
from bench_server import LocalServer, rig_for_decode  # noqa: E402 - the same rig and local server


def wave(base_url: str, clients: int, gen_tokens: int, timeout: float) -> dict:
    """``clients`` requests at once; their status codes and latencies."""
    import httpx

    results: list[tuple[int | str, float]] = []
    lock = threading.Lock()
    body = {"model": "bench", "messages": [{"role": "user", "content": "Tell me a story."}], "temperature": 0,
            "max_tokens": gen_tokens}  # fmt: skip

    def one() -> None:
        t = time.perf_counter()
        try:
            status: int | str = httpx.post(f"{base_url}/chat/completions", json=body, timeout=timeout).status_code
        except httpx.HTTPError as e:
            status = type(e).__name__
        with lock:
            results.append((status, time.perf_counter() - t))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, daemon=True) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout + 5)
    codes = [s for s, _ in results]
    return {"wall_s": time.perf_counter() - t0, "ok": codes.count(200), "refused_429": codes.count(429),
            "other": [s for s in codes if s not in (200, 429)], "unfinished": clients - len(results),
            "max_latency_s": max((t for _, t in results), default=None)}  # fmt: skip


def memory() -> dict:
    import mlx.core as mx
    import psutil

    return {"rss_mb": psutil.Process().memory_info().rss / 1e6, "mlx_active_mb": mx.get_active_memory() / 1e6}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a converted checkpoint")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--waves", type=int, default=5)
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=120.0, help="the longest a request may take (seconds)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import mlx_gptoss
    from mlx_gptoss.server.engine import Engine

    model = mlx_gptoss.load(args.model)
    rig_for_decode(model)
    engine = Engine(model, max_queue=args.max_queue)
    local = LocalServer(engine)
    out: dict = {"model": args.model, "machine": machine(), **{k: getattr(args, k) for k in ("clients", "waves", "max_queue", "gen_tokens")},
                 "before": memory(), "waves_": []}  # fmt: skip
    try:
        wave(local.base_url, 2, args.gen_tokens, args.timeout)  # warm-up
        out["after_warmup"] = memory()
        print("| wave | completed | 429 | other | unfinished | wall s | slowest s | RSS MB | MLX active MB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for i in range(args.waves):
            w = {**wave(local.base_url, args.clients, args.gen_tokens, args.timeout), **memory()}
            out["waves_"].append(w)
            print(f"| {i + 1} | {w['ok']} | {w['refused_429']} | {len(w['other'])} | {w['unfinished']} | {w['wall_s']:.2f} | "
                  f"{w['max_latency_s']:.2f} | {w['rss_mb']:.0f} | {w['mlx_active_mb']:.0f} |")  # fmt: skip
    finally:
        local.close()
        engine.close()
    out["waves"] = out.pop("waves_")
    bad = [w for w in out["waves"] if w["other"] or w["unfinished"]]
    print(f"\n{'FAIL' if bad else 'ok'}: every request completed or got 429" + (f" except in {len(bad)} wave(s)" if bad else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
