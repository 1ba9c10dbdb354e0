"""Memory budgets on a full-size checkpoint: decode speed and measured peak memory per budget.

    python benchmarks/bench_budget.py --converted /work/bench/gpt-oss-20b-16gb --release /work/bench/gpt-oss-20b-random \\
        --budgets unbounded,10GB,9.5GB,8GB,6GB --json bench-out/budget.json --markdown bench-out/budget.md

Each run is its own process (so its peaks are its own): load with the budget and a context of
--context tokens, reserve that much KV cache up front (so the measured peak includes a full
cache), prefill a random prompt, decode greedily. Expert-cache figures are for the decode phase
(the prefill's, cold cache included, are in the JSON). Routing: "model" is the checkpoint's own router
(random weights route almost uniformly: the worst case for an expert cache); "zipf" replaces it
by a trace in which each layer's experts are drawn i.i.d. per token from a Zipf(s) popularity over
a per-layer random order. --check-budget runs that budget and the unbounded model in float32 and
compares their greedy tokens. mlx-lm's peak on the released layout is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_e2e import peak_rss_gb, record, run_worker, write_outputs  # noqa: E402


def zipf_trace(n_layers: int, n_experts: int, k: int, s: float, seed: int):
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(seed)
    probs = []
    for _ in range(n_layers):
        p = 1.0 / np.arange(1, n_experts + 1) ** s
        probs.append(rng.permutation(p / p.sum()))

    def route(layer: int, logits):
        n = logits.shape[0]
        ids = np.stack([rng.choice(n_experts, size=k, replace=False, p=probs[layer]) for _ in range(n)])
        return mx.array(ids)

    return route


def worker(a) -> dict:
    import mlx.core as mx
    import numpy as np

    import mlx_gptoss
    from mlx_gptoss.streaming import set_routing_trace

    dtype = mx.float32 if a.dtype == "float32" else mx.bfloat16
    budget = None if a.budget == "unbounded" else a.budget
    t = time.perf_counter()
    model = mlx_gptoss.load(a.converted, dtype=dtype, memory_budget=budget, context=a.context, lazy=False)
    out = {"budget": a.budget, "routing": a.routing, "dtype": a.dtype, "load_s": time.perf_counter() - t}
    if model.memory_plan is not None:
        out["plan"] = {"expert_slots": model.memory_plan.expert_slots, "planned_mlx_gb": model.memory_plan.mlx_bytes / 1e9,
                       "prefill_step": model.memory_plan.prefill_step}  # fmt: skip
    if a.routing == "zipf" and model.stream_stats is not None:  # with every expert resident, routing changes no work
        c = model.config
        set_routing_trace(model, zipf_trace(c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok, a.zipf_s, a.seed))
    rng = np.random.default_rng(a.seed)
    prompt = rng.integers(0, min(199998, model.config.vocab_size), a.prompt_tokens).tolist()
    cache = model.make_cache(reserve=a.context)
    t0 = time.perf_counter()
    model(mx.array(prompt[:-1])[None], cache)
    mx.eval([c.state for c in cache])
    y = mx.argmax(model(mx.array(prompt[-1:])[None], cache)[:, -1, :], axis=-1)
    tokens = [y.item()]
    t1 = time.perf_counter()
    if model.stream_stats is not None:
        out["expert_cache_prefill"] = model.stream_stats.as_dict()
        model.stream_stats.reset()  # the table reports the decode phase (the cache is warm)
    for _ in range(a.gen_tokens - 1):
        y = mx.argmax(model(y[:, None], cache)[:, -1, :], axis=-1)
        tokens.append(y.item())
    t2 = time.perf_counter()
    out.update(prefill_tok_s=a.prompt_tokens / (t1 - t0), decode_tok_s=(a.gen_tokens - 1) / (t2 - t1), tokens=tokens,
               peak_mlx_gb=mx.get_peak_memory() / 1e9, peak_rss_gb=peak_rss_gb())  # fmt: skip
    if model.stream_stats is not None:
        out["expert_cache"] = model.stream_stats.as_dict()
    return out


def mlx_lm_worker(a) -> dict:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(a.release))
    cache = make_prompt_cache(model)
    y = mx.argmax(model(mx.array([[1, 2, 3, 4]]), cache=cache)[:, -1, :], axis=-1)
    for _ in range(2):
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
    mx.eval(y)
    return {"engine": "mlx-lm", "peak_mlx_gb": mx.get_peak_memory() / 1e9, "peak_rss_gb": peak_rss_gb()}


def markdown(res: dict) -> str:
    m = res["machine"]
    head = (f"Run {res['date']} on {m.get('cpu')} ({m['cpu_count']} cores, {m.get('ram_gb')} GB RAM), {m['platform']}, "
            f"mlx {m['mlx']}; checkpoint {res['args']['converted']}; context {res['args']['context']} tokens reserved; "
            f"prompt {res['args']['prompt_tokens']}, {res['args']['gen_tokens']} decoded.")  # fmt: skip
    rows = ["| routing | budget | experts resident / layer | decode tok/s | vs unbounded | peak MLX GB | peak RSS GB | hit rate | MB read / token | stall s |",
            "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    base = {r["routing"]: r["decode_tok_s"] for r in res["runs"] if r.get("budget") == "unbounded" and "error" not in r}
    for r in res["runs"]:
        if "error" in r:
            rows.append(f"| {r.get('routing')} | {r.get('budget')} | failed: {r['error']} | | | | | | | |")
            continue
        ec = r.get("expert_cache") or {}
        slots = r.get("plan", {}).get("expert_slots", "all")
        ref = base.get(r["routing"]) or base.get("model")
        rel = f"{r['decode_tok_s'] / ref:.0%}" if ref else "-"
        rows.append(f"| {r['routing']} | {r['budget']} | {slots} | {r['decode_tok_s']:.3f} | {rel} | {r['peak_mlx_gb']:.2f} | "
                    f"{r['peak_rss_gb']:.2f} | {ec.get('hit_rate', 1):.1%} | {ec.get('bytes_read_per_token', 0) / 1e6:.0f} | "
                    f"{ec.get('stall_s', 0):.2f} |")  # fmt: skip
    peer = res.get("mlx_lm")
    if peer and "error" not in peer:
        rows.append(
            f"\nmlx-lm on the released layout, same run: peak MLX {peer['peak_mlx_gb']:.2f} GB, peak RSS {peer['peak_rss_gb']:.2f} GB."
        )
    for c in res.get("checks", []):
        if "error" in c:
            rows.append(f"\nfloat32 check at {c['budget']} could not run: {c['error']}")
            continue
        rows.append(f"\nfloat32 greedy tokens, budget {c['budget']} vs unbounded: "
                    f"{'identical' if c['same'] else 'DIFFERENT'} ({c['tokens_budget']} vs {c['tokens_unbounded']}).")  # fmt: skip
    return head + "\n\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--converted", required=True)
    ap.add_argument("--release", default=None, help="released layout, for mlx-lm's peak (optional)")
    ap.add_argument("--budgets", default="unbounded,10GB,9.5GB,8GB,6GB")
    ap.add_argument("--routings", default="model,zipf")
    ap.add_argument("--zipf-s", type=float, default=1.0)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=8)
    ap.add_argument("--check-budget", default="6GB", help="float32 exactness check at this budget ('' to skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--budget", default="unbounded", help=argparse.SUPPRESS)
    ap.add_argument("--routing", default="model", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        res = mlx_lm_worker(a) if a.worker == "mlx-lm" else worker(a)
        print("RESULT " + json.dumps(res), flush=True)
        return
    common = ["--converted", a.converted, "--context", str(a.context), "--prompt-tokens", str(a.prompt_tokens),
              "--gen-tokens", str(a.gen_tokens), "--seed", str(a.seed), "--zipf-s", str(a.zipf_s)]  # fmt: skip
    runs = []
    for routing in [r for r in a.routings.split(",") if r]:
        for budget in [b for b in a.budgets.split(",") if b]:
            if routing == "zipf" and budget == "unbounded":
                continue  # routing does not change the unbounded model's work
            print(f"{routing} {budget} ...", file=sys.stderr, flush=True)
            r = run_worker(__file__, [*common, "--worker", "ours", "--budget", budget, "--routing", routing])
            r.setdefault("budget", budget), r.setdefault("routing", routing)
            runs.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    checks = []
    if a.check_budget:
        f32 = [
            run_worker(__file__, [*common, "--worker", "ours", "--budget", b, "--dtype", "float32"])
            for b in ("unbounded", a.check_budget)
        ]
        print(json.dumps(f32), file=sys.stderr, flush=True)
        if all("tokens" in r for r in f32):
            checks.append({"budget": a.check_budget, "same": f32[0]["tokens"] == f32[1]["tokens"],
                           "tokens_unbounded": f32[0]["tokens"], "tokens_budget": f32[1]["tokens"], "runs": f32})  # fmt: skip
        else:
            checks.append({"budget": a.check_budget, "error": next(r["error"] for r in f32 if "error" in r)})
    peer = run_worker(__file__, ["--converted", a.converted, "--release", a.release, "--worker", "mlx-lm"]) if a.release else None
    res = {**record(a, "budget", "routing", "dtype"), "runs": runs, "checks": checks, "mlx_lm": peer}
    write_outputs(res, markdown(res), a.json, a.markdown)


if __name__ == "__main__":
    main()
