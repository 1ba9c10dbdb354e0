"""MoE-layer micro-benchmark: our dispatch vs MLX's gather_qmm path (the twins) vs mlx-lm's layer.

    python benchmarks/bench_moe.py --json benchmarks/results/moe-<device>.json

One gpt-oss-20b MoE layer (router + top-4 + 32 MXFP4 experts of 2880x5760 / 2880x2880), random
weights, bf16 activations, T = 1, 4, 16, 128, 2048 tokens. Four copies of the layer's weights
are cycled (as consecutive layers would be) and routings vary, so no call finds the previous
call's experts in the GPU's L2 cache. Each timing queues ``--reps`` calls and evaluates them
together (steady-state throughput, no per-call host sync); compilation and the first call are
excluded and reported apart. GB/s counts the expert bytes a call must read at least once (each
selected expert's MXFP4 codes, scales and biases).

Variants: ``mlx-gptoss`` (the dispatcher: decode kernels up to kernels.DECODE_MAX_TOKENS tokens,
sorted gather_qmm above), ``twin`` (MLX_GPTOSS_KERNELS=twin: gather_qmm everywhere),
``kernels`` (decode kernels at every T, to place the threshold), ``mlx-lm`` (its MLPBlock with
the same weights). ``--sweep`` also times launch shapes of the two expert kernels at T = 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

E, K, H, I = 32, 4, 2880, 2880
COPIES = 4
EXPERT_BYTES = (2 * I * H // 2 + 2 * I * H // 32 + 2 * I * 2) + (H * I // 2 + H * I // 32 + H * 2)  # codes, scales, bias


def make_layers(seed: int = 0):
    from mlx_gptoss.config import GptOssConfig
    from mlx_gptoss.model import MoE

    cfg = GptOssConfig.gpt_oss_20b()
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(COPIES):
        m = MoE(cfg)
        m.router.weight = mx.array(rng.normal(0, 0.05, (E, H)).astype(np.float32)).astype(mx.bfloat16)
        m.router.bias = mx.array(rng.normal(0, 0.5, (E,)).astype(np.float32)).astype(mx.bfloat16)
        for lin, d_out, d_in in ((m.gate_up, 2 * I, H), (m.down, H, I)):
            lin.weight = mx.array(rng.integers(0, 2**32, (E, d_out, d_in // 8), dtype=np.uint32))
            lin.scales = mx.array(rng.integers(118, 124, (E, d_out, d_in // 32), dtype=np.uint8))
            lin.bias = mx.array(rng.normal(0, 0.1, (E, d_out)).astype(np.float32)).astype(mx.bfloat16)
        mx.eval(m.parameters())
        layers.append(m)
    return layers


def mlx_lm_layers(ours):
    """mlx-lm's MLPBlock holding the same weights (its gate/up are our even/odd rows)."""
    import mlx.nn as nn
    from mlx_lm.models.gpt_oss import MLPBlock, ModelArgs

    args = ModelArgs(num_local_experts=E, num_experts_per_tok=K, hidden_size=H, intermediate_size=I)
    out = []
    for m in ours:
        b = MLPBlock(args)
        nn.quantize(b.experts, group_size=32, bits=4, mode="mxfp4")
        g, d = m.gate_up, m.down
        w = [("router.weight", m.router.weight), ("router.bias", m.router.bias)]
        for name, rows in (("gate_proj", slice(0, None, 2)), ("up_proj", slice(1, None, 2))):
            w += [(f"experts.{name}.weight", mx.contiguous(g.weight[:, rows])), (f"experts.{name}.scales", mx.contiguous(g.scales[:, rows])),
                  (f"experts.{name}.bias", mx.contiguous(g.bias[:, rows]))]  # fmt: skip
        w += [("experts.down_proj.weight", d.weight), ("experts.down_proj.scales", d.scales), ("experts.down_proj.bias", d.bias)]
        b.load_weights(w, strict=True)
        mx.eval(b.parameters())
        out.append(b)
    return out


def unique_expert_bytes(layer, x) -> int:
    from mlx_gptoss.kernels import ops

    ids, _ = ops.route_topk_softmax(layer.router(x), K)
    return len(np.unique(np.array(ids))) * EXPERT_BYTES


