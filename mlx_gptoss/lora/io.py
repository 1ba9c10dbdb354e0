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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..config import GptOssConfig
from ..converted import LoadError
from ..fingerprint import base_fingerprint as _core_fingerprint
from ..models import resolve_config
from ..safetensors_io import SafetensorsError
from .adapters import (
    LoRAError,
    LoRASpec,
    adapted_shapes,
    apply_lora,
    lora_parameters,
    remove_lora,
    set_lora_parameters,
)  # fmt: skip
from .files import CONFIG as CONFIG
from .files import FORMAT as FORMAT
from .files import FUSE_RECORD as FUSE_RECORD
from .files import VERSION as VERSION
from .files import WEIGHTS as WEIGHTS
from .files import read_adapter_config, read_json, read_weights, write_folder
from .formats import MLXLM_WEIGHTS, PEFT_WEIGHTS, detect_adapter_format, read_adapter, to_mlxlm, to_peft


def base_fingerprint(model_or_path: Any) -> str:
    """:func:`mlx_gptoss.fingerprint.base_fingerprint` (arch fields, routers, sinks), its errors as LoRAError."""
    try:
        return _core_fingerprint(model_or_path)
    except (LoadError, SafetensorsError) as e:
        raise LoRAError(str(e)) from None


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
    half-written folder under that name. An existing ``dst`` is replaced only when it is empty or
    holds an adapter of ours and nothing else; any other folder is refused (a training run's
    checkpoints and metrics, notes, another tool's adapter). ``extra`` (JSON-serialisable) is stored as is.
    """
    params = lora_parameters(model)
    if not params:
        raise LoRAError("the model has no adapters to save (apply_lora first)")
    config = {"format": FORMAT, "version": VERSION, **spec.to_dict(),
              "base_model": {"fingerprint": base_fingerprint, **({"name": base_name} if base_name else {})}}  # fmt: skip
    if extra is not None:
        config["extra"] = extra
    tensors = {k: v.astype(mx.float32) for k, v in params.items()}
    return write_folder(dst, WEIGHTS, tensors, {"format": FORMAT}, config, kind="mlx-gptoss", force=True)


def load_adapter(model: Any, src: str | Path) -> LoRASpec:
    """Check the adapter folder ``src`` against ``model`` and apply it, unfused; returns its spec.

    Our folders are checked against the model's base fingerprint; PEFT and mlx-lm folders, which
    record none, are read by :func:`~mlx_gptoss.lora.formats.read_adapter` and checked by shape.
    Refused with a :class:`LoRAError` naming the file (and key): another base model (both
    fingerprints named), an adapter already fused into the model (its folder's ``fused_adapter.json``
    lists it, by content: the same adapter in any format or folder), a bad config, a missing,
    extra, mis-shaped, non-float or non-finite tensor, a truncated or corrupt weights file. On any
    error the model is left without adapters.
    """
    src = Path(src).expanduser()
    if not src.is_dir():
        raise LoRAError(f"{src}: no such adapter folder")
    ours = detect_adapter_format(src) == "mlx-gptoss"
    if ours:
        cfg, spec, flat = _read_ours(src, model.config)
        where, source = src / CONFIG, str(src / WEIGHTS)
    else:
        spec, flat = read_adapter(src, model)
        where, source = src, str(src)
    _refuse_fused(model, src, spec, flat)  # before the fingerprint: a fused router changes it, "already fused" says why
    if ours:
        _check_base(src, cfg, base_fingerprint(model))
    try:
        apply_lora(model, spec)
    except LoRAError as e:  # the spec's fields against this model: name the file they came from
        raise LoRAError(f"{where}: {e}") from None
    try:
        set_lora_parameters(model, flat, source=source)
    except BaseException:
        remove_lora(model)
        raise
    return spec


def adapter_identity(spec: LoRASpec, flat: Mapping[str, mx.array]) -> str:
    """``"sha256:..."`` of what an adapter computes: its tensors (our names, float32) and its scale.

    The same for the adapter in any of the formats read here (PEFT and mlx-lm exports read back as
    the same tensors) and in any folder: what a fused model's record lists.
    """
    h = hashlib.sha256(repr(float(np.float32(spec.scale))).encode())  # float32: the precision the update runs at
    for name in sorted(flat):
        a = np.array(flat[name].astype(mx.float32))
        h.update(f"{name} {a.shape}".encode())
        h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


def fused_adapters(model_dir: str | Path) -> list[dict[str, Any]]:
    """The adapters fused into the model folder ``model_dir`` (``[]`` for a model never fused), each
    ``{"adapter": its folder then, "adapter_id": adapter_identity or None}``, oldest first."""
    path = Path(model_dir) / FUSE_RECORD
    if not path.is_file():
        return []
    record = read_json(path, "")
    if not isinstance(record, dict):
        raise LoRAError(f"{path}: expected a JSON object")
    entries = record.get("fused_adapters")
    if entries is None and "adapter" in record:  # written before the list: the one adapter
        entries = [{"adapter": record["adapter"], "adapter_id": record.get("adapter_id")}]
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("adapter"), str) for e in entries):
        raise LoRAError(f"{path}: field 'fused_adapters' must be a list of {{'adapter': folder, 'adapter_id': id}}")
    return entries


def _refuse_fused(model: Any, src: Path, spec: LoRASpec, flat: Mapping[str, mx.array]) -> None:
    """An adapter already fused into the model's folder would add its update a second time."""
    folder = getattr(model, "path", None)
    entries = fused_adapters(folder) if folder is not None else []
    if not entries:
        return
    ident = adapter_identity(spec, flat)
    for e in entries:
        same_folder = e.get("adapter_id") is None and Path(e["adapter"]).expanduser().resolve() == src.resolve()
        if e.get("adapter_id") == ident or same_folder:
            raise LoRAError(
                f"{src}: this adapter is already fused into {folder} ({FUSE_RECORD} lists it, fused from {e['adapter']}); "
                "applying it again would add its update twice — use that model without the adapter, or apply the "
                "adapter to the base model it was fused into"
            )


def _read_ours(src: Path, model_config: GptOssConfig | None) -> tuple[dict[str, Any], LoRASpec, dict[str, mx.array]]:
    """Our folder's config, its spec (checked against the model's layers when given) and its tensors."""
    cfg = read_adapter_config(src)
    fields = {k: v for k, v in cfg.items() if k not in ("format", "version", "base_model", "extra")}
    try:
        spec = LoRASpec.from_dict(fields)
    except (LoRAError, TypeError) as e:
        raise LoRAError(f"{src / CONFIG}: {e}") from None
    if model_config is not None:
        try:
            spec.layer_ids(model_config.num_hidden_layers)
        except LoRAError as e:
            raise LoRAError(f"{src / CONFIG}: field 'layers': {e}") from None
    return cfg, spec, read_weights(src / WEIGHTS)


def _check_base(src: Path, cfg: dict[str, Any], have: str) -> None:
    want = cfg["base_model"]["fingerprint"]
    if want != have:
        name = cfg["base_model"].get("name")
        raise LoRAError(
            f"{src}: this adapter was trained on another base model ({want}{f', {name}' if name else ''}); "
            f"the loaded model is {have}"
        )


def export_adapter(src: str | Path, dst: str | Path, *, fmt: str, model: str | Path | None = None, force: bool = False,
                   names: Mapping[str, str] | None = None) -> Path:  # fmt: skip
    """Rewrite the adapter folder ``src`` (ours, PEFT or mlx-lm) as a ``fmt`` ("peft" or "mlx-lm") folder ``dst``.

    Args:
        model: the base model (a converted folder or a repo id). PEFT and mlx-lm folders hold no
            shapes of their own (nor a spec ours could be checked by), so they are read against its
            config and need it; our folders are checked against it when given (fingerprint, layers,
            tensor shapes). Only its config and the few tensors of the fingerprint are read.
        force: replace an existing ``dst`` that is empty or holds an earlier ``fmt`` export and
            nothing else (never the source, nor a folder holding anything else).
        names: how errors spell ``force`` and ``model`` (the CLI passes its options).

    Returns ``dst``; nothing is left at or beside it on an error.
    """
    say = {"force": "force=True", "model": "model=", **(names or {})}
    if fmt not in ("peft", "mlx-lm"):
        raise LoRAError(f"fmt must be 'peft' or 'mlx-lm', got {fmt!r}")
    src = Path(src).expanduser()
    if not src.is_dir():
        raise LoRAError(f"{src}: no such adapter folder")
    kind = detect_adapter_format(src)
    path, config = resolve_config(model) if model is not None else (None, None)
    if kind == "mlx-gptoss":
        cfg, spec, flat = _read_ours(src, config)
        if config is not None:
            _check_base(src, cfg, base_fingerprint(path))
            _check_shapes(src / WEIGHTS, spec, flat, config)
        base_name = cfg["base_model"].get("name")
    else:
        if config is None:
            raise LoRAError(
                f"{src}: {'a PEFT' if kind == 'peft' else 'an mlx-lm'} adapter records no model architecture to read its "
                f"tensors by; give the base model it was trained on ({say['model']})"
            )
        spec, flat = read_adapter(src, config)
        theirs = read_json(src / CONFIG, "")
        base_name = theirs.get("base_model_name_or_path") if kind == "peft" else theirs.get("model")
    base_name = base_name if isinstance(base_name, str) else (str(model) if model is not None else None)
    if fmt == "peft":
        tensors, out_cfg = to_peft(spec, flat, base_name=base_name)
        weights, meta = PEFT_WEIGHTS, {"format": "pt"}
    else:
        layers = config.num_hidden_layers if config is not None else None
        tensors, out_cfg = to_mlxlm(spec, flat, num_hidden_layers=layers, base_name=base_name)
        weights, meta = MLXLM_WEIGHTS, {"format": "mlx"}
    return write_folder(dst, weights, tensors, meta, out_cfg, kind=fmt, force=force, sources=[src], force_name=say["force"])


def _check_shapes(source: Path, spec: LoRASpec, flat: Mapping[str, mx.array], config: GptOssConfig) -> None:
    """Our tensors against the names and shapes ``spec`` gives them on a model of ``config`` (as set_lora_parameters checks)."""
    E, r = config.num_local_experts, spec.rank
    want = {}
    for i in spec.layer_ids(config.num_hidden_layers):
        for module, (d_out, d_in) in adapted_shapes(config, spec.targets).items():
            lead = (E,) if module.startswith("mlp.experts_lora.") else ()
            want[f"layers.{i}.{module}.lora_a"], want[f"layers.{i}.{module}.lora_b"] = (*lead, r, d_in), (*lead, d_out, r)
    missing, extra = sorted(set(want) - set(flat)), sorted(set(flat) - set(want))
    if missing or extra:
        what = (
            f"missing adapter tensor {missing[0]!r}" if missing else f"tensor {extra[0]!r} has no place in this model's adapters"
        )
        raise LoRAError(f"{source}: {what}")
    for k, v in flat.items():
        if tuple(v.shape) != want[k]:
            raise LoRAError(f"{source}: tensor {k!r} has shape {tuple(v.shape)}, the model expects {want[k]}")
