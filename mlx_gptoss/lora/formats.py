"""Adapters from other tools: PEFT (transformers) and mlx-lm folders read, and ours written in both
formats (:func:`export_peft`, :func:`export_mlxlm`; their inverses, exact).

Every reader returns a :class:`LoRASpec` and the adapter tensors in our contract names (see
``adapters.py``), exactly equivalent to the source: our spec has one rank and one scale, so a
module of lower rank is zero-padded to the largest rank and a module whose own scale differs has
it folded into its B (``B' = B · scale_module / scale_spec``). Modules the source leaves out, in
an adapted layer of an adapted target, get zero adapters.

PEFT (``adapter_config.json`` with ``peft_type: LORA`` + ``adapter_model.safetensors``, as
``PeftModel.save_pretrained`` writes for transformers' ``GptOssForCausalLM``):

* attention ``target_modules`` q/k/v/o_proj: ``lora_A [r, in]``, ``lora_B [out, r]``, as ours;
* the router and the experts as ``target_parameters`` (``mlp.router.weight``,
  ``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``). Two parameters of one module nest:
  the parameter registered first on ``GptOssExperts`` (gate_up_proj) is the inner wrapper,
  ``…experts.base_layer.lora_A``, the other the outer, ``…experts.lora_A``. PEFT packs the
  experts asymmetrically: ``lora_A [E·r, in]`` is expert-major (``reshape(E, r, in)``) but
  ``lora_B [out, r·E]`` is expert-minor (``reshape(out, r, E)``);
* scale ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), per module ``rank_pattern`` and
  ``alpha_pattern`` matched as PEFT matches them. Base biases, ``modules_to_save``, DoRA and
  other LoRA variants are refused;
* a tensor PEFT would not load under its own config (``target_modules``, ``exclude_modules``,
  ``layers_to_transform``/``layers_pattern`` for the attention modules, ``target_parameters`` for
  the router and the experts) is refused, naming the module and the field: such a folder does
  not say what it computes.

mlx-lm (``adapters.safetensors`` + ``adapter_config.json`` with ``lora_parameters``): ``LoRALinear``
stores ``lora_a [in, r]``, ``lora_b [r, out]`` with ``y += scale · (x a) b``; experts are
``LoRASwitchLinear`` on the de-interleaved ``gate_proj`` (our gate_up rows 0::2), ``up_proj``
(rows 1::2) and ``down_proj``. gate and up each have their own A while our gate_up shares one A
per expert, so a gate/up pair becomes one update of rank ``r_gate + r_up`` (A stacked, B block
diagonal in the interleaved rows): exact, at twice the rank (and so the whole spec's rank doubles,
the other modules zero-padded). A pair whose gate and up share one A (what :func:`to_mlxlm`
writes) is read back as that A, at rank r.

A folder holding the weights of two formats (``adapters.safetensors`` and
``adapter_model.safetensors``) is refused: its one config cannot say which it describes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx

from .adapters import TARGETS, ExpertsLoRA, LoRAError, LoRALinear, LoRAPair, LoRASpec, adapted_shapes, lora_parameters
from .files import WEIGHTS, config_kind, read_adapter_config, read_json, read_weights, write_folder

PEFT_WEIGHTS, MLXLM_WEIGHTS, CONFIG = "adapter_model.safetensors", "adapters.safetensors", "adapter_config.json"
FORMATS = ("mlx-gptoss", "peft", "mlx-lm")

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_TARGET_MODULES = {
    "attention": tuple(f"self_attn.{p}" for p in _ATTN),
    "router": ("mlp.router",),
    "experts": ("mlp.experts_lora.gate_up", "mlp.experts_lora.down"),
}
# transformers' GptOssExperts registers gate_up_proj before down_proj: PEFT wraps in that order
_PEFT_EXPERT_PARAMS = ("gate_up_proj", "down_proj")
_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<prefix>(?:model\.)?)layers\.(?P<layer>\d+)\."
    r"(?P<module>self_attn\.[qkvo]_proj|mlp\.router|mlp\.experts(?:\.base_layer)*)\.lora_(?P<ab>[AB])\.weight$"
)
_CONTRACT_KEY = re.compile(r"^layers\.(\d+)\.(.+)\.lora_([ab])$")
_MLXLM_KEY = re.compile(
    r"^(?:model\.)?layers\.(?P<layer>\d+)\."
    r"(?P<module>self_attn\.[qkvo]_proj|mlp\.router|mlp\.experts\.(?:gate|up|down)_proj)\.lora_(?P<ab>[ab])$"
)
# PEFT config fields that change what the adapter computes in ways our adapters do not
_PEFT_REFUSED = {
    "lora_bias": "a trained bias on lora_B", "use_dora": "DoRA", "modules_to_save": "whole trained modules",
    "fan_in_fan_out": "transposed base weights", "layer_replication": "replicated layers",
    "trainable_token_indices": "trained token embeddings", "use_qalora": "QA-LoRA", "use_bdlora": "BD-LoRA",
    "alora_invocation_tokens": "activated LoRA", "arrow_config": "Arrow routing", "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
}  # fmt: skip

Piece = tuple[mx.array, mx.array, float]  # (A [.., r, in], B [.., out, r], scale) in our orientation


def detect_adapter_format(folder: str | Path) -> str:
    """``"mlx-gptoss"``, ``"peft"`` or ``"mlx-lm"``: which tool wrote the adapter folder.

    Raises :class:`LoRAError` naming the folder when it is none of them, and when it holds the
    weights of two formats (``adapters.safetensors`` and ``adapter_model.safetensors``): its one
    config cannot say which of them it describes.
    """
    folder = Path(folder)
    cfg = _read_json(folder / CONFIG)
    if (folder / MLXLM_WEIGHTS).is_file() and (folder / PEFT_WEIGHTS).is_file():
        raise LoRAError(
            f"{folder}: holds both {MLXLM_WEIGHTS} (an mlx-gptoss or mlx-lm adapter) and {PEFT_WEIGHTS} (a PEFT "
            f"adapter), and its one {CONFIG} cannot say which it describes; keep one adapter per folder"
        )
    markers = [k for k in ("format", "peft_type", "lora_parameters") if k in cfg]
    if "peft_type" in markers and len(markers) > 1:
        raise LoRAError(f"{folder / CONFIG}: fields {markers} belong to different tools' adapter configs; which one is it?")
    kind = config_kind(cfg) or ("mlx-lm" if (folder / MLXLM_WEIGHTS).is_file() else None)
    if kind is None:
        raise LoRAError(
            f"{folder / CONFIG}: not an adapter config this library reads (no 'format': 'mlx-gptoss-lora', "
            "no PEFT 'peft_type', no mlx-lm 'lora_parameters')"
        )
    return kind


def read_adapter(folder: str | Path, model: Any) -> tuple[LoRASpec, dict[str, mx.array]]:
    """The spec and flat tensors (our names, float32) of a PEFT or mlx-lm adapter folder for ``model``.

    Shapes are checked against ``model.config`` (``model`` may also be the config itself: nothing
    else of the model is read); every error names the file and the key. Our own format is read by
    :func:`mlx_gptoss.lora.io.load_adapter` (it also checks the base model).
    """
    folder = Path(folder)
    model_config = getattr(model, "config", model)
    fmt = detect_adapter_format(folder)
    if fmt == "peft":
        return from_peft(_read_tensors(folder, PEFT_WEIGHTS), _read_json(folder / CONFIG), model_config,
                         source=str(folder / PEFT_WEIGHTS))  # fmt: skip
    if fmt == "mlx-lm":
        return from_mlxlm(_read_tensors(folder, MLXLM_WEIGHTS), _read_json(folder / CONFIG), model_config,
                          source=str(folder / MLXLM_WEIGHTS))  # fmt: skip
    raise LoRAError(f"{folder}: an mlx-gptoss adapter; load it with mlx_gptoss.lora.io.load_adapter")


def from_peft(tensors: dict[str, mx.array], config: dict[str, Any], model_config: Any, *,
              source: str = "adapter") -> tuple[LoRASpec, dict[str, mx.array]]:  # fmt: skip
    """PEFT state-dict tensors (names as ``save_pretrained`` writes them) + its config -> ours."""
    where = f"{source} ({CONFIG})"
    if config.get("peft_type") != "LORA":
        raise LoRAError(f"{where}: field 'peft_type' is {config.get('peft_type')!r}; only LORA adapters are read")
    if config.get("bias", "none") != "none":
        raise LoRAError(f"{where}: field 'bias' is {config['bias']!r}: the adapter trains the base model's biases, "
                        "which a LoRA adapter here cannot carry; train with bias='none'")  # fmt: skip
    for field, what in _PEFT_REFUSED.items():
        if config.get(field):
            raise LoRAError(f"{where}: field {field!r} = {config[field]!r} ({what}) is not supported")
    r, alpha, rslora = config.get("r"), config.get("lora_alpha"), bool(config.get("use_rslora", False))
    if not _number(r) or not _number(alpha):
        raise LoRAError(f"{where}: fields 'r' and 'lora_alpha' must be numbers, got {r!r} and {alpha!r}")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    targets = config.get("target_parameters") or []
    E = model_config.num_local_experts
    groups = _group(tensors, _PEFT_KEY, source)
    pieces: dict[tuple[int, str], Piece] = {}
    for (layer, prefix, module), ab in groups.items():
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None:
            have, missing = ("B", "A") if a is None else ("A", "B")
            raise LoRAError(f"{source}: {prefix}layers.{layer}.{module}: lora_{missing} is missing (it has lora_{have} only)")
        # PEFT's key for the module (GptOssForCausalLM's names), whatever prefix the tensors carry
        refusal = _peft_refusal(config, f"model.layers.{layer}.{module}", targets)
        if refusal:
            raise LoRAError(f"{where}: tensors for model.layers.{layer}.{module} contradict the config: {refusal}, so "
                            "PEFT would not load them; fix the config or leave those tensors out")  # fmt: skip
        if module.startswith("mlp.experts"):
            depth = module.count(".base_layer")
            # the targeted expert parameters of this layer, outermost wrapper first
            experts = f"{prefix}layers.{layer}.mlp.experts"
            wrapped = [p for p in _PEFT_EXPERT_PARAMS if _peft_matches(f"{experts}.{p}", targets)][::-1]
            if depth >= len(wrapped):
                raise LoRAError(f"{source}: {prefix}layers.{layer}.{module}: no expert parameter of "
                                f"'target_parameters' ({targets}) is wrapped at that depth")  # fmt: skip
            param = wrapped[depth]
            ours = "mlp.experts_lora.gate_up" if param == "gate_up_proj" else "mlp.experts_lora.down"
            key, n = f"{experts}.{param}", E
        else:
            ours, key, n = module, f"{prefix}layers.{layer}.{module}" + (".weight" if module == "mlp.router" else ""), 1
        d_in, d_out = _dims(model_config)[ours]
        rank = a.shape[0] // n if a.ndim == 2 and a.shape[0] % n == 0 else None
        if rank is None or a.shape != (n * rank, d_in) or b.shape != (d_out, n * rank):
            raise LoRAError(f"{source}: {key}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit this "
                            f"model (expected [{n}·r, {d_in}] and [{d_out}, {n}·r])")  # fmt: skip
        want = rank_pattern.get(_pattern_key(rank_pattern, key), r)
        if rank != want:
            raise LoRAError(f"{source}: {key} has rank {rank} but {CONFIG} gives r={want} for it")
        mod_alpha = alpha_pattern.get(_pattern_key(alpha_pattern, key), alpha)
        scale = mod_alpha / (math.sqrt(rank) if rslora else rank)
        if n > 1:  # A expert-major, B expert-minor
            a, b = a.reshape(n, rank, d_in), b.reshape(d_out, rank, n).transpose(2, 0, 1)
        pieces[(layer, ours)] = (a, b, scale)
    return _assemble(
        pieces, model_config, lambda R: LoRASpec(rank=R, alpha=float(alpha), rslora=rslora, targets=_targets(pieces)), source
    )


def from_mlxlm(tensors: dict[str, mx.array], config: dict[str, Any], model_config: Any, *,
               source: str = "adapter") -> tuple[LoRASpec, dict[str, mx.array]]:  # fmt: skip
    """mlx-lm adapter tensors (``tree_flatten(model.trainable_parameters())``) + its config -> ours."""
    where = f"{source} ({CONFIG})"
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise LoRAError(f"{where}: field 'fine_tune_type' is {kind!r}; only 'lora' adapters are read")
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or not _number(params.get("scale")) or not _number(params.get("rank")):
        raise LoRAError(f"{where}: field 'lora_parameters' must hold numbers 'rank' and 'scale', got {params!r}")
    scale, r = float(params["scale"]), params["rank"]
    dims = _dims(model_config)
    I = model_config.intermediate_size
    parts: dict[tuple[int, str], tuple[mx.array, mx.array]] = {}
    for (layer, _, module), ab in _group(tensors, _MLXLM_KEY, source).items():
        a, b = ab.get("a"), ab.get("b")
        key = f"model.layers.{layer}.{module}"
        if a is None or b is None:
            have, missing = ("b", "a") if a is None else ("a", "b")
            raise LoRAError(f"{source}: {key}: lora_{missing} is missing (it has lora_{have} only)")
        if module.startswith("mlp.experts."):
            E, name = model_config.num_local_experts, module.rsplit(".", 1)[1]
            d_in, d_out = (
                (I, dims["mlp.experts_lora.down"][1]) if name == "down_proj" else (dims["mlp.experts_lora.gate_up"][0], I)
            )
            ok = a.ndim == 3 and a.shape[0] == E and a.shape[2] == d_in and b.shape == (E, d_out, a.shape[1])
            expect = f"[{E}, r, {d_in}] and [{E}, {d_out}, r]"
        else:
            d_in, d_out = dims[module]
            ok = a.ndim == 2 and a.shape[0] == d_in and b.shape == (a.shape[1], d_out)
            a, b, expect = a.T, b.T, f"[{d_in}, r] and [r, {d_out}]"
        if not ok:
            raise LoRAError(f"{source}: {key}: lora_a {tuple(ab['a'].shape)} and lora_b {tuple(ab['b'].shape)} do not "
                            f"fit this model (expected {expect})")  # fmt: skip
        if a.shape[-2] != r:
            raise LoRAError(f"{source}: {key} has rank {a.shape[-2]} but {CONFIG} gives rank {r}")
        parts[(layer, module)] = (a, b)
    pieces: dict[tuple[int, str], Piece] = {}
    for (layer, module), (a, b) in parts.items():
        if module == "mlp.experts.down_proj":
            pieces[(layer, "mlp.experts_lora.down")] = (a, b, scale)
        elif module.startswith("mlp.experts."):
            if (layer, "mlp.experts_lora.gate_up") not in pieces:
                pieces[(layer, "mlp.experts_lora.gate_up")] = (*_gate_up(parts.get((layer, "mlp.experts.gate_proj")),
                                                                          parts.get((layer, "mlp.experts.up_proj"))), scale)  # fmt: skip
        else:
            pieces[(layer, module)] = (a, b, scale)
    return _assemble(pieces, model_config, lambda R: LoRASpec(rank=R, alpha=scale * R, targets=_targets(pieces)), source)


def _gate_up(gate: tuple[mx.array, mx.array] | None, up: tuple[mx.array, mx.array] | None) -> tuple[mx.array, mx.array]:
    """mlx-lm's separate gate and up pairs as one interleaved gate_up pair: A stacked, B block diagonal."""
    ref = gate if gate is not None else up
    E, I, _ = ref[1].shape
    if gate is not None and up is not None and gate[0].shape == up[0].shape and mx.array_equal(gate[0], up[0]).item():
        # one A shared by gate and up (as our export writes it): the pair is ours again, at rank r
        return gate[0], mx.stack([gate[1], up[1]], axis=2).reshape(E, 2 * I, gate[0].shape[1])
    rg, ru = (gate[0].shape[1] if gate else 0), (up[0].shape[1] if up else 0)
    a = mx.concatenate([p[0] for p in (gate, up) if p is not None], axis=1)  # [E, rg + ru, H]
    zeros = lambda r: mx.zeros((E, I, r), dtype=ref[1].dtype)  # noqa: E731
    g = mx.concatenate([gate[1], zeros(ru)], axis=-1) if gate else zeros(rg + ru)
    u = mx.concatenate([zeros(rg), up[1]], axis=-1) if up else zeros(rg + ru)
    return a, mx.stack([g, u], axis=2).reshape(E, 2 * I, rg + ru)  # row 2j gate j, 2j+1 up j


