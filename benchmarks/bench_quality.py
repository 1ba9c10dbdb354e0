"""The quality cost of storing non-expert weights quantized, against the unquantized model.

    python benchmarks/bench_quality.py --model /work/bench/gpt-oss-20b-mlx --tokens 16 --json bench-out/quality.json

For each choice (attention, unembedding, embedding at 8/6/4-bit affine or mxfp8, and the 16gb
preset) the component is quantized exactly as `mlx-gptoss convert` would (``mx.quantize`` of the
stored bf16 weights), and the next-token distributions over a fixed token set are compared with
the unquantized model's: mean KL(unquantized || quantized) in nats and top-1 agreement. The MXFP4
experts are never changed. With random weights this measures numerical perturbation, not language
quality: perplexity on real text needs the real weights.
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


def log_probs(model, ids: mx.array) -> np.ndarray:
    logits = model(ids)[0].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    p = np.exp(ref)
    kl = (p * (ref - got)).sum(-1)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a converted checkpoint without quantization")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    model = mlx_gptoss.load(a.model, lazy=False)
    if model.config.quantization:
        sys.exit(f"{a.model} is already quantized; give the unquantized conversion")
    ids = mx.array(np.random.default_rng(a.seed).integers(0, min(199998, model.config.vocab_size), (1, a.tokens)))
    t = time.perf_counter()
    ref = log_probs(model, ids)
    print(f"reference forward: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    rows = []
    variants = [({c: s}, f"{c} {QuantSpec.parse(s)}") for c, s in CHOICES] + [(PRESET_16GB, "preset 16gb (all three 8-bit)")]
    for choice, label in variants:
        restores = [quantize(model, c, QuantSpec.parse(s)) for c, s in choice.items()]
        row = {"variant": label, **compare(ref, log_probs(model, ids))}
        for r in restores:
            r()
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"| variant | mean KL (nats) | max KL | top-1 agreement |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['kl_mean']:.2e} | {r['kl_max']:.2e} | {r['top1_agreement']:.1%} |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"model": a.model, "tokens": a.tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
