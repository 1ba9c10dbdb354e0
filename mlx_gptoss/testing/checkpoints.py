"""Random-weight checkpoints in the *released* layouts, for tests, benchmarks and users' own tests.

The same seed gives the same model in every layout: each tensor is drawn from a generator seeded
by its Hugging Face name, the original layout stacks the same q/k/v, and the dense-experts layout
stores the exact dequantized values of the same MXFP4 codes (so conversion is lossless).
Written tensor by tensor (large ones in row chunks), so a full-size 20b needs little memory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from mlx_gptoss_convert.layout import HF, HF_DENSE, ORIGINAL
from mlx_gptoss_convert.release import hf_config_dict, original_config_dict

from ..config import GptOssConfig
from ..safetensors_io import SafetensorsWriter, split_into_shards, tensor_nbytes
from .tokenizer import write_tokenizer_json

# edit(name, first_row, rows) -> rows: changes a float tensor's drawn values (float32, row chunks) before they are written
Edit = Callable[[str, int, np.ndarray], np.ndarray]

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)
ROW_CHUNK_ELEMS = 1 << 25


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Released blocks [..., G, 16] u8 and scales [..., G] u8 -> float32 [..., G*32] (OCP MX spec)."""
    lo, hi = E2M1[blocks & 0x0F], E2M1[blocks >> 4]
    vals = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)  # even element = low nibble
    vals = vals * np.ldexp(np.float32(1), scales.astype(np.int32) - 127)[..., None]
    return vals.reshape(*blocks.shape[:-2], -1)


class _Spec:
    """One released tensor: name, dtype, shape, and how to draw it."""

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...], kind: str, scale: float = 1.0, fan_in: int = 0):
        self.name, self.dtype, self.shape, self.kind, self.scale, self.fan_in = name, dtype, shape, kind, scale, fan_in