def _assemble(pieces: dict[tuple[int, str], Piece], model_config: Any, make_spec: Callable[[int], LoRASpec],
              source: str) -> tuple[LoRASpec, dict[str, mx.array]]:  # fmt: skip
    """One spec (the largest rank) and a full set of our tensors: padded, scale folded, zeros where absent."""
    if not pieces:
        raise LoRAError(f"{source}: no LoRA tensor found")
    L = model_config.num_hidden_layers
    bad = sorted({i for i, _ in pieces if i >= L})
    if bad:
        raise LoRAError(f"{source}: adapters for layer {bad[0]}, but the model has {L} layers (0..{L - 1})")
    R = max(a.shape[-2] for a, _, _ in pieces.values())
    spec = make_spec(R)
    layers = sorted({i for i, _ in pieces})
    spec = LoRASpec(**{**spec.to_dict(), "layers": None if layers == list(range(L)) else layers})
    dims, E = _dims(model_config), model_config.num_local_experts
    flat = {}
    for i in layers:
        for target in spec.targets:
            for module in _TARGET_MODULES[target]:
                d_in, d_out = dims[module]
                lead = (E,) if target == "experts" else ()
                a, b, scale = pieces.get((i, module), (mx.zeros((*lead, R, d_in)), mx.zeros((*lead, d_out, R)), spec.scale))
                a, b = a.astype(mx.float32), b.astype(mx.float32)
                r = a.shape[-2]
                if r < R:  # zero-pad: the extra directions contribute nothing
                    a = mx.concatenate([a, mx.zeros((*lead, R - r, d_in))], axis=-2)
                    b = mx.concatenate([b, mx.zeros((*lead, d_out, R - r))], axis=-1)
                if scale != spec.scale:
                    b = b * (scale / spec.scale)
                flat[f"layers.{i}.{module}.lora_a"], flat[f"layers.{i}.{module}.lora_b"] = a, b
    return spec, flat


