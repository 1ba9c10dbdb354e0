"""LoRA training speed and memory: mlx-gptoss vs mlx-lm on the same weights, data and adapters, same run.

    python benchmarks/make_checkpoint.py --size 20b --layers 2 /tmp/lora-release
    mlx-gptoss convert /tmp/lora-release /tmp/lora-mlx
    python benchmarks/bench_lora.py --release /tmp/lora-release --converted /tmp/lora-mlx \\
        --seq-len 64 --steps 2 --json bench-out/lora.json --markdown bench-out/lora.md

Both engines train rank-``--rank`` LoRA on attention (q, k, v, o) and on every expert of every
layer, batch 1, AdamW, on the same random token sequences with every position trained, and are
timed over the same steps after one warm-up step. Each runs in its own process, so peak memory
is its own. Adapters: mlx-lm adapts gate_proj and up_proj separately (each rank r, its layout);
ours adapts the fused gate_up with one rank-r pair per expert — mlx-lm trains slightly more
parameters, which the table states. mlx-lm runs as its trainer does by default (no gradient
checkpointing, the loss over all [T, V] logits); ours as `mlx-gptoss lora train` does (per-block
checkpointing, the loss over trained positions in chunks).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import record, run_engines, write_outputs  # noqa: E402

from mlx_gptoss.generate import peak_rss_gb  # noqa: E402


def _data(vocab: int, seq_len: int, n: int, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, min(vocab, 200000), seq_len + 1).tolist() for _ in range(n)]


def _count(params) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(params))


def run_ours(path: str, seqs: list[list[int]], rank: int, steps: int) -> dict:
    import mlx.core as mx

    import mlx_gptoss
    from mlx_gptoss.lora.adapters import LoRASpec, apply_lora
    from mlx_gptoss.lora.train import TrainConfig, train

    t = time.perf_counter()
    model = mlx_gptoss.load(path)
    mx.eval(model.parameters())
    load_s = time.perf_counter() - t
    spec = LoRASpec(rank=rank, alpha=2.0 * rank, targets=("attention", "experts"))
    apply_lora(model, spec, seed=0)
    n_params = _count(model.trainable_parameters())
    examples = [SimpleNamespace(ids=s, targets=[False] + [True] * (len(s) - 1), line=i + 1) for i, s in enumerate(seqs)]
    times: list[float] = []
    mark = [time.perf_counter()]

    def on_progress(p) -> None:
        if p.kind == "train":
            now = time.perf_counter()
            times.append(now - mark[0])
            mark[0] = now
            if len(times) == 1:
                mx.reset_peak_memory()  # the warm-up step's one-time allocations are not the steady state

    with tempfile.TemporaryDirectory() as out_dir:  # the adapter and checkpoint are not the point here
        cfg = TrainConfig(output_dir=out_dir, iterations=steps + 1, save_every=0, eval_every=0, warmup=0, seed=0)
        result = train(model, examples, None, cfg, spec=spec, on_progress=on_progress)
    measured = times[1:]
    tokens = sum(len(s) - 1 for s in seqs[1 : steps + 1])
    return {"load_s": load_s, "warmup_s": times[0], "step_s": measured, "tok_s": tokens / sum(measured),
            "final_loss": result.final_loss, "trainable_params": n_params,
            "peak_mlx_gb": mx.get_peak_memory() / 1e9, "peak_rss_gb": peak_rss_gb()}  # fmt: skip


def run_mlx_lm(path: str, seqs: list[list[int]], rank: int, steps: int) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    t = time.perf_counter()
    model, _ = load_model(Path(path))
    mx.eval(model.parameters())
    load_s = time.perf_counter() - t
    model.freeze()
    keys = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj"]  # fmt: skip
    # mlx-lm's scale is the multiplier itself; alpha / r = 2 as ours
    linear_to_lora_layers(model, len(model.layers), {"rank": rank, "scale": 2.0, "dropout": 0.0, "keys": keys})
    n_params = _count(model.trainable_parameters())
    opt = optim.AdamW(learning_rate=1e-4, weight_decay=0.0)
    loss_and_grad = nn.value_and_grad(model, default_loss)
    times, loss = [], None
    for i, s in enumerate(seqs[: steps + 1]):
        t = time.perf_counter()
        batch = mx.array(s)[None]
        lengths = mx.array([[1, len(s) - 1]])  # mlx-lm's (offset, length): every position trained
        (lv, _), grads = loss_and_grad(model, batch, lengths)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, lv)
        times.append(time.perf_counter() - t)
        loss = lv.item()
        if i == 0:
            mx.reset_peak_memory()
    tokens = sum(len(s) - 1 for s in seqs[1 : steps + 1])
    return {"load_s": load_s, "warmup_s": times[0], "step_s": times[1:], "tok_s": tokens / sum(times[1:]),
            "final_loss": loss, "trainable_params": n_params,
            "peak_mlx_gb": mx.get_peak_memory() / 1e9, "peak_rss_gb": peak_rss_gb()}  # fmt: skip


def markdown(res: dict) -> str:
    a, m = res["args"], res["machine"]
    rows = ["| engine | trainable params | warm-up s | s / step | tokens/s | peak MLX GB | peak RSS GB |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    ok = {}
    for r in res["results"]:
        if "error" in r:
            rows.append(f"| {r['engine']} | failed: {r['error']} | | | | | |")
            continue
        ok[r["engine"]] = r
        per = sum(r["step_s"]) / len(r["step_s"])
        rows.append(f"| {r['engine']} | {r['trainable_params']:,} | {r['warmup_s']:.1f} | {per:.1f} | {r['tok_s']:.2f} "
                    f"| {r['peak_mlx_gb']:.2f} | {r['peak_rss_gb']:.2f} |")  # fmt: skip
    if len(ok) == 2:
        ours, peer = ok["mlx-gptoss"], ok["mlx-lm"]
        rows.append(f"| **ratio** (mlx-gptoss / mlx-lm) | | | | {ours['tok_s'] / peer['tok_s']:.2f}x "
                    f"| {ours['peak_mlx_gb'] / peer['peak_mlx_gb']:.2f}x | {ours['peak_rss_gb'] / peer['peak_rss_gb']:.2f}x |")  # fmt: skip
    head = (f"Run {res['date']} on {m.get('cpu')} ({m['cpu_count']} cores), {m['platform']}, device {m['device']}; "
            f"mlx {m['mlx']}, mlx-lm {m.get('mlx-lm')}.  \nWeights: {a['release']} / {a['converted']}; rank "
            f"{a['rank']} on attention + every expert of every layer, batch 1, sequences of {a['seq_len']} tokens "
            f"(all trained), {a['steps']} timed steps after 1 warm-up step.")  # fmt: skip
    return head + "\n\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--release", required=True, help="checkpoint in the released layout (for mlx-lm)")
    ap.add_argument("--converted", required=True, help="the same checkpoint converted by mlx-gptoss")
    ap.add_argument("--engines", default="mlx-gptoss,mlx-lm")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        import mlx_gptoss

        vocab = mlx_gptoss.GptOssConfig.from_file(Path(args.converted) / "config.json").vocab_size
        seqs = _data(vocab, args.seq_len, args.steps + 1, args.seed)
        if args.worker == "mlx-gptoss":
            res = run_ours(args.converted, seqs, args.rank, args.steps)
        else:
            res = run_mlx_lm(args.release, seqs, args.rank, args.steps)
        print("RESULT " + json.dumps({"engine": args.worker, **res}), flush=True)
        return
    results = run_engines(__file__, argv, args.engines)
    res = {**record(args), "results": results}
    write_outputs(res, markdown(res), args.json, args.markdown)


if __name__ == "__main__":
    main()
