"""LoRA adapter modules and their placement on a gpt-oss model.

Wrapping is module substitution: ``self_attn.qkv`` becomes a :class:`LoRAFusedLinear` (the fused
base plus the q, k and v pairs, registered on the attention as ``q_proj``/``k_proj``/``v_proj`` so
their keys read as in the contract), ``self_attn.o_proj`` and ``mlp.router`` become
:class:`LoRALinear`, and the MoE's ``experts_lora`` seam gets an :class:`ExpertsLoRA`. The base
layers keep their storage (quantized stays quantized) and are frozen.

Key names: ``layers.{i}.self_attn.{q_proj,k_proj,v_proj,o_proj}.{lora_a [r, in], lora_b [out, r]}``,
``layers.{i}.mlp.router.{lora_a, lora_b}``, ``layers.{i}.mlp.experts_lora.{gate_up,down}.{lora_a
[E, r, in], lora_b [E, out, r]}`` (gate_up rows interleaved: 2j gate j, 2j+1 up j). Adapter
parameters are float32 whatever the model's dtype; their update is cast to the base output's dtype.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..kernels import ExpertsDelta
from ..options import OptionError, check_number

TARGETS = ("attention", "router", "experts")
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # the scale multiplies float32 adapters: beyond this it is inf


class LoRAError(ValueError):
    """An adapter that does not fit the model, or a bad LoRA specification."""


@dataclass(frozen=True)
class LoRASpec:
    """What to adapt and how.

    Args:
        rank: r, the rank of every update: an integer >= 1, and at most the smaller side of the
            largest matrix it adapts (:func:`apply_lora` refuses more: no update could use it).
        alpha: the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``); a finite
            number > 0 (at most float32's largest).
        targets: any of "attention" (q, k, v, o), "router", "experts" (each expert's gate_up and down).
        layers: indices of the adapted layers; None = all (see :func:`last_layers`).
        rslora: rank-stabilised scaling.
        dropout: dropout on the adapters' input while training (``model.train()``), in [0, 1); attention and
            router only. Expert adapters refuse it: the routed experts' update runs inside the MoE
            kernels' path, and PEFT's expert adapters (``target_parameters``) have none either.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attention",)
    layers: tuple[int, ...] | None = None
    rslora: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank", int(_number("rank", self.rank, integer=True, min=1)))
        object.__setattr__(self, "alpha", float(_number("alpha", self.alpha, min=0, min_open=True, max=_FLOAT32_MAX)))
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        bad = [t for t in targets if t not in TARGETS]
        if bad or not targets or len(set(targets)) != len(targets):
            raise LoRAError(f"targets must be distinct names from {TARGETS}, got {list(targets)!r}")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))  # canonical order
        if self.layers is not None:
            layers = tuple(self.layers)
            if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in layers) or len(
                set(layers)
            ) != len(layers):
                raise LoRAError(f"layers must be distinct non-negative integers (or None for all), got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(int(i) for i in layers)))
        if not isinstance(self.rslora, bool):
            raise LoRAError(f"rslora must be true or false, got {self.rslora!r}")
        object.__setattr__(self, "dropout", float(_number("dropout", self.dropout, min=0, max=1, max_open=True)))
        if self.dropout and "experts" in self.targets:
            raise LoRAError("dropout is not supported on expert adapters; use dropout=0.0 or leave out 'experts'")

    @property
    def scale(self) -> float:
        """The factor of every update B A x."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"], d["layers"] = list(self.targets), None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoRASpec:
        """The spec from :meth:`to_dict`'s fields; unknown or missing fields are errors."""
        names = set(cls.__dataclass_fields__)
        if not isinstance(d, dict) or set(d) - names:
            raise LoRAError(f"unknown LoRA spec fields {sorted(set(d) - names) if isinstance(d, dict) else d!r}")
        return cls(**d)

    def layer_ids(self, num_layers: int) -> list[int]:
        """The adapted layers of a model with ``num_layers`` layers (an error if out of range)."""
        if self.layers is None:
            return list(range(num_layers))
        out = [i for i in self.layers if i >= num_layers]
        if out:
            raise LoRAError(f"layers {out} do not exist: the model has {num_layers} layers (0..{num_layers - 1})")
        return list(self.layers)


def _number(name: str, value: Any, **bounds: Any) -> int | float:
    """:func:`~mlx_gptoss.options.check_number`, its refusal a LoRAError (what callers of this package catch)."""
    try:
        return check_number(name, value, **bounds)
    except OptionError as e:
        raise LoRAError(str(e)) from None


def last_layers(n: int, num_layers: int) -> tuple[int, ...]:
    """The last ``n`` of ``num_layers`` layers (mlx-lm's ``--num-layers``), for ``LoRASpec(layers=...)``."""
    if not 1 <= n <= num_layers:
        raise LoRAError(f"the number of adapted layers must be in 1..{num_layers}, got {n}")
    return tuple(range(num_layers - n, num_layers))


def _init_a(shape: tuple[int, ...], fan_in: int) -> mx.array:
    # PEFT's default: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))
    bound = 1 / math.sqrt(fan_in)
    return mx.random.uniform(-bound, bound, shape, dtype=mx.float32)


class LoRAPair(nn.Module):
    """``scale · B (A dropout(x))``: lora_a [r, in], lora_b [out, r] (B starts at zero)."""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.lora_a = _init_a((rank, d_in), d_in)
        self.lora_b = mx.zeros((d_out, rank))
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout else None

    def __call__(self, x: mx.array) -> mx.array:
        if self.dropout is not None:
            x = self.dropout(x)
        return self.scale * ((x.astype(mx.float32) @ self.lora_a.T) @ self.lora_b.T)


class LoRALinear(nn.Module):
    """A frozen linear layer (float or quantized) plus a low-rank update."""

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        d_out, d_in = _linear_shape(base)
        self.base = base
        self.lora_a = _init_a((rank, d_in), d_in)
        self.lora_b = mx.zeros((d_out, rank))
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout else None

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        z = x if self.dropout is None else self.dropout(x)
        return y + (self.scale * ((z.astype(mx.float32) @ self.lora_a.T) @ self.lora_b.T)).astype(y.dtype)


class LoRAFusedLinear(nn.Module):
    """The fused qkv projection plus one low-rank pair per part, concatenated in the fused row order.

    The parts are registered on the attention module (keys ``q_proj``, ...), not here: this module
    only refers to them.
    """

    def __init__(self, base: nn.Module, parts: Sequence[LoRAPair]):
        super().__init__()
        self.base = base
        object.__setattr__(self, "_parts", tuple(parts))  # a reference, not a child: no second key

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        return y + mx.concatenate([p(x) for p in self._parts], axis=-1).astype(y.dtype)


class LoRAExpertPair(nn.Module):
    """One low-rank update per expert: lora_a [E, r, in], lora_b [E, out, r]."""

    def __init__(self, n_experts: int, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.lora_a = _init_a((n_experts, rank, d_in), d_in)
        self.lora_b = mx.zeros((n_experts, d_out, rank))


class ExpertsLoRA(nn.Module):
    """Every expert's update of gate_up and down; the kernels apply it to the routed experts only."""

    def __init__(self, n_experts: int, hidden: int, intermediate: int, rank: int, scale: float):
        super().__init__()
        self.gate_up = LoRAExpertPair(n_experts, hidden, 2 * intermediate, rank)
        self.down = LoRAExpertPair(n_experts, intermediate, hidden, rank)
        self.scale = scale

    def delta(self) -> ExpertsDelta:
        g, d = self.gate_up, self.down
        return ExpertsDelta(g.lora_a, g.lora_b, d.lora_a, d.lora_b, self.scale)


def _linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of an nn.Linear or a QuantLinear."""
    spec = getattr(layer, "spec", None)
    d_out, w_in = layer.weight.shape
    return d_out, (w_in * 32 // spec.bits if spec is not None else w_in)


def apply_lora(model: nn.Module, spec: LoRASpec, *, seed: int | None = None) -> None:
    """Freeze the model and add zero-B adapters (random A) as ``spec`` says; only they train.

    The model's logits are unchanged until B is trained or loaded. Leaves the model in eval
    mode (dropout off); a training loop calls ``model.train()``. Raises :class:`LoRAError`, before
    anything is allocated, if the model already has adapters, a layer does not exist or the rank
    is more than any adapted matrix can use (B A has rank at most min(out, in)). Streamed experts (a memory budget) take
    expert adapters too: :class:`~mlx_gptoss.streaming.StreamedMoE` has the same seam.
    """
    if lora_parameters(model):
        raise LoRAError("the model already has adapters; call remove_lora(model) first")
    cfg = model.config
    ids = spec.layer_ids(cfg.num_hidden_layers)
    _check_rank(spec, cfg)  # before anything is allocated: an absurd rank would exhaust memory
    if "experts" in spec.targets:
        # an MLP without the seam would carry the adapter and silently never apply it
        unseamed = [i for i in ids if not hasattr(model.layers[i].mlp, "experts_lora")]
        if unseamed:
            raise LoRAError(
                f"layers {unseamed}: the MLP ({type(model.layers[unseamed[0]].mlp).__name__}) has no expert-adapter seam"
            )
    if seed is not None:
        mx.random.seed(seed)
    model.freeze()
    r, s, p = spec.rank, spec.scale, spec.dropout
    for i in ids:
        attn, mlp = model.layers[i].self_attn, model.layers[i].mlp
        if "attention" in spec.targets:
            D = attn.head_dim
            sizes = {"q_proj": attn.n_q * D, "k_proj": attn.n_kv * D, "v_proj": attn.n_kv * D}
            parts = []
            for name, d_out in sizes.items():
                part = LoRAPair(cfg.hidden_size, d_out, r, s, p)
                setattr(attn, name, part)
                parts.append(part)
            attn.qkv = LoRAFusedLinear(attn.qkv, parts)
            attn.o_proj = LoRALinear(attn.o_proj, r, s, p)
        if "router" in spec.targets:
            mlp.router = LoRALinear(mlp.router, r, s, p)
        if "experts" in spec.targets:
            mlp.experts_lora = ExpertsLoRA(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, r, s)
    model.eval()


def adapted_shapes(cfg: Any, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """[out, in] of each matrix the ``targets`` adapt, by module name (per layer; per expert for the experts)."""
    H, I, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {
        "attention": {"self_attn.q_proj": (q, H), "self_attn.k_proj": (kv, H), "self_attn.v_proj": (kv, H),
                      "self_attn.o_proj": (H, q)},
        "router": {"mlp.router": (E, H)},
        "experts": {"mlp.experts_lora.gate_up": (2 * I, H), "mlp.experts_lora.down": (H, I)},
    }  # fmt: skip
    return {name: shape for t in targets for name, shape in shapes[t].items()}


def _check_rank(spec: LoRASpec, cfg: Any) -> None:
    """Refuse a rank no adapted matrix can use: B A has rank at most min(out, in)."""
    shapes = adapted_shapes(cfg, spec.targets)
    name, (d_out, d_in) = max(shapes.items(), key=lambda kv: min(kv[1]))
    if spec.rank > min(d_out, d_in):
        raise LoRAError(
            f"rank {spec.rank} is more than any adapted matrix can use: the largest is {name} [{d_out}, {d_in}], "
            f"whose update has rank at most {min(d_out, d_in)}; a larger rank only costs memory (use rank <= {min(d_out, d_in)})"
        )


def remove_lora(model: nn.Module) -> None:
    """Take every adapter off: the plain (still frozen) base model again."""
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if isinstance(attn.qkv, LoRAFusedLinear):
            attn.qkv = attn.qkv.base
            for name in ("q_proj", "k_proj", "v_proj"):
                del attn[name]
        if isinstance(attn.o_proj, LoRALinear):
            attn.o_proj = attn.o_proj.base
        if isinstance(mlp.router, LoRALinear):
            mlp.router = mlp.router.base
        if getattr(mlp, "experts_lora", None) is not None:
            mlp.experts_lora = None


def lora_parameters(model: nn.Module) -> dict[str, mx.array]:
    """Every adapter parameter by its contract name, e.g. ``layers.3.self_attn.q_proj.lora_a``."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}


def set_lora_parameters(model: nn.Module, flat: dict[str, mx.array], *, source: str = "adapter") -> None:
    """Replace the adapter parameters by ``flat`` (contract names), after checking names and shapes.

    The model must already carry adapters of the same placement (:func:`apply_lora`). Values are
    stored as float32. ``source`` names the origin in errors (a file path, say).
    """
    have = lora_parameters(model)
    missing, extra = sorted(set(have) - set(flat)), sorted(set(flat) - set(have))
    if missing:
        raise LoRAError(
            f"{source}: missing adapter tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if extra:
        raise LoRAError(
            f"{source}: tensor {extra[0]!r} has no place in this model's adapters"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    for k, v in flat.items():
        if tuple(v.shape) != tuple(have[k].shape):
            raise LoRAError(f"{source}: tensor {k!r} has shape {tuple(v.shape)}, the model expects {tuple(have[k].shape)}")
        if not mx.issubdtype(v.dtype, mx.floating):
            raise LoRAError(f"{source}: tensor {k!r} has dtype {v.dtype}, expected a floating type")
    model.update(tree_unflatten([(k, v.astype(mx.float32)) for k, v in flat.items()]))
