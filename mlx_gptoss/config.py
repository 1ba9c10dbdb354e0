"""The one source of truth for gpt-oss hyper-parameters."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"


class ConfigError(ValueError):
    """A config.json that cannot describe a gpt-oss model."""


@dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE scaling as gpt-oss uses it (``truncate=False``: the correction range is not rounded)."""

    factor: float = 32.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original_max_position_embeddings: int = 4096
    truncate: bool = False

    def __post_init__(self) -> None:
        for k in ("factor", "beta_fast", "beta_slow", "original_max_position_embeddings"):
            if not _positive(getattr(self, k)):
                raise ConfigError(f"rope_scaling.{k} must be a positive number, found {getattr(self, k)!r}")

    @property
    def attention_factor(self) -> float:
        """YaRN's "concentration": multiplies both cos and sin."""
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0


QUANT_COMPONENTS = ("attention", "router", "lm_head", "embed_tokens")
QUANT_MODES = {"affine": (4, 6, 8), "mxfp8": (8,)}
AFFINE_GROUPS = (32, 64, 128)  # what MLX's affine quantization supports


@dataclass(frozen=True)
class QuantSpec:
    """How a non-expert component is stored: MLX quantization mode, bits and group size."""

    mode: str = "affine"
    bits: int = 8
    group_size: int = 64

    def __post_init__(self) -> None:
        if self.bits not in QUANT_MODES.get(self.mode, ()):
            raise ConfigError(f"unsupported quantization {self.mode} {self.bits}-bit (supported: {QUANT_MODES})")
        if self.mode == "mxfp8" and self.group_size != 32:
            raise ConfigError("mxfp8 uses groups of 32")
        if self.mode == "affine" and self.group_size not in AFFINE_GROUPS:
            raise ConfigError(f"affine quantization uses groups of {AFFINE_GROUPS}, not {self.group_size}")

    @classmethod
    def parse(cls, text: str) -> QuantSpec | None:
        """'8', '6', '4' (affine, groups of 64), '4g32' (group size), 'mxfp8', or 'none'."""
        t = text.strip().lower()
        if t in ("none", "bf16", "16"):
            return None
        if t == "mxfp8":
            return cls("mxfp8", 8, 32)
        bits, _, group = t.partition("g")
        try:
            return cls("affine", int(bits), int(group) if group else 64)
        except ValueError:
            raise ConfigError(f"cannot read quantization {text!r} (8, 6, 4, 4g32, mxfp8 or none)") from None

    def bytes_per_weight(self, dtype_bytes: int = 2) -> float:
        """Storage per weight, scales (and affine biases) included."""
        extra = (2 * dtype_bytes if self.mode == "affine" else 1) / self.group_size
        return self.bits / 8 + extra

    def __str__(self) -> str:
        return "mxfp8" if self.mode == "mxfp8" else f"{self.bits}-bit (groups of {self.group_size})"