def time_calls(fn, layers, xs, reps: int) -> tuple[float, float]:
    """(first call incl. compilation, steady-state seconds per call)."""
    t = time.perf_counter()
    mx.eval(fn(layers[0], xs[0]))
    first = time.perf_counter() - t
    for i in range(2):
        mx.eval(fn(layers[i % COPIES], xs[i % len(xs)]))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        outs = [fn(layers[i % COPIES], xs[i % len(xs)]) for i in range(reps)]
        mx.eval(outs)
        best = min(best, (time.perf_counter() - t) / reps)
    return first, best


def device_name() -> str:
    try:
        info = mx.device_info()
        return str(info.get("device_name") or info.get("architecture") or mx.default_device())
    except Exception:  # noqa: BLE001 - older MLX
        return str(mx.default_device())


PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0}  # spec sheet (SXM); M-series: pass --peak-gbps
# Launch shapes (WARPS, JW) tried by --sweep, per dialect: around each default of gpu.LAUNCH. Metal
# keeps JW <= 4 (register budget, see gpu.py) and tries more SIMD groups per threadgroup.
SWEEP = {
    "cuda": [(4, 4), (8, 4), (4, 2), (2, 4), (8, 2), (4, 8), (2, 2), (8, 1)],
    "metal": [(8, 2), (4, 2), (16, 2), (8, 1), (16, 1), (4, 4), (8, 4), (2, 2)],
}


