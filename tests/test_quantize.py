"""Non-expert weights stored quantized at conversion: layout, accuracy bounds, errors."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY

import mlx_gptoss
from mlx_gptoss.config import ConfigError, QuantSpec
from mlx_gptoss.safetensors_io import read_header
from mlx_gptoss_convert import convert


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def release_tensor(release, name) -> np.ndarray:
    for f in release.glob("*.safetensors"):
        header = read_header(f)[0]
        if name in header:
            return bf16_to_f32(header[name].read_numpy())
    raise KeyError(name)


@pytest.mark.parametrize("spec", [QuantSpec("affine", 8, 64), QuantSpec("affine", 4, 32), QuantSpec("mxfp8", 8, 32)], ids=str)
def test_quantized_attention_is_within_the_format_bound(releases, tmp_path, spec):
    out = convert(releases["hf"], tmp_path / "q", quantization={"attention": spec, "lm_head": spec})
    model = mlx_gptoss.load(out, dtype=mx.float32)
    layer = model.layers[1].self_attn.qkv
    args = dict(group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
    w = np.array(mx.dequantize(layer.weight, layer.scales, layer.get("biases"), **args, dtype=mx.float32))
    ref = np.concatenate([release_tensor(releases["hf"], f"model.layers.1.self_attn.{x}_proj.weight") for x in "qkv"])
    groups = ref.reshape(ref.shape[0], -1, spec.group_size)
    span = groups.max(-1) - groups.min(-1) if spec.mode == "affine" else np.abs(groups).max(-1)
    # affine: one quantization step (MLX moves the grid so that 0 is exact, so rounding can cost
    # more than half a step), plus the bf16 rounding (2^-9 relative) of the stored scale and
    # bias; mxfp8 (e4m3, 3 mantissa bits): 2^-4 of the group's largest magnitude. A misplaced
    # row or group costs about the group's whole span.
    amax = np.abs(groups).max(-1)
    bound = span / (2**spec.bits - 1) + (span + amax) * 2.0**-8 if spec.mode == "affine" else span * 2.0**-4
    err = np.abs(w - ref).reshape(groups.shape).max(-1)
    assert (err <= bound * 1.01 + 1e-6).all()
    assert model.layers[0].self_attn.qkv.bias.dtype == mx.float32  # biases stay float
    assert np.isfinite(np.array(model(mx.array([[1, 2, 3]])))).all()


def test_quantized_embedding_matches_dequantized_rows(releases, tmp_path):
    spec = QuantSpec("affine", 8, 64)
    out = convert(releases["hf"], tmp_path / "q", quantization={"embed_tokens": spec})
    model = mlx_gptoss.load(out, dtype=mx.float32)
    ref = release_tensor(releases["hf"], "model.embed_tokens.weight")
    ids = mx.array([[0, 7, 511]])
    got = np.array(model.embed_tokens(ids))[0]
    assert np.abs(got - ref[[0, 7, 511]]).max() < 0.02 * np.abs(ref).max()


def test_experts_are_untouched_by_quantization_options(releases, tmp_path):
    a = convert(releases["hf"], tmp_path / "a")
    b = convert(releases["hf"], tmp_path / "b", quantization={"attention": QuantSpec(bits=4)})
    ha, hb = read_header(next(a.glob("*.safetensors")))[0], read_header(next(b.glob("*.safetensors")))[0]
    for k in ha:
        if ".mlp.gate_up." in k or ".mlp.down." in k:
            assert ha[k].read_bytes() == hb[k].read_bytes(), k


def test_spec_parsing():
    assert QuantSpec.parse("8") == QuantSpec("affine", 8, 64)
    assert QuantSpec.parse("4g32") == QuantSpec("affine", 4, 32)
    assert QuantSpec.parse("mxfp8") == QuantSpec("mxfp8", 8, 32) and QuantSpec.parse("none") is None
    with pytest.raises(ConfigError, match="cannot read"):
        QuantSpec.parse("eight")
    with pytest.raises(ConfigError, match="unsupported"):
        QuantSpec("affine", 5, 64)


def test_cli_preset(releases, tmp_path):
    import json

    from click.testing import CliRunner

    from mlx_gptoss.cli import main

    res = CliRunner().invoke(main, ["convert", str(releases["hf"]), str(tmp_path / "p"), "--preset", "16gb", "--lm-head", "4"])
    assert res.exit_code == 0, res.output
    q = json.loads((tmp_path / "p" / "config.json").read_text())["quantization"]
    assert q["attention"]["bits"] == 8 and q["lm_head"]["bits"] == 4 and q["embed_tokens"]["bits"] == 8
    assert TINY.hidden_size == 64
