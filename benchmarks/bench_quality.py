"""The quality cost of storing non-expert weights quantized, against the unquantized model.

    python benchmarks/bench_quality.py --model /work/bench/gpt-oss-20b-mlx --tokens 16 --json bench-out/quality.json

For each choice (attention, unembedding, embedding at 8/6/4-bit affine or mxfp8, and the 16gb
preset) the component is quantized exactly as `mlx-gptoss convert` would (``mx.quantize`` of the
stored bf16 weights), and the next-token distributions over a fixed token set are compared with
the unquantized model's: mean KL(unquantized || quantized) in nats and top-1 agreement. The MXFP4
experts are never changed.

Random weights make a deep MoE chaotic: the router's top-4 sits on near-ties, so any perturbation
(quantization, or merely computing in float32 instead of bf16 — the "control" row) flips experts
and the free-running outputs diverge. So the comparison is made with the routing replayed from the
unquantized run (same experts, the weights' effect alone); the free-running figures are reported
too. With random weights this measures numerical perturbation, not language quality: perplexity
on real text needs the real weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import mlx_gptoss
from mlx_gptoss.config import QuantSpec
from mlx_gptoss.layers import QuantLinear

CHOICES = [
    ("attention", "8"), ("attention", "6"), ("attention", "4"), ("attention", "mxfp8"),
    ("lm_head", "8"), ("lm_head", "6"), ("lm_head", "4"), ("lm_head", "mxfp8"),
    ("embed_tokens", "8"), ("embed_tokens", "4"),
]  # fmt: skip
PRESET_16GB = {"attention": "8", "lm_head": "8", "embed_tokens": "8"}


def _quantized_linear(lin, spec: QuantSpec) -> QuantLinear:
    d_out, d_in = lin.weight.shape
    q = QuantLinear(d_in, d_out, "bias" in lin, spec)
    parts = mx.quantize(lin.weight, group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
    q.weight, q.scales = parts[0], parts[1]
    if spec.mode == "affine":
        q.biases = parts[2]
    if "bias" in lin:
        q.bias = lin.bias
    return q


def quantize(model, component: str, spec: QuantSpec):
    """Swap ``component`` for its quantized form; returns a function that puts it back."""
    import mlx.nn as nn

    saved = []
    if component == "attention":
        for layer in model.layers:
            att = layer.self_attn
            saved.append((att, "qkv", att.qkv))
            saved.append((att, "o_proj", att.o_proj))
            att.qkv, att.o_proj = _quantized_linear(att.qkv, spec), _quantized_linear(att.o_proj, spec)
    elif component == "lm_head":
        saved.append((model, "lm_head", model.lm_head))
        model.lm_head = _quantized_linear(model.lm_head, spec)
    elif component == "embed_tokens":
        emb = model.embed_tokens
        q = nn.QuantizedEmbedding(*emb.weight.shape, group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
        parts = mx.quantize(emb.weight, group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
        q.weight, q.scales = parts[0], parts[1]
        if spec.mode == "affine":
            q.biases = parts[2]
        saved.append((model, "embed_tokens", emb))
        model.embed_tokens = q
    else:
        raise ValueError(component)

    def restore():
        for obj, name, mod in saved:
            setattr(obj, name, mod)

    return restore


class Routing:
    """Records the experts chosen in one forward pass, and replays them in later ones."""

    def __init__(self):
        from mlx_gptoss import kernels

        self.kernels, self.original = kernels, kernels.route_topk_softmax
        self.recorded: list[mx.array] = []
        self.mode = "off"
        self._i = 0
        kernels.route_topk_softmax = self._route

    def _route(self, logits: mx.array, k: int):
        if self.mode == "replay":
            idx = self.recorded[self._i]
            self._i += 1
            top = mx.take_along_axis(logits, idx.astype(mx.int32), axis=-1)
            return idx, mx.softmax(top, axis=-1, precise=True)
        idx, w = self.original(logits, k)
        if self.mode == "record":
            mx.eval(idx)
            self.recorded.append(idx)
        return idx, w

    def start(self, mode: str) -> None:
        self.mode, self._i = mode, 0


def log_probs(model, ids: mx.array) -> np.ndarray:
    logits = model(ids)[0].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    p = np.exp(ref)
    kl = (p * (ref - got)).sum(-1)
    return {
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a converted checkpoint without quantization")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replay-only", action="store_true", help="skip the free-running comparison (half the time)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    model = mlx_gptoss.load(a.model, lazy=False)
    if model.config.quantization:
        sys.exit(f"{a.model} is already quantized; give the unquantized conversion")
    ids = mx.array(np.random.default_rng(a.seed).integers(0, min(199998, model.config.vocab_size), (1, a.tokens)))
    routing = Routing()
    t = time.perf_counter()
    routing.start("record")
    ref = log_probs(model, ids)
    print(f"reference forward: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    rows = []
    variants = [({c: s}, f"{c} {QuantSpec.parse(s)}") for c, s in CHOICES] + [(PRESET_16GB, "preset 16gb (all three 8-bit)")]
    for choice, label in variants:
        restores = [quantize(model, c, QuantSpec.parse(s)) for c, s in choice.items()]
        routing.start("replay")
        row = {"variant": label, **compare(ref, log_probs(model, ids))}
        if not a.replay_only:
            routing.start("off")
            row["free"] = compare(ref, log_probs(model, ids))
        for r in restores:
            r()
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    # the control: nothing quantized, activations in float32 instead of bf16 (same weights, and no
    # second copy of them in memory: bf16 weights times float32 activations compute in float32)
    embed = model.embed_tokens
    model.embed_tokens = lambda x: embed(x).astype(mx.float32)
    routing.start("replay")
    row = {"variant": "control: nothing quantized, float32 activations", **compare(ref, log_probs(model, ids))}
    if not a.replay_only:
        routing.start("off")
        row["free"] = compare(ref, log_probs(model, ids))
    model.embed_tokens = embed
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
    print("| variant | mean KL (nats), routing replayed | top-1 agreement | mean KL, free-running | top-1, free-running |")
    print("|---|---|---|---|---|")
    for r in rows:
        free = r.get("free", {})
        print(f"| {r['variant']} | {r['kl_mean']:.2e} | {r['top1_agreement']:.1%} | "
              f"{free.get('kl_mean', float('nan')):.2e} | {free.get('top1_agreement', float('nan')):.1%} |")  # fmt: skip
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"model": a.model, "tokens": a.tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
