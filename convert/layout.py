"""The one table of release-key transforms, and the MLX checkpoint layout they produce.

Every tensor of the converted checkpoint is named after a parameter of ``mlx_gptoss.model.GptOss``
and is stored exactly as that parameter is laid out, so the loader reads it without renaming,
re-layout or copies. FORMAT_VERSION changes whenever that layout changes.

Layout, format version 1 (``{i}`` is the layer index; Q = Hq·D, KV = Hkv·D):

    embed_tokens.weight                              [V, H]                   float (as released)
    layers.{i}.input_layernorm.weight                [H]
    layers.{i}.self_attn.qkv.weight / .bias          [Q + 2·KV, H] / [Q+2·KV]  q, k, v stacked on rows
    layers.{i}.self_attn.o_proj.weight / .bias       [H, Q] / [H]
    layers.{i}.self_attn.sinks                       [Hq]
    layers.{i}.post_attention_layernorm.weight       [H]
    layers.{i}.mlp.router.weight / .bias             [E, H] / [E]            (or .weight/.scales/.biases quantized)
    layers.{i}.mlp.gate_up.weight                    [E, 2I, H/8]  U32   MXFP4 codes, rows interleaved
    layers.{i}.mlp.gate_up.scales                    [E, 2I, H/32] U8    E8M0 scales  (gate 2j, up 2j+1)
    layers.{i}.mlp.gate_up.bias                      [E, 2I]
    layers.{i}.mlp.down.weight / .scales / .bias     [E, H, I/8] U32 / [E, H, I/32] U8 / [E, H]
    norm.weight                                      [H]
    lm_head.weight                                   [V, H]

Attention, router, embed_tokens and lm_head may be stored quantized (config.json "quantization":
``mx.quantize`` layout, .weight U32 / .scales / .biases), chosen at conversion or kept from an
mlx-lm checkpoint. MXFP4 codes are the released ``*_blocks`` bytes unchanged: [E, out, in/32, 16] U8 read as
little-endian U32 words is exactly MLX's ``mode="mxfp4"`` packing (element 2k in the low nibble).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlx_gptoss.converted import FORMAT_NAME as FORMAT_NAME  # the format is the loader's contract
from mlx_gptoss.converted import FORMAT_VERSION as FORMAT_VERSION

# Source layouts, detected from the tensor names (never from paths).
HF = "hf"  # released Hugging Face layout, MXFP4 experts as *_blocks / *_scales
HF_DENSE = "hf-dense"  # Hugging Face layout with dense float experts [E, in, out] (fine-tuned exports)
HF_DENSE_T = "hf-dense-t"  # the same with the experts transposed, [E, out, in] (some fine-tune exporters)
ORIGINAL = "original"  # openai's original/ layout
MLXLM = "mlx-lm"  # mlx-lm's gpt_oss layout: gate/up de-interleaved, any layer possibly mx.quantize'd
LAYOUTS = (HF, HF_DENSE, HF_DENSE_T, ORIGINAL, MLXLM)
DENSE_LAYOUTS = (HF_DENSE, HF_DENSE_T)  # experts quantized to MXFP4 by the converter

# Ops: how the source tensors become ours.
COPY = "copy"  # bytes unchanged
CONCAT = "concat"  # sources stacked along axis 0 (bytes appended)
BLOCKS = "blocks"  # MXFP4 blocks [E, out, in/32, 16] U8 -> [E, out, in/8] U32, bytes unchanged
QUANT_W = "quantize-weight"  # dense [E, in, out] float -> MXFP4 codes of its transpose
QUANT_S = "quantize-scales"  # ... and the matching E8M0 scales
QUANT_WT, QUANT_ST = "quantize-weight-t", "quantize-scales-t"  # the same from dense [E, out, in]
INTERLEAVE = "interleave"  # two [E, n, ...] sources -> [E, 2n, ...], rows alternating (bytes unchanged)
# Non-expert components stored quantized (chosen at conversion, `mx.quantize` layout): the
# module's float weight, read as the table says, becomes .weight (packed), .scales (, .biases).
QLIN_W, QLIN_S, QLIN_B = "quantize-linear-weight", "quantize-linear-scales", "quantize-linear-biases"
QLIN_OPS = {"weight": QLIN_W, "scales": QLIN_S, "biases": QLIN_B}


@dataclass(frozen=True)
class Rule:
    """How one of our tensors is made in each source layout: (source key templates, op)."""

    ours: str
    sources: dict[str, tuple[tuple[str, ...], str]]


def _same(hf: str, orig: str, op: str = COPY) -> dict[str, tuple[tuple[str, ...], str]]:
    return {HF: ((hf,), op), HF_DENSE: ((hf,), op), HF_DENSE_T: ((hf,), op), MLXLM: ((hf,), op), ORIGINAL: ((orig,), op)}


def _dense(hf: tuple[str, ...], op: str) -> dict[str, tuple[tuple[str, ...], str]]:
    return {HF: (hf, op), HF_DENSE: (hf, op), HF_DENSE_T: (hf, op), MLXLM: (hf, op)}


_QKV = ("q_proj", "k_proj", "v_proj")


_L = "model.layers.{i}."
_E = _L + "mlp.experts."
_B = "block.{i}."

TABLE: tuple[Rule, ...] = (
    Rule("embed_tokens.weight", _same("model.embed_tokens.weight", "embedding.weight")),
    Rule("layers.{i}.input_layernorm.weight", _same(_L + "input_layernorm.weight", _B + "attn.norm.scale")),
    Rule("layers.{i}.self_attn.qkv.weight", {
        **_dense(tuple(_L + f"self_attn.{p}.weight" for p in _QKV), CONCAT), ORIGINAL: ((_B + "attn.qkv.weight",), COPY),
    }),
    Rule("layers.{i}.self_attn.qkv.bias", {
        **_dense(tuple(_L + f"self_attn.{p}.bias" for p in _QKV), CONCAT), ORIGINAL: ((_B + "attn.qkv.bias",), COPY),
    }),
    Rule("layers.{i}.self_attn.o_proj.weight", _same(_L + "self_attn.o_proj.weight", _B + "attn.out.weight")),
    Rule("layers.{i}.self_attn.o_proj.bias", _same(_L + "self_attn.o_proj.bias", _B + "attn.out.bias")),
    Rule("layers.{i}.self_attn.sinks", _same(_L + "self_attn.sinks", _B + "attn.sinks")),
    Rule("layers.{i}.post_attention_layernorm.weight",
         _same(_L + "post_attention_layernorm.weight", _B + "mlp.norm.scale")),
    Rule("layers.{i}.mlp.router.weight", _same(_L + "mlp.router.weight", _B + "mlp.gate.weight")),
    Rule("layers.{i}.mlp.router.bias", _same(_L + "mlp.router.bias", _B + "mlp.gate.bias")),
    Rule("layers.{i}.mlp.gate_up.weight", {
        HF: ((_E + "gate_up_proj_blocks",), BLOCKS),
        HF_DENSE: ((_E + "gate_up_proj",), QUANT_W),
        HF_DENSE_T: ((_E + "gate_up_proj",), QUANT_WT),
        MLXLM: ((_E + "gate_proj.weight", _E + "up_proj.weight"), INTERLEAVE),
        ORIGINAL: ((_B + "mlp.mlp1_weight.blocks",), BLOCKS),
    }),
    Rule("layers.{i}.mlp.gate_up.scales", {
        HF: ((_E + "gate_up_proj_scales",), COPY),
        HF_DENSE: ((_E + "gate_up_proj",), QUANT_S),
        HF_DENSE_T: ((_E + "gate_up_proj",), QUANT_ST),
        MLXLM: ((_E + "gate_proj.scales", _E + "up_proj.scales"), INTERLEAVE),
        ORIGINAL: ((_B + "mlp.mlp1_weight.scales",), COPY),
    }),
    Rule("layers.{i}.mlp.gate_up.bias", {
        **_same(_E + "gate_up_proj_bias", _B + "mlp.mlp1_bias"),
        MLXLM: ((_E + "gate_proj.bias", _E + "up_proj.bias"), INTERLEAVE),
    }),
    Rule("layers.{i}.mlp.down.weight", {
        HF: ((_E + "down_proj_blocks",), BLOCKS),
        HF_DENSE: ((_E + "down_proj",), QUANT_W),
        HF_DENSE_T: ((_E + "down_proj",), QUANT_WT),
        MLXLM: ((_E + "down_proj.weight",), COPY),
        ORIGINAL: ((_B + "mlp.mlp2_weight.blocks",), BLOCKS),
    }),
    Rule("layers.{i}.mlp.down.scales", {
        HF: ((_E + "down_proj_scales",), COPY),
        HF_DENSE: ((_E + "down_proj",), QUANT_S),
        HF_DENSE_T: ((_E + "down_proj",), QUANT_ST),
        MLXLM: ((_E + "down_proj.scales",), COPY),
        ORIGINAL: ((_B + "mlp.mlp2_weight.scales",), COPY),
    }),
    Rule("layers.{i}.mlp.down.bias", {
        **_same(_E + "down_proj_bias", _B + "mlp.mlp2_bias"), MLXLM: ((_E + "down_proj.bias",), COPY),
    }),
    Rule("norm.weight", _same("model.norm.weight", "norm.scale")),
    Rule("lm_head.weight", _same("lm_head.weight", "unembedding.weight")),
)  # fmt: skip

# mlx-lm stores non-expert modules already quantized (``mx.quantize`` layout): each stored leaf of
# ours comes from the same leaf of the mlx-lm module(s), the rows of q, k and v stacked.
_STORED_MODULES = (
    ("layers.{i}.self_attn.qkv", tuple(_L + f"self_attn.{p}" for p in _QKV)),
    ("layers.{i}.self_attn.o_proj", (_L + "self_attn.o_proj",)),
    ("layers.{i}.mlp.router", (_L + "mlp.router",)),
    ("embed_tokens", ("model.embed_tokens",)),
    ("lm_head", ("lm_head",)),
)
TABLE += tuple(
    Rule(f"{ours}.{leaf}", {MLXLM: (tuple(f"{s}.{leaf}" for s in srcs), CONCAT if len(srcs) > 1 else COPY)})
    for ours, srcs in _STORED_MODULES for leaf in ("scales", "biases")
)  # fmt: skip
# The mlx-lm module path (as its config's per-path quantization names it) of each quantizable component.
MLXLM_MODULES = {
    "attention": tuple(_L + f"self_attn.{p}" for p in (*_QKV, "o_proj")),
    "router": (_L + "mlp.router",),
    "embed_tokens": ("model.embed_tokens",),
    "lm_head": ("lm_head",),
}
MLXLM_EXPERTS = tuple(_E + p for p in ("gate_proj", "up_proj", "down_proj"))

# openai's original/config.json -> Hugging Face style keys (the model config reads the latter).
ORIGINAL_CONFIG_KEYS = {
    "num_experts": "num_local_experts",
    "experts_per_token": "num_experts_per_tok",
}
ORIGINAL_ROPE_KEYS = {
    "rope_scaling_factor": "factor",
    "rope_ntk_alpha": "beta_slow",
    "rope_ntk_beta": "beta_fast",
    "initial_context_length": "original_max_position_embeddings",
}


def original_config_to_hf(d: dict) -> dict:
    """Translate openai's original/config.json into the Hugging Face style keys."""
    out = {ORIGINAL_CONFIG_KEYS.get(k, k): v for k, v in d.items() if k not in ORIGINAL_ROPE_KEYS}
    rope = {ORIGINAL_ROPE_KEYS[k]: v for k, v in d.items() if k in ORIGINAL_ROPE_KEYS}
    # openai's implementation never rounds the YaRN correction range.
    out["rope_scaling"] = {"rope_type": "yarn", "truncate": False, **rope}
    numbers = [d.get(k) for k in ("initial_context_length", "rope_scaling_factor")]
    # non-numbers are left for the config check to name (it reads both again under their HF names)
    if all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers):
        out["max_position_embeddings"] = int(d["initial_context_length"] * d["rope_scaling_factor"])
    out.setdefault("model_type", "gpt_oss")
    return out