def to_peft(
    spec: LoRASpec, flat: dict[str, mx.array], *, base_name: str | None = None
) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Our spec and tensors as a PEFT adapter for ``GptOssForCausalLM``: (state-dict tensors, adapter_config.json);
    :func:`from_peft` reads them back exactly."""
    _check_rank(spec, flat)
    E = next((v.shape[0] for k, v in flat.items() if ".experts_lora." in k), 1)
    out, attention, params = {}, set(), set()
    for name, v in flat.items():
        i, module, ab = _contract_name(name)
        v = v.astype(mx.float32)
        if module.startswith("mlp.experts_lora."):
            param = "gate_up_proj" if module.endswith("gate_up") else "down_proj"
            params.add(f"model.layers.{i}.mlp.experts.{param}")
            has_both = f"layers.{i}.mlp.experts_lora.{'down' if param == 'gate_up_proj' else 'gate_up'}.lora_a" in flat
            peft_module = "mlp.experts" + (".base_layer" if param == "gate_up_proj" and has_both else "")
            r = v.shape[1] if ab == "a" else v.shape[2]
            # A [E, r, in] -> [E·r, in] (expert-major); B [E, out, r] -> [out, r·E] (expert-minor)
            v = v.reshape(E * r, -1) if ab == "a" else v.transpose(1, 2, 0).reshape(v.shape[1], r * E)
        elif module == "mlp.router":
            params.add(f"model.layers.{i}.mlp.router.weight")
            peft_module = module
        else:
            attention.add(f"model.layers.{i}.{module}")
            peft_module = module
        out[f"base_model.model.model.layers.{i}.{peft_module}.lora_{ab.upper()}.weight"] = v
    all_layers = spec.layers is None
    config = {
        "peft_type": "LORA", "r": spec.rank, "lora_alpha": spec.alpha, "use_rslora": spec.rslora,
        # with a layer subset, full module names: PEFT applies layers_to_transform to target_modules only
        "target_modules": (sorted({n.rsplit(".", 1)[1] for n in attention}) if all_layers else sorted(attention)) or None,
        "target_parameters": (sorted({n.split(".", 3)[3] for n in params}) if all_layers else sorted(params)) or None,
        "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "task_type": None, "rank_pattern": {},
        "alpha_pattern": {}, "base_model_name_or_path": base_name,
    }  # fmt: skip
    return out, config


# mlx-lm's module names inside a layer (gpt_oss.py: AttentionBlock, MLPBlock, SwitchGLU), by our target
_MLXLM_KEYS = {
    "attention": tuple(f"self_attn.{p}" for p in _ATTN), "router": ("mlp.router",),
    "experts": ("mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj"),
}  # fmt: skip


def to_mlxlm(spec: LoRASpec, flat: dict[str, mx.array], *, num_hidden_layers: int | None = None,
             base_name: str | None = None) -> tuple[dict[str, mx.array], dict[str, Any]]:  # fmt: skip
    """Our spec and tensors as an mlx-lm adapter (``adapters.safetensors`` tensors, adapter_config.json),
    the inverse of :func:`from_mlxlm`: ``mlx_lm.tuner.utils.load_adapters`` computes what our model computes.

    Attention and router pairs are transposed (mlx-lm's ``x @ lora_a @ lora_b``); an expert's gate_up pair
    becomes mlx-lm's ``gate_proj`` and ``up_proj`` pairs sharing our A (the interleaved rows of B split:
    2j gate, 2j+1 up), so every pair keeps rank r and the one scale. mlx-lm adapts the last
    ``num_layers`` layers: the model's ``num_hidden_layers`` minus the first adapted layer when known
    (all layers adapted also tells it), else -1 (every layer: those without tensors keep mlx-lm's zero
    B, no update).
    """
    _check_rank(spec, flat)
    out: dict[str, mx.array] = {}
    for name, v in flat.items():
        i, module, ab = _contract_name(name)
        v = v.astype(mx.float32)
        key = f"model.layers.{i}"
        if module == "mlp.experts_lora.gate_up":
            if ab == "a":
                out[f"{key}.mlp.experts.gate_proj.lora_a"] = out[f"{key}.mlp.experts.up_proj.lora_a"] = v
            else:  # B [E, 2I, r], rows interleaved
                out[f"{key}.mlp.experts.gate_proj.lora_b"], out[f"{key}.mlp.experts.up_proj.lora_b"] = v[:, 0::2], v[:, 1::2]
        elif module == "mlp.experts_lora.down":
            out[f"{key}.mlp.experts.down_proj.lora_{ab}"] = v  # LoRASwitchLinear: A [E, r, in], B [E, out, r], as ours
        else:
            out[f"{key}.{module}.lora_{ab}"] = v.T  # LoRALinear: lora_a [in, r], lora_b [r, out]
    layers = sorted({_contract_name(k)[0] for k in flat})
    total = num_hidden_layers if num_hidden_layers is not None else (layers[-1] + 1 if spec.layers is None else None)
    config = {
        "fine_tune_type": "lora",
        "num_layers": -1 if total is None else total - layers[0],
        "lora_parameters": {
            "rank": spec.rank,
            "scale": spec.scale,
            "dropout": spec.dropout,
            "keys": [k for t in spec.targets for k in _MLXLM_KEYS[t]],
        },  # fmt: skip
        **({"model": base_name} if base_name else {}),
    }
    return out, config


def export_peft(model_or_adapter: Any, dst: str | Path, *, spec: LoRASpec | None = None, base_name: str | None = None,
                force: bool = False) -> Path:  # fmt: skip
    """Write a model's adapters (or our adapter folder) as a PEFT folder for ``GptOssForCausalLM``.

    ``PeftModel.from_pretrained(GptOssForCausalLM.from_pretrained(base), dst)`` then computes what
    our model computes. Given a model, ``spec`` (the one it was adapted with) keeps alpha and rsLoRA
    as they were; without it they are read back from the adapters (``lora_alpha = scale · r``).
    ``dst`` never overlaps the source folder; an existing ``dst`` is refused unless ``force``, and
    then only an empty folder or an earlier PEFT export holding nothing else is replaced (see
    :func:`~mlx_gptoss.lora.files.write_folder`). Returns ``dst``.
    """
    spec, flat, sources, name = _source(model_or_adapter, spec)
    tensors, config = to_peft(spec, flat, base_name=base_name or name)
    # torch readers expect metadata format "pt"
    return write_folder(dst, PEFT_WEIGHTS, tensors, {"format": "pt"}, config, kind="peft", force=force, sources=sources)


def export_mlxlm(model_or_adapter: Any, dst: str | Path, *, spec: LoRASpec | None = None, base_name: str | None = None,
                 num_hidden_layers: int | None = None, force: bool = False) -> Path:  # fmt: skip
    """Write a model's adapters (or our adapter folder) as an mlx-lm adapter folder (:func:`to_mlxlm`),
    with :func:`export_peft`'s destination rules (``force`` replaces only an earlier mlx-lm export).
    A loaded model gives ``num_hidden_layers`` itself. Returns ``dst``."""
    spec, flat, sources, name = _source(model_or_adapter, spec)
    if num_hidden_layers is None and not isinstance(model_or_adapter, (str, Path)):
        num_hidden_layers = model_or_adapter.config.num_hidden_layers
    tensors, config = to_mlxlm(spec, flat, num_hidden_layers=num_hidden_layers, base_name=base_name or name)
    return write_folder(dst, MLXLM_WEIGHTS, tensors, {"format": "mlx"}, config, kind="mlx-lm", force=force, sources=sources)


def _source(model_or_adapter: Any, spec: LoRASpec | None) -> tuple[LoRASpec, dict[str, mx.array], list[Path], str | None]:
    """(spec, tensors, the source folders an export must not overlap, the base model's name) of a model or our folder."""
    if isinstance(model_or_adapter, (str, Path)):
        src = Path(model_or_adapter).expanduser()
        cfg = read_adapter_config(src)
        try:
            spec = LoRASpec.from_dict({k: v for k, v in cfg.items() if k not in ("format", "version", "base_model", "extra")})
        except (LoRAError, TypeError) as e:
            raise LoRAError(f"{src / CONFIG}: {e}") from None
        return spec, read_weights(src / WEIGHTS), [src], cfg["base_model"].get("name")
    flat = lora_parameters(model_or_adapter)
    if not flat:
        raise LoRAError("the model has no adapters to export (apply_lora or load_adapter first)")
    return spec if spec is not None else _spec_of(model_or_adapter, flat), flat, [], None


def _contract_name(name: str) -> tuple[int, str, str]:
    """(layer, module, "a"/"b") of a tensor name of the contract, e.g. ``layers.3.self_attn.q_proj.lora_a``."""
    m = _CONTRACT_KEY.match(name)
    if m is None:
        raise LoRAError(f"adapter tensor {name!r} is not in the contract's names")
    return int(m[1]), m[2], m[3]


def _check_rank(spec: LoRASpec, flat: dict[str, mx.array]) -> None:
    wrong = sorted(k for k, v in flat.items() if k.endswith(".lora_a") and v.shape[-2] != spec.rank)
    if wrong:
        raise LoRAError(f"adapter tensor {wrong[0]!r} has rank {flat[wrong[0]].shape[-2]}, the spec says {spec.rank}")


def _spec_of(model: Any, flat: dict[str, mx.array]) -> LoRASpec:
    """The spec a model's adapters were made with, from their shapes and their modules' scale."""
    scales = {m.scale for _, m in model.named_modules() if isinstance(m, (LoRAPair, LoRALinear, ExpertsLoRA))}
    if len(scales) != 1:
        raise LoRAError(f"the model's adapters have scales {sorted(scales)}; pass spec=")
    rank = next(v.shape[-2] for k, v in flat.items() if k.endswith("lora_a"))
    names = {k.split(".", 2)[2] for k in flat}
    targets = [t for t, mods in _TARGET_MODULES.items() if any(f"{m}.lora_a" in names for m in mods)]
    layers = sorted({int(k.split(".")[1]) for k in flat})
    return LoRASpec(rank=rank, alpha=scales.pop() * rank, targets=targets,
                    layers=None if layers == list(range(len(model.layers))) else layers)  # fmt: skip


def _dims(cfg: Any) -> dict[str, tuple[int, int]]:
    """(in, out) of every adaptable module, in our names."""
    return {name: (d_in, d_out) for name, (d_out, d_in) in adapted_shapes(cfg, TARGETS).items()}


def _targets(pieces: dict[tuple[int, str], Piece]) -> tuple[str, ...]:
    return tuple(t for t, mods in _TARGET_MODULES.items() if any(m in mods for _, m in pieces))


def _group(tensors: dict[str, mx.array], pattern: re.Pattern, source: str) -> dict[tuple[int, str, str], dict[str, mx.array]]:
    """Tensors by (layer, key prefix, module) -> {"A"/"B" or "a"/"b": tensor}; unknown names are errors."""
    out: dict[tuple[int, str, str], dict[str, mx.array]] = {}
    for name, v in tensors.items():
        m = pattern.match(name)
        if m is None:
            raise LoRAError(f"{source}: tensor {name!r} is not a LoRA tensor of gpt-oss's attention, router or experts")
        out.setdefault((int(m["layer"]), m.groupdict().get("prefix") or "", m["module"]), {})[m["ab"]] = v
    return out


def _peft_matches(key: str, targets: list[str]) -> bool:
    # PEFT's rule for target_parameters: the full name, or a suffix after a dot
    return any(key == t or key.endswith(f".{t}") for t in targets)


def _peft_refusal(config: dict[str, Any], key: str, target_parameters: list[str]) -> str | None:
    """Why PEFT would not adapt ``key`` (a module of GptOssForCausalLM) under ``config``, None if it would.

    Attention projections are modules: matched as ``peft.tuners.tuners_utils.check_target_module_exists``
    matches (``exclude_modules``, then ``target_modules`` as a regex, ``all-linear`` or a list of names or
    suffixes, then ``layers_to_transform``/``layers_pattern`` for a suffix match). The router is a
    parameter (``target_parameters``: a full name or a suffix; none of the module fields apply to it).
    The experts' nesting is checked where their tensors are read.
    """
    if key.endswith(".mlp.router"):
        if _peft_matches(f"{key}.weight", target_parameters):
            return None
        return f"field 'target_parameters' ({target_parameters}) does not name {key}.weight"
    if ".mlp.experts" in key:
        return None
    exclude = config.get("exclude_modules")
    if exclude:
        hit = (
            re.fullmatch(exclude, key)
            if isinstance(exclude, str)
            else key in exclude or any(key.endswith(f".{e}") for e in exclude)
        )
        if hit:
            return f"field 'exclude_modules' ({exclude!r}) excludes it"
    targets = config.get("target_modules")
    if targets is None:
        return "field 'target_modules' is not set (only 'target_parameters' are adapted)"
    if isinstance(targets, str):
        # all-linear: every nn.Linear but the output layer, which in gpt-oss are the attention projections
        if targets.lower() == "all-linear" or re.fullmatch(targets, key):
            return None
        return f"field 'target_modules' ({targets!r}) does not match it"
    if key in targets:  # a full name: PEFT applies no layer filter to it
        return None
    if not any(key.endswith(f".{t}") for t in targets):
        return f"field 'target_modules' ({targets}) does not name it"
    layers, pattern = config.get("layers_to_transform"), config.get("layers_pattern")
    if layers is None or layers == []:
        return None
    if not pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)  # the first numbered segment: the layer
    else:
        m = next(filter(None, (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
                               for p in ([pattern] if isinstance(pattern, str) else pattern))), None)  # fmt: skip
    if m is None:
        return f"field 'layers_pattern' ({pattern!r}) matches no layer index in it"
    idx = int(m["idx"])
    if idx != layers if isinstance(layers, int) else idx not in layers:
        return f"its layer {idx} is not in field 'layers_to_transform' ({layers})"
    return None


def _pattern_key(patterns: dict[str, Any], key: str) -> str:
    # PEFT's rule for rank_pattern / alpha_pattern (peft.utils.other.get_pattern_key): first match wins
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", key)), key)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _read_json(path: Path) -> dict[str, Any]:
    cfg = read_json(path, f"{path.parent} is not an adapter folder")
    if not isinstance(cfg, dict):
        raise LoRAError(f"{path}: expected a JSON object")
    return cfg


def _read_tensors(folder: Path, name: str) -> dict[str, mx.array]:
    path = folder / name
    if not path.is_file():
        other = [p.name for p in folder.glob("*.bin")]
        hint = f" ({other[0]} is a pickle; re-save with safe_serialization=True)" if other else ""
        raise LoRAError(f"{path}: not found{hint}")
    return read_weights(path)