@dataclass(frozen=True)
class GptOssConfig:
    """Hyper-parameters of a gpt-oss model, read from a (Hugging Face style) config.json.

    Unknown keys are ignored; missing required keys raise :class:`ConfigError` naming them.
    """

    num_hidden_layers: int
    num_local_experts: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    head_dim: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts_per_tok: int = 4
    sliding_window: int = 128
    layer_types: tuple[str, ...] = ()
    rope_theta: float = 150000.0
    rope_scaling: YarnScaling | None = field(default_factory=YarnScaling)
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    # Not in the released config.json: the sigmoid gain of gpt-oss's clamped SwiGLU.
    swiglu_alpha: float = 1.702
    max_position_embeddings: int = 131072
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    model_type: str = "gpt_oss"
    # Non-expert components stored quantized (chosen at conversion): ((component, spec), ...).
    quantization: tuple[tuple[str, QuantSpec], ...] = ()

    REQUIRED = (
        "num_hidden_layers",
        "num_local_experts",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
    )

    def __post_init__(self) -> None:
        bad = [f"{k} must be an integer >= 1, found {getattr(self, k)!r}" for k in _INT_FIELDS
               if not (type(getattr(self, k)) is int and getattr(self, k) >= 1)]  # fmt: skip
        bad += [f"{k} must be a positive finite number, found {getattr(self, k)!r}" for k in _FLOAT_FIELDS
                if not _positive(getattr(self, k))]  # fmt: skip
        if bad:  # the checks below divide by these
            raise ConfigError("invalid gpt-oss config: " + "; ".join(bad))
        if not self.layer_types:
            # Released default: sliding first, then alternating.
            types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", types)
        problems = []
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries, num_hidden_layers is {self.num_hidden_layers}")
        if bad := sorted(set(self.layer_types) - {SLIDING, FULL}):
            problems.append(f"layer_types has unknown entries {bad}")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            problems.append("num_experts_per_tok must be in 1..num_local_experts")
        if bad := sorted({c for c, _ in self.quantization} - set(QUANT_COMPONENTS)):
            problems.append(f"quantization names unknown components {bad} (known: {', '.join(QUANT_COMPONENTS)})")
        if self.hidden_size % 32 or self.intermediate_size % 32:
            problems.append("hidden_size and intermediate_size must be multiples of 32 (MXFP4 groups)")
        if problems:
            raise ConfigError("invalid gpt-oss config: " + "; ".join(problems))

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "config.json") -> GptOssConfig:
        """Build from a Hugging Face style gpt-oss config dict (as in the released config.json).

        Every known key is checked for its JSON type and range, and the nested ``rope_scaling``
        (or ``rope_parameters``), ``quantization`` and ``mlx_gptoss`` blocks for unknown keys;
        unknown top-level keys are ignored. Raises :class:`ConfigError` naming ``source`` and
        the field.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, found {_kind(d)}")
        model_type = d.get("model_type", "gpt_oss")
        if model_type != "gpt_oss":
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported (expected 'gpt_oss')")
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}")
        _check_types(d, source)
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw.setdefault("head_dim", d["hidden_size"] // max(d["num_attention_heads"], 1))
        if "num_experts_per_tok" not in d and "experts_per_token" in d:
            kw["num_experts_per_tok"] = d["experts_per_token"]
        if "layer_types" in kw and kw["layer_types"] is not None:
            kw["layer_types"] = tuple(kw["layer_types"])
        else:
            kw.pop("layer_types", None)
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = tuple(kw["eos_token_id"])
        # transformers >= 5 writes rope_parameters (with rope_theta inside); the release wrote rope_scaling.
        rope = d.get("rope_scaling") or d.get("rope_parameters")
        if rope and "rope_theta" in rope and "rope_theta" not in d:
            kw["rope_theta"] = rope["rope_theta"]
        for k in _FLOAT_FIELDS:
            if k in kw:
                kw[k] = float(kw[k])
        try:
            kw["rope_scaling"] = cls._yarn_from_dict(rope)
            kw["quantization"] = tuple(sorted(_quant_spec(c, spec) for c, spec in (d.get("quantization") or {}).items()))
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @staticmethod
    def _yarn_from_dict(rope: Mapping[str, Any] | None) -> YarnScaling | None:
        if not rope:
            return None
        kind = rope.get("rope_type", rope.get("type", "yarn"))
        if kind == "default":
            return None
        if kind != "yarn":
            raise ConfigError(f"rope_scaling.rope_type {kind!r} is not supported (gpt-oss uses 'yarn')")
        return YarnScaling(
            factor=float(rope.get("factor", 32.0)),
            beta_fast=float(rope.get("beta_fast", 32.0)),
            beta_slow=float(rope.get("beta_slow", 1.0)),
            original_max_position_embeddings=rope.get("original_max_position_embeddings", 4096),
            # transformers' default is to truncate; gpt-oss's released config says false.
            truncate=rope.get("truncate", True),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> GptOssConfig:
        """Read and check a config.json (see :meth:`from_dict`); errors name the file."""
        return cls.from_dict(read_json(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """A Hugging Face style dict that :meth:`from_dict` reads back unchanged."""
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"rope_type": "yarn", **dataclasses.asdict(self.rope_scaling)}
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        d["num_experts_per_tok"] = self.num_experts_per_tok
        d["quantization"] = {c: dataclasses.asdict(q) for c, q in self.quantization}
        return d

    def quant(self, component: str) -> QuantSpec | None:
        """How ``component`` ("attention", "router", "lm_head", "embed_tokens") is stored; None = float."""
        return dict(self.quantization).get(component)

    @classmethod
    def tiny(cls, **overrides: Any) -> GptOssConfig:
        """A small model for tests: every architectural feature, few parameters."""
        kw: dict[str, Any] = dict(
            num_hidden_layers=4,
            num_local_experts=8,
            num_experts_per_tok=4,
            vocab_size=512,
            hidden_size=64,
            intermediate_size=64,
            head_dim=16,
            num_attention_heads=8,
            num_key_value_heads=2,
            sliding_window=16,
            max_position_embeddings=4096,
        )
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def gpt_oss_20b(cls, **overrides: Any) -> GptOssConfig:
        """The released gpt-oss-20b shapes."""
        return cls.tiny(**{**_SHAPES_20B, **overrides})

    @classmethod
    def gpt_oss_120b(cls, **overrides: Any) -> GptOssConfig:
        """The released gpt-oss-120b shapes."""
        return cls.tiny(**{**_SHAPES_20B, "num_hidden_layers": 36, "num_local_experts": 128, **overrides})

    # -- derived ----------------------------------------------------------------------------

    @property
    def qkv_dim(self) -> int:
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path`` (UTF-8); a missing or unreadable file is a :class:`ConfigError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


_INT_FIELDS = ("num_hidden_layers", "num_local_experts", "vocab_size", "hidden_size", "intermediate_size", "head_dim",
               "num_attention_heads", "num_key_value_heads", "num_experts_per_tok", "sliding_window",
               "max_position_embeddings")  # fmt: skip
_FLOAT_FIELDS = ("rope_theta", "rms_norm_eps", "swiglu_limit", "swiglu_alpha")
# The JSON type of each key of the nested blocks; any other key there is an error.
_BLOCKS: dict[str, dict[str, str]] = {
    "rope_scaling": {"rope_type": "str", "type": "str", "factor": "number", "beta_fast": "number", "beta_slow": "number",
                     "original_max_position_embeddings": "int", "truncate": "bool", "rope_theta": "number"},
    "quantization.*": {"mode": "str", "bits": "int", "group_size": "int"},
    "mlx_gptoss": {"format": "str", "format_version": "int", "converter_version": "str", "source": "str",
                   "source_layout": "str", "experts": "str", "pruned": "object"},
}  # fmt: skip
_KINDS = {
    "int": lambda v: type(v) is int,  # bool is an int subclass: excluded on purpose
    "number": lambda v: type(v) in (int, float) and math.isfinite(v),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: type(v) is bool,
    "object": lambda v: isinstance(v, dict),  # a record kept as written (e.g. what pruning removed)
}


def _positive(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v) and v > 0


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(v), repr(v))


def _expect(v: Any, kind: str, where: str) -> None:
    if not _KINDS[kind](v):
        what = {"int": "an integer", "number": "a finite number", "str": "a string", "bool": "true or false"}[kind]
        raise ConfigError(f"{where} must be {what}, found {_kind(v) if not isinstance(v, (int, float)) else repr(v)}")


def _check_block(block: Any, schema: str, where: str) -> None:
    if not isinstance(block, Mapping):
        raise ConfigError(f"{where} must be an object, found {_kind(block)}")
    keys = _BLOCKS[schema]
    for k, v in block.items():
        if k not in keys:
            raise ConfigError(f"{where}: unknown key {k!r} (known: {', '.join(keys)})")
        _expect(v, keys[k], f"{where}.{k}")


def _check_types(d: Mapping[str, Any], source: str) -> None:
    """The JSON type of every known key (ranges and consistency are checked by the dataclasses)."""
    for k in (*_INT_FIELDS, "experts_per_token"):
        if k in d:
            _expect(d[k], "int", f"{source}: {k}")
    for k in _FLOAT_FIELDS:
        if k in d:
            _expect(d[k], "number", f"{source}: {k}")
    if d.get("layer_types") is not None:
        lt = d["layer_types"]
        if not isinstance(lt, list) or not all(isinstance(t, str) for t in lt):
            raise ConfigError(f"{source}: layer_types must be a list of {SLIDING!r} / {FULL!r}, found {lt!r}")
    for k in ("eos_token_id", "pad_token_id"):
        v = d.get(k)
        ids = v if isinstance(v, list) and k == "eos_token_id" else [v]
        if v is not None and (not ids or not all(type(i) is int and i >= 0 for i in ids)):
            raise ConfigError(f"{source}: {k} must be a token id" + (" or a list of them" if k == "eos_token_id" else "")
                              + f", found {v!r}")  # fmt: skip
    for k in ("rope_scaling", "rope_parameters"):
        if d.get(k) is not None:
            _check_block(d[k], "rope_scaling", f"{source}: {k}")
    quant = d.get("quantization")
    if quant is not None:
        if not isinstance(quant, Mapping):
            raise ConfigError(f"{source}: quantization must be an object of component -> spec, found {_kind(quant)}")
        for c, spec in quant.items():
            _check_block(spec, "quantization.*", f"{source}: quantization.{c}")
    if d.get("mlx_gptoss") is not None:
        _check_block(d["mlx_gptoss"], "mlx_gptoss", f"{source}: mlx_gptoss")


def _quant_spec(component: str, spec: Mapping[str, Any]) -> tuple[str, QuantSpec]:
    try:
        return component, QuantSpec(**spec)
    except ConfigError as e:
        raise ConfigError(f"quantization.{component}: {e}") from None


_SHAPES_20B: dict[str, Any] = dict(
    num_hidden_layers=24,
    num_local_experts=32,
    vocab_size=201088,
    hidden_size=2880,
    intermediate_size=2880,
    head_dim=64,
    num_attention_heads=64,
    num_key_value_heads=8,
    sliding_window=128,
    max_position_embeddings=131072,
    eos_token_id=200002,
    pad_token_id=199999,
)