def detect_layout(names: set[str]) -> str | None:
    """Which source layout a set of tensor names is in, or None (the dense orientation is told by shape)."""
    if "embedding.weight" in names or any(n.startswith("block.") for n in names):
        return ORIGINAL
    if any(n.endswith("mlp.experts.gate_proj.weight") for n in names):
        return MLXLM
    if any(n.endswith("mlp.experts.gate_up_proj_blocks") for n in names):
        return HF
    if any(n.endswith("mlp.experts.gate_up_proj") for n in names):
        return HF_DENSE
    return None


_LAYER = re.compile(r"^layers\.(\d+)\.")
_COMPONENTS = (
    (re.compile(r"^layers\.\d+\.self_attn\.(qkv|o_proj)\.(weight|scales|biases)$"), "attention"),
    (re.compile(r"^layers\.\d+\.mlp\.router\.(weight|scales|biases)$"), "router"),
    (re.compile(r"^lm_head\.(weight|scales|biases)$"), "lm_head"),
    (re.compile(r"^embed_tokens\.(weight|scales|biases)$"), "embed_tokens"),
)


def quantizable(our_key: str) -> str | None:
    """The component ("attention", "router", "lm_head", "embed_tokens") whose storage ``our_key`` is part of."""
    return next((comp for pattern, comp in _COMPONENTS if pattern.match(our_key)), None)


def rule_for(our_key: str) -> tuple[Rule, int | None]:
    """The table row for one of our keys, and its layer index (None outside the layers)."""
    m = _LAYER.match(our_key)
    template = _LAYER.sub("layers.{i}.", our_key) if m else our_key
    for rule in TABLE:
        if rule.ours == template:
            return rule, int(m.group(1)) if m else None
    raise KeyError(f"no conversion rule for {our_key!r}")


def source_keys(our_key: str, layout: str) -> tuple[tuple[str, ...], str] | None:
    """The table read backwards (for export): the ``layout`` keys ``our_key`` is made from, and the op.

    None when the layout has no such tensor (e.g. the scales of a quantized attention in the release).
    """
    rule, i = rule_for(our_key)
    if layout not in rule.sources:
        return None
    templates, op = rule.sources[layout]
    return tuple(t.format(i=i) for t in templates), op
