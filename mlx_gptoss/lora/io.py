"""Our adapter folder: ``adapters.safetensors`` (contract names, float32) + ``adapter_config.json``.

``adapter_config.json``::

    {"format": "mlx-gptoss-lora", "version": 1, "rank": 8, "alpha": 16.0, "targets": [...],
     "layers": null | [...], "rslora": false, "dropout": 0.0,
     "base_model": {"fingerprint": "sha256:...", "name": "..."}, "extra": {...}}

A folder is written whole or not at all (a temporary sibling renamed into place), and an adapter
is loaded only onto the base model it was trained on (:func:`base_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..config import GptOssConfig
from ..safetensors_io import SafetensorsError, read_header
from .adapters import LoRAError, LoRALinear, LoRASpec, apply_lora, lora_parameters, remove_lora, set_lora_parameters
from .files import CONFIG as CONFIG
from .files import FORMAT as FORMAT
from .files import VERSION as VERSION
from .files import WEIGHTS as WEIGHTS
from .files import read_adapter_config, read_weights, write_folder
from .formats import detect_adapter_format, read_adapter

# The architecture fields that shape the weights; quantization is left out on purpose (an adapter
# trained on the 8-bit attention of the 16 GB preset fits the same base in bf16).
_ARCH_FIELDS = (
    "num_hidden_layers", "num_local_experts", "num_experts_per_tok", "vocab_size", "hidden_size",
    "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads", "sliding_window", "layer_types",
)  # fmt: skip


def base_fingerprint(model_or_path: Any) -> str:
    """A stable id of a base model's weights: ``"sha256:<hex>"``.

    Covers the architecture fields of the config (not the quantization preset) and, for every
    layer, the router's weight and bias and the attention sinks, rounded to bfloat16 (the released
    precision) so the id is the same whatever dtype the model was loaded at. These tensors are small
    (about 4.5 MB for the 20b) and differ between any two trained models, fine-tunes included.
    Accepts a loaded model or a converted folder (read through memory maps, nothing else loaded).
    """
    if isinstance(model_or_path, (str, Path)):
        path = Path(model_or_path)
        cfg = GptOssConfig.from_file(path / "config.json")
        infos = {}
        for f in sorted(path.glob("*.safetensors")):
            try:
                infos.update(read_header(f)[0])
            except SafetensorsError as e:
                raise LoRAError(str(e)) from None
        tensors = {}
        for name in _fingerprint_keys(cfg):
            if name not in infos:
                raise LoRAError(f"{path}: tensor {name!r} not found; is this a converted gpt-oss folder?")
            info = infos[name]
            a = mx.array(info.read_numpy())
            tensors[name] = a.view(mx.bfloat16) if info.dtype == "BF16" else a
    else:
        cfg = model_or_path.config
        tensors = {}
        for i, layer in enumerate(model_or_path.layers):
            router = layer.mlp.router.base if isinstance(layer.mlp.router, LoRALinear) else layer.mlp.router
            tensors[f"layers.{i}.mlp.router.weight"] = router.weight
            tensors[f"layers.{i}.mlp.router.bias"] = router.bias
            tensors[f"layers.{i}.self_attn.sinks"] = layer.self_attn.sinks
    h = hashlib.sha256()
    h.update(json.dumps({k: getattr(cfg, k) for k in _ARCH_FIELDS}, sort_keys=True).encode())
    for name in _fingerprint_keys(cfg):
        t = tensors[name].astype(mx.bfloat16)
        h.update(name.encode())
        h.update(np.array(t.view(mx.uint16)).tobytes())
    return "sha256:" + h.hexdigest()


def _fingerprint_keys(cfg: GptOssConfig) -> list[str]:
    return [f"layers.{i}.{k}" for i in range(cfg.num_hidden_layers)
            for k in ("mlp.router.weight", "mlp.router.bias", "self_attn.sinks")]  # fmt: skip


def save_adapter(
    model: Any,
    spec: LoRASpec,
    dst: str | Path,
    *,
    base_fingerprint: str,
    base_name: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the model's adapters to the folder ``dst`` atomically; returns ``dst``.

    The folder is built beside ``dst`` and renamed into place, so a crash never leaves a
    half-written folder under that name; an existing adapter folder at ``dst`` is replaced, any
    other non-empty folder is refused. ``extra`` (JSON-serialisable) is stored as is.
    """
    dst = Path(dst)
    params = lora_parameters(model)
    if not params:
        raise LoRAError("the model has no adapters to save (apply_lora first)")
    config = {"format": FORMAT, "version": VERSION, **spec.to_dict(),
              "base_model": {"fingerprint": base_fingerprint, **({"name": base_name} if base_name else {})}}  # fmt: skip
    if extra is not None:
        config["extra"] = extra
    tensors = {k: v.astype(mx.float32) for k, v in params.items()}
    return write_folder(dst, WEIGHTS, tensors, {"format": FORMAT}, config)


def load_adapter(model: Any, src: str | Path) -> LoRASpec:
    """Check the adapter folder ``src`` against ``model`` and apply it, unfused; returns its spec.

    Our folders are checked against the model's base fingerprint; PEFT and mlx-lm folders, which
    record none, are read by :func:`~mlx_gptoss.lora.formats.read_adapter` and checked by shape.
    Refused with a :class:`LoRAError` naming the file (and key): another base model (both
    fingerprints named), a bad config, a missing, extra, mis-shaped, non-float or non-finite
    tensor, a truncated or corrupt weights file. On any error the model is left without adapters.
    """
    src = Path(src).expanduser()
    if not src.is_dir():
        raise LoRAError(f"{src}: no such adapter folder")
    if detect_adapter_format(src) != "mlx-gptoss":
        spec, flat = read_adapter(src, model)
        source = str(src)
    else:
        spec, flat = _read_ours(model, src)
        source = str(src / WEIGHTS)
    apply_lora(model, spec)
    try:
        set_lora_parameters(model, flat, source=source)
    except BaseException:
        remove_lora(model)
        raise
    return spec


def _read_ours(model: Any, src: Path) -> tuple[LoRASpec, dict[str, mx.array]]:
    cfg = read_adapter_config(src)
    fields = {k: v for k, v in cfg.items() if k not in ("format", "version", "base_model", "extra")}
    try:
        spec = LoRASpec.from_dict(fields)
    except (LoRAError, TypeError) as e:
        raise LoRAError(f"{src / CONFIG}: {e}") from None
    want, have = cfg["base_model"]["fingerprint"], base_fingerprint(model)
    if want != have:
        name = cfg["base_model"].get("name")
        raise LoRAError(
            f"{src}: this adapter was trained on another base model ({want}{f', {name}' if name else ''}); "
            f"the loaded model is {have}"
        )
    return spec, read_weights(src / WEIGHTS)
