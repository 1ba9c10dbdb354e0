"""A stable id of a base model's weights, for files that only fit one model (adapters, routing statistics)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .config import GptOssConfig
from .converted import LoadError, read_tensors

# The architecture fields that shape the weights; quantization is left out on purpose (an adapter
# trained on the 8-bit attention of the 16 GB preset fits the same base in bf16).
ARCH_FIELDS = (
    "num_hidden_layers", "num_local_experts", "num_experts_per_tok", "vocab_size", "hidden_size",
    "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads", "sliding_window", "layer_types",
)  # fmt: skip


def base_fingerprint(model_or_path: Any) -> str:
    """``"sha256:<hex>"`` of a base model: a loaded model or a converted folder (read through memory maps).

    Covers the architecture fields of the config (not the quantization preset) and, for every
    layer, the router's weight and bias and the attention sinks, rounded to bfloat16 (the released
    precision) so the id is the same whatever dtype the model was loaded at. These tensors are small
    (about 4.5 MB for the 20b) and differ between any two trained models, fine-tunes included.
    """
    if isinstance(model_or_path, (str, Path)):
        path = Path(model_or_path)
        cfg = GptOssConfig.from_file(path / "config.json")
        infos = read_tensors(path)
        tensors = {}
        for name in _keys(cfg):
            if name not in infos:
                raise LoadError(f"{path}: tensor {name!r} not found; is this a converted gpt-oss folder?")
            info = infos[name]
            a = mx.array(info.read_numpy())
            tensors[name] = a.view(mx.bfloat16) if info.dtype == "BF16" else a
    else:
        cfg = model_or_path.config
        tensors = {}
        for i, layer in enumerate(model_or_path.layers):
            router = getattr(layer.mlp.router, "base", layer.mlp.router)  # an adapter wraps the base layer as .base
            tensors[f"layers.{i}.mlp.router.weight"] = router.weight
            tensors[f"layers.{i}.mlp.router.bias"] = router.bias
            tensors[f"layers.{i}.self_attn.sinks"] = layer.self_attn.sinks
    h = hashlib.sha256()
    h.update(json.dumps({k: getattr(cfg, k) for k in ARCH_FIELDS}, sort_keys=True).encode())
    for name in _keys(cfg):
        t = tensors[name].astype(mx.bfloat16)
        h.update(name.encode())
        h.update(np.array(t.view(mx.uint16)).tobytes())
    return "sha256:" + h.hexdigest()


def _keys(cfg: GptOssConfig) -> list[str]:
    return [f"layers.{i}.{k}" for i in range(cfg.num_hidden_layers)
            for k in ("mlp.router.weight", "mlp.router.bias", "self_attn.sinks")]  # fmt: skip