def main(argv: list[str] | None = None) -> None:
    from mlx_gptoss import kernels
    from mlx_gptoss.kernels import gpu

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,4,16,128,2048")
    ap.add_argument("--variants", default="mlx-gptoss,twin,kernels,mlx-lm")
    ap.add_argument("--kernel-max-tokens", type=int, default=128, help="largest T for the 'kernels' variant")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--peak-gbps", type=float, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    name = device_name()
    peak = args.peak_gbps or next((v for k, v in PEAK_GBPS.items() if k in name), None)
    backend = kernels.backend()
    print(f"device {name} backend {backend} peak {peak} GB/s", flush=True)
    layers = make_layers()
    variants = args.variants.split(",")
    peers = mlx_lm_layers(layers) if "mlx-lm" in variants else None
    rng = np.random.default_rng(1)

    def ours(layer, x):
        return layer(x)

    rows = []
    for T in [int(t) for t in args.tokens.split(",")]:
        xs = [mx.array(rng.normal(0, 1, (T, H)).astype(np.float32)).astype(mx.bfloat16) for _ in range(7)]
        mx.eval(xs)
        nbytes = np.mean([unique_expert_bytes(layers[i % COPIES], xs[i]) for i in range(7)])
        reps = max(3, min(args.reps, int(args.reps * 16 / T) + 3))
        if peers is not None:  # the peer must compute the same function on the same weights
            a, b = np.array(layers[0](xs[0]).astype(mx.float32)), np.array(peers[0](xs[0]).astype(mx.float32))
            rows.append({"T": T, "variant": "check", "max_rel_diff_vs_mlx_lm": float(np.abs(a - b).max() / np.abs(b).max())})
            print(json.dumps(rows[-1]), flush=True)
        for v in variants:
            if v == "kernels" and (backend == "twin" or T > args.kernel_max_tokens):
                continue
            saved = kernels.DECODE_MAX_TOKENS
            try:
                if v == "twin":
                    kernels.set_mode("twin")
                if v == "kernels":
                    kernels.DECODE_MAX_TOKENS = 1 << 30
                if v == "mlx-lm":
                    first, sec = time_calls(lambda b, x: b(x), peers, xs, reps)
                else:
                    first, sec = time_calls(ours, layers, xs, reps)
            except Exception as e:  # noqa: BLE001 - a failing variant is a result
                rows.append({"T": T, "variant": v, "error": repr(e)})
                print(rows[-1], flush=True)
                continue
            finally:
                kernels.set_mode("auto")
                kernels.DECODE_MAX_TOKENS = saved
            gbps = nbytes / sec / 1e9
            rows.append({"T": T, "variant": v, "us": sec * 1e6, "first_call_ms": first * 1e3, "expert_bytes": nbytes,
                         "gbps": gbps, "frac_peak": gbps / peak if peak else None})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)

    sweep = []
    if args.sweep and backend != "twin":
        x = mx.array(rng.normal(0, 1, (1, H)).astype(np.float32)).astype(mx.bfloat16)
        routes = [mx.array(np.stack([rng.choice(E, K, replace=False)]).astype(np.uint32)) for _ in range(7)]
        wts = mx.array(np.full((1, K), 0.25, np.float32)).astype(mx.bfloat16)
        act = mx.zeros((1, K, I), mx.float32)
        for launch in SWEEP[backend]:

            def gate_up(layer, r, launch=launch):
                g = layer.gate_up
                return gpu.mxfp4_gate_up_swiglu(
                    x, r, g.weight, g.scales, g.bias, limit=7.0, alpha=1.702, dialect=backend, launch=launch
                )

            def down(layer, r, launch=launch):
                d = layer.down
                return gpu.mxfp4_down_combine(
                    act, r, wts, d.weight, d.scales, d.bias, out_dtype=mx.bfloat16, dialect=backend, launch=launch
                )

            for which, fn, nb in (("gate_up", gate_up, K * (EXPERT_BYTES * 2 // 3)), ("down", down, K * (EXPERT_BYTES // 3))):
                try:
                    _, sec = time_calls(fn, layers, routes, args.reps)
                    sweep.append(
                        {"kernel": which, "warps": launch[0], "per_warp": launch[1], "us": sec * 1e6, "gbps": nb / sec / 1e9}
                    )
                except Exception as e:  # noqa: BLE001
                    sweep.append({"kernel": which, "warps": launch[0], "per_warp": launch[1], "error": repr(e)})
                print(json.dumps(sweep[-1]), flush=True)

    router = []
    if args.sweep and backend != "twin":  # the router folded into the routing kernel (kernels.FUSED_ROUTER), T = 1 and 4
        from mlx_gptoss.kernels import ops

        for T in (1, 4):
            xs = [mx.array(rng.normal(0, 1, (T, H)).astype(np.float32)).astype(mx.bfloat16) for _ in range(7)]
            unfused = lambda layer, x: gpu.route_topk_softmax(layer.router(x), K, dialect=backend)  # noqa: E731
            fused = lambda layer, x: gpu.route_matvec_topk(x, layer.router.weight, layer.router.bias, K, dialect=backend)  # noqa: E731
            twin = lambda layer, x: ops.route_matvec_topk(x, layer.router.weight, layer.router.bias, K)  # noqa: E731
            for which, fn in (("router + route kernel", unfused), ("fused route_matvec", fused), ("twin", twin)):
                try:
                    router.append({"T": T, "variant": which, "us": time_calls(fn, layers, xs, args.reps)[1] * 1e6})
                except Exception as e:  # noqa: BLE001
                    router.append({"T": T, "variant": which, "error": repr(e)})
                print(json.dumps(router[-1]), flush=True)

    res = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": name, "backend": backend, "router": router,
           "mlx": mx.__version__, "peak_gbps": peak, "decode_max_tokens": kernels.DECODE_MAX_TOKENS,
           "launch": gpu.LAUNCH.get(backend), "rows": rows, "sweep": sweep,
           "command": "python benchmarks/bench_moe.py " + " ".join(argv if argv is not None else sys.argv[1:])}  # fmt: skip
    print(markdown(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")


def markdown(res: dict) -> str:
    by = {(r["T"], r["variant"]): r for r in res["rows"] if "us" in r}
    Ts = sorted({r["T"] for r in res["rows"]})
    out = [f"MoE layer, {res['device']} ({res['backend']}), mlx {res['mlx']}, {res['date']}: µs per call (GB/s)", "",
           "| T | mlx-gptoss | twin (gather_qmm) | kernels | mlx-lm | ours / mlx-lm |", "|---|---|---|---|---|---|"]  # fmt: skip
    for T in Ts:
        cell = lambda v: f"{by[(T, v)]['us']:.1f} ({by[(T, v)]['gbps']:.0f})" if (T, v) in by else "-"  # noqa: E731
        ratio = (
            f"{by[(T, 'mlx-lm')]['us'] / by[(T, 'mlx-gptoss')]['us']:.2f}x"
            if (T, "mlx-lm") in by and (T, "mlx-gptoss") in by
            else "-"
        )
        out.append(f"| {T} | {cell('mlx-gptoss')} | {cell('twin')} | {cell('kernels')} | {cell('mlx-lm')} | {ratio} |")
    return "\n".join(out)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
