"""Reading what mlx-lm (and mlx-vlm) store for gpt-oss: the per-path ``quantization`` of config.json.

mlx-lm writes ``"quantization": {"group_size": .., "bits": .., "mode": .., "<module path>": {..} | true | false}``:
the top-level values are the defaults, a path's entry overrides them (a dict without "mode" is
affine, as ``nn.Module.to_quantized`` builds it). Every quantized module is read from its own entry
(or the defaults when it has none) and checked against its tensors; nothing is assumed. Our model
stores each component (attention, router, embed_tokens, lm_head) one way in every layer, and runs
MXFP4 experts only: anything else is refused, never dequantized and quantized again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlx_gptoss.config import ConfigError, QuantSpec
from mlx_gptoss.safetensors_io import TensorInfo

from .layout import MLXLM_EXPERTS, MLXLM_MODULES

PREFIX = "language_model."  # mlx-vlm nests the language model under this
MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")  # what mx.quantize knows
_DEFAULT_KEYS = ("group_size", "bits", "mode")
_MXFP4 = ("mxfp4", 4, 32)


def _stored(path: str, entry: Any, defaults: Mapping[str, Any], tensors: Mapping[str, TensorInfo], where: str) -> tuple | None:
    """(mode, bits, group_size) of the module at ``path`` as stored, or None when it is a float module."""
    has_scales = f"{path}.scales" in tensors
    if not has_scales:
        if entry is True or isinstance(entry, Mapping):
            raise ValueError(f"{where}: quantization.{path} says it is quantized, but the weights have no "
                             f"{path}.scales (a half-converted folder?)")  # fmt: skip
        return None
    if entry is False:
        raise ValueError(f"{where}: quantization.{path} is false, but the weights hold {path}.scales (a mixed folder?)")
    params = dict(entry) if isinstance(entry, Mapping) else {k: defaults[k] for k in _DEFAULT_KEYS if k in defaults}
    # a path's dict without a mode is affine (to_quantized's default); so are defaults without one (mlx-lm's loader)
    params.setdefault("mode", "affine")
    missing = [k for k in ("group_size", "bits") if k not in params]
    if missing:
        how = f"quantization.{path} has no {', '.join(missing)}" if isinstance(entry, Mapping) else (
            f"no quantization entry for {path} and no default {', '.join(missing)}")  # fmt: skip
        raise ValueError(f"{where}: {how}; its weights are stored quantized, so their format must be stated")
    mode, bits, group = params["mode"], params["bits"], params["group_size"]
    if mode not in MODES:
        raise ValueError(f"{where}: quantization of {path}: unknown mode {mode!r} (mx.quantize knows {', '.join(MODES)})")
    if type(bits) is not int or type(group) is not int or bits <= 0 or group <= 0:
        raise ValueError(f"{where}: quantization of {path}: bits and group_size must be positive integers, "
                         f"found {bits!r} and {group!r}")  # fmt: skip
    w, s = tensors.get(f"{path}.weight"), tensors[f"{path}.scales"]
    if w is None or w.dtype != "U32":
        raise ValueError(
            f"{where}: {path}.scales is there but {path}.weight is " + ("missing" if w is None else f"{w.dtype}, not packed U32")
        )
    want_scales = "U8" if mode != "affine" else "a float"
    d_in = w.shape[-1] * 32 // bits
    if (s.dtype == "U8") != (mode != "affine") or d_in != s.shape[-1] * group or s.shape[:-1] != w.shape[:-1]:
        raise ValueError(
            f"{s.file}: {path}.scales is {s.dtype} {list(s.shape)} beside weight {list(w.shape)}, which does not fit the "
            f"stated {mode} {bits}-bit groups of {group} (expected {want_scales} scales [.., {d_in // group}])"
        )
    if (mode == "affine") != (f"{path}.biases" in tensors):
        raise ValueError(f"{where}: {path} is stated {mode} but {path}.biases is " + ("missing" if mode == "affine" else "there"))
    return mode, bits, group


def _fmt(stored: tuple | None) -> str:
    return "float" if stored is None else f"{stored[0]} {stored[1]}-bit (groups of {stored[2]})"


def read_quantization(
    raw: Mapping[str, Any], tensors: Mapping[str, TensorInfo], n_layers: int, where: str
) -> dict[str, QuantSpec]:
    """Our component -> QuantSpec for an mlx-lm checkpoint; raises ValueError naming the path at fault.

    Args:
        raw: its config.json (``language_model.`` prefixes of quantization paths are dropped).
        tensors: its tensors by name (prefix already dropped).
        n_layers: num_hidden_layers.
        where: the config file, for messages.
    """
    q = raw.get("quantization")
    if q is None:
        q = raw.get("quantization_config") or {}
        if isinstance(q, Mapping) and "quant_method" in q:  # the release's form, as mlx-lm's loader reads it
            if q["quant_method"] != "mxfp4":
                raise ValueError(f"{where}: quantization_config.quant_method {q['quant_method']!r} is not read (only mxfp4)")
            q = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    if not isinstance(q, Mapping):
        raise ValueError(f"{where}: quantization must be an object, found {type(q).__name__}")
    entries = {k.removeprefix(PREFIX): v for k, v in q.items() if k not in _DEFAULT_KEYS}
    defaults = {k: q[k] for k in _DEFAULT_KEYS if k in q}
    for path, v in entries.items():
        if not isinstance(v, (bool, Mapping)):
            raise ValueError(f"{where}: quantization.{path} must be an object or true/false, found {v!r}")

    def stored(path: str):
        return _stored(path, entries.get(path), defaults, tensors, where)  # None: no entry

    for template in MLXLM_EXPERTS:
        for i in range(n_layers):
            path = template.format(i=i)
            got = stored(path)
            if got is None:
                raise ValueError(f"{where}: experts {path} are stored dense (float) in mlx-lm's layout, which is not read: "
                                 "convert the fine-tune's Hugging Face folder (hf-dense) instead")  # fmt: skip
            if got != _MXFP4:
                raise ValueError(
                    f"{where}: experts {path} are stored {_fmt(got)}; mlx-gptoss runs MXFP4 experts only and will not "
                    "re-quantize them (that costs quality): convert the released checkpoint (e.g. openai/gpt-oss-20b) instead"
                )
    out: dict[str, QuantSpec] = {}
    for comp, templates in MLXLM_MODULES.items():
        paths = [t.format(i=i) for t in templates for i in (range(n_layers) if "{i}" in t else (0,))]
        found = {p: stored(p) for p in paths}
        first = found[paths[0]]
        odd = next((p for p in paths if found[p] != first), None)
        if odd is not None:
            raise ValueError(
                f"{where}: {paths[0]} is stored {_fmt(first)} but {odd} {_fmt(found[odd])}; mlx-gptoss stores all of "
                f"{comp} one way and will not re-quantize it"
            )
        if first is not None:
            try:
                out[comp] = QuantSpec(*first)
            except ConfigError as e:
                raise ValueError(f"{where}: {paths[0]}: {e}") from None
    return out
