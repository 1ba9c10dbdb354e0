"""Decode speed with a LoRA adapter loaded (unfused) vs without: same model, same run, a ratio.

    python benchmarks/make_checkpoint.py --size 20b --layers 2 /tmp/lora-bench/release
    mlx-gptoss convert /tmp/lora-bench/release /tmp/lora-bench/converted
    python benchmarks/bench_lora_decode.py /tmp/lora-bench/converted --json bench-out/lora_decode.json

One model is loaded with an adapter (rank 8 on attention and the experts of every layer,
random nonzero B) that is switched on and off between decode steps, so both sides see the same
weights, the same KV cache, the same machine load and thermal drift (this 2-core machine is
shared, so alternating step by step is what keeps the comparison fair). Each round prefills a
fresh random prompt and greedily decodes ``--gen-tokens`` steps, each evaluated on its own;
the ratio of the median step times is reported (target: at most 15 % slower). The same is
measured for the decoder layers alone (no unembedding), the part the adapter changes: with few
layers the unembedding dominates a step, so this ratio is the one that carries to the full
model. ``--requant`` also measures how much of an expert update MXFP4 re-quantization loses,
on layer 0's expert 0 gate_up at the model's widths.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import machine  # noqa: E402 - the same machine record


def _adapter(model, rank: int, targets: tuple[str, ...], seed: int):
    """Put a rank-``rank`` adapter with random nonzero B on ``model`` (B = 0 would skip nothing, but hides errors)."""
    import mlx.core as mx
    import numpy as np

    from mlx_gptoss.lora.adapters import LoRASpec, apply_lora, lora_parameters, set_lora_parameters

    apply_lora(model, LoRASpec(rank=rank, alpha=2 * rank, targets=targets), seed=seed)
    rng = np.random.default_rng(seed)
    flat = {k: (v if k.endswith("lora_a") else mx.array(rng.normal(0, 1e-3, v.shape).astype(np.float32)))
            for k, v in lora_parameters(model).items()}  # fmt: skip
    set_lora_parameters(model, flat)
    mx.eval(model.parameters())


def _switch(model):
    """A function turning the model's adapters off (the base modules put back) and on again, cheaply."""
    saved = [
        (layer.self_attn, layer.mlp, layer.self_attn.qkv, layer.self_attn.o_proj, layer.mlp.experts_lora)
        for layer in model.layers
    ]

    def switch(on: bool) -> None:
        for attn, mlp, qkv, o, experts in saved:
            attn.qkv = qkv if on or not hasattr(qkv, "base") else qkv.base
            attn.o_proj = o if on or not hasattr(o, "base") else o.base
            mlp.experts_lora = experts if on else None

    return switch


def requant_loss(model) -> list[dict]:
    """The part of an expert update lost by re-quantizing W + ΔW into MXFP4, for updates of a few sizes."""
    import mlx.core as mx

    from mlx_gptoss.lora.fuse import mxfp4_requant_change, mxfp4_update_loss

    g = model.layers[0].mlp.gate_up
    w = mx.dequantize(g.weight[0], g.scales[0], group_size=32, bits=4, mode="mxfp4").astype(mx.float32)
    out = []
    for rel in (1e-3, 1e-2, 1e-1):
        key = mx.random.key(0)
        a = mx.random.normal((8, w.shape[1]), key=key)
        b = mx.random.normal((w.shape[0], 8), key=mx.random.split(key)[0])
        d = b @ a
        d = d * (rel * mx.linalg.norm(w.flatten()) / mx.linalg.norm(d.flatten()))  # ‖ΔW‖ = rel · ‖W‖
        out.append({"delta_rel_norm": rel, "lost": mxfp4_update_loss(g.weight[0], g.scales[0], d), "shape": list(w.shape),
                    "lost_keeping_scales": mxfp4_update_loss(g.weight[0], g.scales[0], d, keep_scales=True),
                    "requant_change_of_w": mxfp4_requant_change(g.weight[0], g.scales[0])})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("converted", help="a converted checkpoint (real widths, few layers)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="attention,experts")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="prompts, each decoded --gen-tokens steps")
    ap.add_argument("--requant", action="store_true", help="also measure MXFP4 re-quantization of an expert update")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import mlx.core as mx
    import numpy as np

    from mlx_gptoss.generate import peak_rss_gb
    from mlx_gptoss.loader import load

    model = load(args.converted, lazy=False)
    targets = tuple(t.strip() for t in args.targets.split(","))
    _adapter(model, args.rank, targets, args.seed)
    switch = _switch(model)
    vocab = min(model.config.vocab_size, 199998)
    rng = np.random.default_rng(args.seed)

    def decode(forward, rounds: int) -> tuple[list[float], list[float]]:
        """Per-step seconds without and with the adapter, alternating step by step."""
        off, on = [], []
        for r in range(rounds):
            cache = model.make_cache(args.prompt_tokens + args.gen_tokens)
            switch(False)
            y = mx.argmax(forward(mx.array(rng.integers(0, vocab, args.prompt_tokens))[None], cache)[:, -1, :], axis=-1)
            mx.eval(y)
            for i in range(args.gen_tokens):
                adapted = (i + r) % 2 == 1  # rounds start on alternate sides
                switch(adapted)
                t = time.perf_counter()
                y = mx.argmax(forward(y[:, None], cache)[:, -1, :], axis=-1)
                mx.eval(y)
                (on if adapted else off).append(time.perf_counter() - t)
        switch(True)
        return off, on

    def layers_only(ids, cache):
        return model.hidden_states(ids, cache)  # argmax over H is a valid token id: the loop still runs

    res = {"model": str(args.converted), "layers": model.config.num_hidden_layers, "rank": args.rank, "targets": list(targets),
           "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "rounds": args.rounds}  # fmt: skip
    for name, forward in (("full", model), ("layers_only", layers_only)):
        decode(forward, 1)  # warm-up: first-use allocations on both paths
        off, on = decode(forward, args.rounds)
        t_off, t_on = statistics.median(off), statistics.median(on)
        res[name] = {"step_ms_base": 1e3 * t_off, "step_ms_lora": 1e3 * t_on, "tok_s_base": 1 / t_off, "tok_s_lora": 1 / t_on,
                     "slowdown": t_on / t_off - 1, "steps_each": len(off)}  # fmt: skip
        print(
            f"{name}: {1 / t_off:.2f} tok/s without, {1 / t_on:.2f} tok/s with the adapter: {t_on / t_off - 1:+.1%} step time",
            file=sys.stderr,
        )
    res.update(peak_rss_gb=peak_rss_gb(), machine=machine(), time=time.strftime("%Y-%m-%d %H:%M:%S"))
    if args.requant:
        res["mxfp4_requant"] = requant_loss(model)
    f, lo = res["full"], res["layers_only"]
    print(f"decode: {f['tok_s_base']:.2f} tok/s without, {f['tok_s_lora']:.2f} tok/s with a rank-{args.rank} {'+'.join(targets)} "
          f"adapter on all {res['layers']} layers ({f['slowdown']:+.1%} step time; decoder layers alone {lo['slowdown']:+.1%})")  # fmt: skip
    for r in res.get("mxfp4_requant", []):
        print(
            f"MXFP4 re-quantization of an expert update with |dW| = {r['delta_rel_norm']:g} |W| ({r['shape']}): {r['lost']:.1%} of it lost "
            f"({r['lost_keeping_scales']:.1%} keeping W's scales; re-quantizing W alone changes it by {r['requant_change_of_w']:.2%})"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