def _hf_specs(cfg: GptOssConfig, dense: bool) -> list[_Spec]:
    H, I, E, D, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.head_dim, cfg.vocab_size
    Q, KV = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    s = [_Spec("model.embed_tokens.weight", "BF16", (V, H), "normal", 1.0)]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        s += [
            _Spec(p + "input_layernorm.weight", "BF16", (H,), "norm"),
            _Spec(p + "self_attn.q_proj.weight", "BF16", (Q, H), "normal", 1 / math.sqrt(H)),
            _Spec(p + "self_attn.q_proj.bias", "BF16", (Q,), "normal", 0.1),
            _Spec(p + "self_attn.k_proj.weight", "BF16", (KV, H), "normal", 1 / math.sqrt(H)),
            _Spec(p + "self_attn.k_proj.bias", "BF16", (KV,), "normal", 0.1),
            _Spec(p + "self_attn.v_proj.weight", "BF16", (KV, H), "normal", 1 / math.sqrt(H)),
            _Spec(p + "self_attn.v_proj.bias", "BF16", (KV,), "normal", 0.1),
            _Spec(p + "self_attn.o_proj.weight", "BF16", (H, Q), "normal", 1 / math.sqrt(Q)),
            _Spec(p + "self_attn.o_proj.bias", "BF16", (H,), "normal", 0.1),
            _Spec(p + "self_attn.sinks", "BF16", (cfg.num_attention_heads,), "normal", 1.0),
            _Spec(p + "post_attention_layernorm.weight", "BF16", (H,), "norm"),
            _Spec(p + "mlp.router.weight", "BF16", (E, H), "normal", 1 / math.sqrt(H)),
            _Spec(p + "mlp.router.bias", "BF16", (E,), "normal", 0.1),
        ]
        for proj, d_out, d_in in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):
            e = p + "mlp.experts." + proj
            if dense:
                s.append(_Spec(e, "BF16", (E, d_in, d_out), "dense-mxfp4", fan_in=d_in))
            else:
                s.append(_Spec(e + "_blocks", "U8", (E, d_out, d_in // 32, 16), "blocks"))
                s.append(_Spec(e + "_scales", "U8", (E, d_out, d_in // 32), "scales", fan_in=d_in))
            s.append(_Spec(e + "_bias", "BF16", (E, d_out), "normal", 0.1))
    s += [_Spec("model.norm.weight", "BF16", (H,), "norm"), _Spec("lm_head.weight", "BF16", (V, H), "normal", 1 / math.sqrt(H))]
    return s


def _scale_exponent(fan_in: int) -> int:
    # E2M1 codes drawn uniformly have rms ~2.93: pick 2^e so a unit-rms input gives ~unit-rms output.
    return round(math.log2(1.0 / (2.93 * math.sqrt(fan_in))))


def _draw(spec: _Spec, seed: int, edit: Edit | None = None) -> Iterator[np.ndarray]:
    """The tensor's bytes in row chunks (as uint8 / uint16-bf16 arrays); ``edit`` may change float values."""
    rng = _rng(seed, spec.name)
    if spec.kind in ("blocks", "dense-mxfp4"):
        E = spec.shape[0]
        for e in range(E):
            if spec.kind == "blocks":
                yield _expert_blocks(seed, spec.name[: -len("_blocks")], e, spec.shape[1:])
            else:
                d_in, d_out = spec.shape[1:]
                blocks = _expert_blocks(seed, spec.name, e, (d_out, d_in // 32, 16))
                scales = _expert_scales(seed, spec.name, e, (d_out, d_in // 32), spec.fan_in)
                yield to_bf16_bits(dequantize_mxfp4(blocks, scales).T)
        return
    if spec.kind == "scales":
        for e in range(spec.shape[0]):
            yield _expert_scales(seed, spec.name[: -len("_scales")], e, spec.shape[1:], spec.fan_in)
        return
    rows = spec.shape[0]
    per_row = int(np.prod(spec.shape[1:], dtype=np.int64)) or 1
    step = max(1, ROW_CHUNK_ELEMS // per_row)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        x = rng.standard_normal((n, *spec.shape[1:]), dtype=np.float32)
        x = 1.0 + 0.1 * x if spec.kind == "norm" else spec.scale * x
        yield to_bf16_bits(x if edit is None else edit(spec.name, r, x))


def _expert_blocks(seed: int, base: str, e: int, shape: tuple[int, ...]) -> np.ndarray:
    rng = _rng(seed, f"{base}.blocks.{e}")
    return np.frombuffer(rng.bytes(int(np.prod(shape))), dtype=np.uint8).reshape(shape)


def _expert_scales(seed: int, base: str, e: int, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    rng = _rng(seed, f"{base}.scales.{e}")
    return (127 + _scale_exponent(fan_in) + rng.integers(-1, 2, size=shape)).astype(np.uint8)


def _original_specs(cfg: GptOssConfig) -> list[tuple[str, str, tuple[int, ...], list[_Spec]]]:
    """original/ names, each made of one or more HF specs (qkv stacks three)."""
    by_name = {s.name: s for s in _hf_specs(cfg, dense=False)}
    out = [("embedding.weight", "BF16", by_name["model.embed_tokens.weight"].shape, [by_name["model.embed_tokens.weight"]])]
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"block.{i}."
        pairs = [
            (b + "attn.norm.scale", [p + "input_layernorm.weight"]),
            (b + "attn.qkv.weight", [p + f"self_attn.{x}_proj.weight" for x in "qkv"]),
            (b + "attn.qkv.bias", [p + f"self_attn.{x}_proj.bias" for x in "qkv"]),
            (b + "attn.sinks", [p + "self_attn.sinks"]),
            (b + "attn.out.weight", [p + "self_attn.o_proj.weight"]),
            (b + "attn.out.bias", [p + "self_attn.o_proj.bias"]),
            (b + "mlp.norm.scale", [p + "post_attention_layernorm.weight"]),
            (b + "mlp.gate.weight", [p + "mlp.router.weight"]),
            (b + "mlp.gate.bias", [p + "mlp.router.bias"]),
            (b + "mlp.mlp1_weight.blocks", [p + "mlp.experts.gate_up_proj_blocks"]),
            (b + "mlp.mlp1_weight.scales", [p + "mlp.experts.gate_up_proj_scales"]),
            (b + "mlp.mlp1_bias", [p + "mlp.experts.gate_up_proj_bias"]),
            (b + "mlp.mlp2_weight.blocks", [p + "mlp.experts.down_proj_blocks"]),
            (b + "mlp.mlp2_weight.scales", [p + "mlp.experts.down_proj_scales"]),
            (b + "mlp.mlp2_bias", [p + "mlp.experts.down_proj_bias"]),
        ]
        for name, parts in pairs:
            specs = [by_name[x] for x in parts]
            shape = (sum(s.shape[0] for s in specs), *specs[0].shape[1:])
            out.append((name, specs[0].dtype, shape, specs))
    out += [("norm.scale", "BF16", (cfg.hidden_size,), [by_name["model.norm.weight"]]),
            ("unembedding.weight", "BF16", by_name["lm_head.weight"].shape, [by_name["lm_head.weight"]])]  # fmt: skip
    return out


def _write_files(path: Path, groups: list[list[tuple[str, str, tuple[int, ...], list[_Spec]]]], seed: int, names: list[str],
                 progress: Callable[[int], None] | None, edit: Edit | None) -> dict[str, str]:  # fmt: skip
    weight_map = {}
    for fname, group in zip(names, groups):
        with SafetensorsWriter(path / fname, [(n, d, s) for n, d, s, _ in group], {"format": "pt"}) as w:
            for name, _, _, specs in group:
                for spec in specs:
                    for chunk in _draw(spec, seed, edit):
                        w.write(name, chunk)
                        if progress is not None:
                            progress(chunk.nbytes)
                weight_map[name] = fname
    return weight_map


def release_nbytes(config: GptOssConfig, layout: str = HF) -> int:
    """The bytes of the tensors :func:`write_release` writes for ``config`` in ``layout``."""
    return sum(tensor_nbytes(s.dtype, s.shape) for s in _hf_specs(config, dense=layout == HF_DENSE))


def write_release(
    dst: str | Path,
    config: GptOssConfig,
    *,
    layout: str = HF,
    seed: int = 0,
    shard_bytes: int = 4 << 30,
    tokenizer: bool | Path = False,
    progress: Callable[[int], None] | None = None,
    edit: Edit | None = None,
) -> Path:
    """Write a random gpt-oss checkpoint in a released layout to ``dst`` (created; must not exist).

    layout "hf" writes the Hugging Face layout (MXFP4 blocks/scales, index, config.json);
    "hf-dense" the same with dense bf16 experts [E, in, out]; "original" openai's layout under
    ``dst/original``. ``tokenizer`` adds an o200k_harmony tokenizer.json (True: built from
    o200k_base once, then cached; a path: copied from there). ``progress`` is called with each
    chunk's bytes; ``edit(name, first_row, rows)`` may change a float tensor's values, named as the
    Hugging Face layout names them (:mod:`.rig` rigs a reply this way).
    """
    dst = Path(dst)
    dst.mkdir(parents=True)
    if layout in (HF, HF_DENSE):
        items = [(s.name, s.dtype, s.shape, [s]) for s in _hf_specs(config, dense=layout == HF_DENSE)]
        groups = split_into_shards(items, lambda it: tensor_nbytes(it[1], it[2]), shard_bytes)
        names = [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
        weight_map = _write_files(dst, groups, seed, names, progress, edit)
        total = sum(os.path.getsize(dst / n) for n in names)
        (dst / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
        (dst / "config.json").write_text(json.dumps(hf_config_dict(config, dense=layout == HF_DENSE), indent=2))
        (dst / "generation_config.json").write_text(
            json.dumps({"bos_token_id": 199998, "eos_token_id": [200002, 199999, 200012], "pad_token_id": 199999})
        )
    elif layout == ORIGINAL:
        (dst / "original").mkdir()
        _write_files(dst / "original", [_original_specs(config)], seed, ["model.safetensors"], progress, edit)
        (dst / "original" / "config.json").write_text(json.dumps(original_config_dict(config), indent=2))
    else:
        raise ValueError(f"unknown layout {layout!r}")
    if isinstance(tokenizer, Path):
        shutil.copy2(tokenizer, dst / "tokenizer.json")
    elif tokenizer:
        write_tokenizer_json(dst / "tokenizer.json")
    return dst
