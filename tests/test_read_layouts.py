"""Checkpoints users already have: mlx-lm / mlx-community exports, mlx-vlm prefixes, transposed dense fine-tunes.

The mlx-lm checkpoints are made by mlx-lm's own code from the tiny release (``load_model``, which
splits gate/up and keeps the MXFP4 experts; ``quantize_model`` with a per-path predicate as the
MXFP4-Q8 exports use; ``save_model`` / ``save_config``). Logits are compared with mlx-lm's on the
same files in float32. mlx-lm rounds YaRN's correction range and the release does not, so the
release here uses YaRN factor 1, where the correction range changes nothing (see test_lora_mlxlm).
"""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

import mlx_gptoss
from mlx_gptoss.config import GptOssConfig, QuantSpec, YarnScaling
from mlx_gptoss.safetensors_io import read_header
from mlx_gptoss.testing import write_release
from mlx_gptoss_convert import ConversionError, convert

pytest.importorskip("mlx_lm")
from test_parity import BOUND, relative_error  # noqa: E402

CFG = GptOssConfig.tiny(rope_scaling=YarnScaling(factor=1.0))
IDS = mx.array(np.random.default_rng(8).integers(0, CFG.vocab_size, (1, 2 * CFG.sliding_window)))
Q8 = {"group_size": 64, "bits": 8, "mode": "affine"}
NON_EXPERT = ("self_attn.", "mlp.router", "embed_tokens", "lm_head")


def q8_predicate(path, module):
    """MXFP4-Q8: 8-bit affine attention, router, embedding and unembedding; the MXFP4 experts as they are."""
    return dict(Q8) if any(s in path for s in NON_EXPERT) else False


def mlxlm_save(rel, dst, predicate=None, dequantize=False):
    """The release as mlx-lm loads it, optionally quantized by mlx-lm, saved by mlx-lm into dst."""
    from mlx_lm.utils import dequantize_model, load_model, quantize_model, save_config, save_model

    model, config = load_model(rel)
    if dequantize:  # mlx-lm's plain "4-bit" export: every layer affine, the experts included
        dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
        model, config = quantize_model(model, config, 64, 4)
    elif predicate is not None:
        model, config = quantize_model(model, config, 64, 8, quant_predicate=predicate)
    save_model(dst, model)
    save_config(config, dst / "config.json")
    return dst


def mlxlm_logits(path) -> np.ndarray:
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    model.set_dtype(mx.float32)
    return np.array(model(IDS))


def tensors(path) -> dict[str, tuple[str, tuple, bytes]]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        header, _ = read_header(f)
        out.update({n: (t.dtype, t.shape, t.read_bytes()) for n, t in header.items()})
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    rel = write_release(root / "release", CFG, seed=5)
    convert(rel, root / "from-release")
    mlxlm_save(rel, root / "mlxlm")
    mlxlm_save(rel, root / "mlxlm-q8", q8_predicate)
    return root


def test_mlxlm_checkpoint_converts_to_the_release_conversion_byte_for_byte(root, tmp_path):
    out = convert(root / "mlxlm", tmp_path / "out")
    assert tensors(out) == tensors(root / "from-release")
    assert json.loads((out / "config.json").read_text())["mlx_gptoss"]["source_layout"] == "mlx-lm"


def test_mxfp4_q8_checkpoint_keeps_its_storage_and_gives_mlxlm_logits(root, tmp_path):
    out = convert(root / "mlxlm-q8", tmp_path / "out")
    model = mlx_gptoss.load(out, dtype=mx.float32)
    spec = QuantSpec("affine", 8, 64)
    assert dict(model.config.quantization) == {c: spec for c in ("attention", "router", "embed_tokens", "lm_head")}
    assert relative_error(np.array(model(IDS)), mlxlm_logits(root / "mlxlm-q8")) <= BOUND
    ours, theirs, release = tensors(out), tensors(root / "mlxlm-q8"), tensors(root / "from-release")
    # affine layers copied as stored (q, k, v rows stacked), experts the released bytes
    assert ours["layers.1.mlp.router.scales"] == theirs["model.layers.1.mlp.router.scales"]
    q, k, v = (theirs[f"model.layers.2.self_attn.{p}_proj.weight"][2] for p in "qkv")
    assert ours["layers.2.self_attn.qkv.weight"][2] == q + k + v
    for name in ("gate_up.weight", "gate_up.scales", "gate_up.bias", "down.weight", "down.scales", "down.bias"):
        assert ours[f"layers.3.mlp.{name}"] == release[f"layers.3.mlp.{name}"]


def test_quantized_router_takes_a_lora_adapter(root, tmp_path):
    from mlx.utils import tree_flatten

    from mlx_gptoss.layers import QuantLinear
    from mlx_gptoss.lora.adapters import LoRASpec, apply_lora

    model = mlx_gptoss.load(convert(root / "mlxlm-q8", tmp_path / "out"), dtype=mx.float32)
    assert isinstance(model.layers[0].mlp.router, QuantLinear)
    before = np.array(model(IDS))
    apply_lora(model, LoRASpec(rank=2, alpha=4.0, targets=("router",)), seed=0)
    rng = np.random.default_rng(0)  # random B: equal rows would shift every expert's logit alike
    b = {k: mx.array(rng.normal(0, 1, v.shape).astype(np.float32)) for k, v in tree_flatten(model.trainable_parameters())
         if k.endswith("lora_b")}  # fmt: skip
    assert b and all(".mlp.router." in k for k in b)
    model.load_weights(list(b.items()), strict=False)
    assert relative_error(np.array(model(IDS)), before) > BOUND


def prefixed(src, dst):
    """src with mlx-vlm's ``language_model.`` on every tensor name and quantization path."""
    dst.mkdir()
    for f in src.glob("*.safetensors"):
        mx.save_safetensors(str(dst / f.name), {f"language_model.{k}": v for k, v in mx.load(str(f)).items()}, {"format": "mlx"})
    cfg = json.loads((src / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        cfg[key] = {(k if k in Q8 else f"language_model.{k}"): v for k, v in cfg[key].items()}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_language_model_prefix(root, tmp_path):
    out = convert(prefixed(root / "mlxlm-q8", tmp_path / "vlm"), tmp_path / "out")
    assert tensors(out) == tensors(convert(root / "mlxlm-q8", tmp_path / "plain"))


def transposed_dense(src, dst):
    """A dense fine-tune with its experts stored [E, out, in] instead of transformers' [E, in, out]."""
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        w = mx.load(str(f))
        w = {k: v.swapaxes(1, 2) if k.endswith(("gate_up_proj", "down_proj")) else v for k, v in w.items()}
        mx.save_safetensors(str(f), w, {"format": "pt"})
    return dst


def test_transposed_dense_experts(tmp_path):
    rel = write_release(tmp_path / "dense", CFG, layout="hf-dense", seed=5)
    want = tensors(convert(rel, tmp_path / "want"))
    out = convert(transposed_dense(rel, tmp_path / "t"), tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["mlx_gptoss"]["source_layout"] == "hf-dense-t"
    assert tensors(out) == want


def test_ambiguous_dense_orientation_needs_the_layout(tmp_path):
    cfg = GptOssConfig.tiny(intermediate_size=32, num_hidden_layers=2)  # hidden 64 = 2 x intermediate
    rel = write_release(tmp_path / "dense", cfg, layout="hf-dense", seed=1)
    with pytest.raises(ConversionError, match=r"gate_up_proj.*cannot tell \[E, in, out\] from \[E, out, in\].*--layout hf-dense"):
        convert(rel, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    want = tensors(convert(rel, tmp_path / "given", layout="hf-dense"))
    got = tensors(convert(transposed_dense(rel, tmp_path / "t"), tmp_path / "given-t", layout="hf-dense-t"))
    assert got == want


def edited(src, dst, edit):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


QP = "model.layers.0.self_attn.q_proj"


def _unknown_mode(cfg):
    for key in ("quantization", "quantization_config"):
        cfg[key][QP] = {**Q8, "mode": "int3"}


def _no_entry_no_default(cfg):
    # the experts stated per path, so only q_proj is left without a format
    experts = {f"model.layers.{i}.mlp.experts.{p}": {"group_size": 32, "bits": 4, "mode": "mxfp4"}
               for i in range(CFG.num_hidden_layers) for p in ("gate_proj", "up_proj", "down_proj")}  # fmt: skip
    for key in ("quantization", "quantization_config"):
        cfg[key] = {**{k: v for k, v in cfg[key].items() if k != QP and k not in Q8}, **experts}


def _entry_without_bits(cfg):
    for key in ("quantization", "quantization_config"):
        cfg[key][QP] = {"group_size": 64}


def _wrong_bits(cfg):
    for key in ("quantization", "quantization_config"):
        cfg[key][QP] = {**Q8, "bits": 4}


BAD_CONFIGS = {
    "unknown mode": (_unknown_mode, rf"{QP}: unknown mode 'int3'"),
    "missing per-path config": (_no_entry_no_default, rf"no quantization entry for {QP} and no default group_size, bits"),
    "entry without bits": (_entry_without_bits, rf"quantization.{QP} has no bits"),
    "entry that does not fit the tensors": (_wrong_bits, rf"{QP}.scales is BF16 .* does not fit the stated affine 4-bit"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_quantization_config_is_refused_by_path(case, root, tmp_path):
    edit, message = BAD_CONFIGS[case]
    with pytest.raises(ConversionError, match=message):
        convert(edited(root / "mlxlm-q8", tmp_path / "src", edit), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_half_converted_and_mixed_folders_are_refused(root, tmp_path):
    router = "model.layers.0.mlp.router"
    half = edited(root / "mlxlm", tmp_path / "half", lambda c: c["quantization"].__setitem__(router, dict(Q8)))
    with pytest.raises(
        ConversionError, match=rf"quantization.{router} says it is quantized, but the weights have no {router}.scales"
    ):
        convert(half, tmp_path / "out")
    mixed = edited(root / "mlxlm", tmp_path / "mixed", lambda c: None)
    shutil.copy(next((root / "release").glob("*.safetensors")), mixed / "model-extra.safetensors")
    with pytest.raises(ConversionError, match=r"model-extra.safetensors is not listed in model.safetensors.index.json"):
        convert(mixed, tmp_path / "out")
    (mixed / "model.safetensors.index.json").unlink()
    released = {k: v for f in (root / "release").glob("*.safetensors") for k, v in mx.load(str(f)).items() if "experts" in k}
    mx.save_safetensors(str(mixed / "model-extra.safetensors"), released)  # only the names mlx-lm's files lack
    with pytest.raises(ConversionError, match=r"tensors of several layouts in one folder .*hf: .*mlx-lm: "):
        convert(mixed, tmp_path / "out")
    with pytest.raises(ConversionError, match="already an mlx-gptoss conversion"):
        convert(root / "from-release", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_stored_layers_are_not_requantized(root, tmp_path):
    with pytest.raises(
        ConversionError, match=r"attention is stored 8-bit \(groups of 64\) in the source; .* will not re-quantize it to 4-bit"
    ):
        convert(root / "mlxlm-q8", tmp_path / "out", quantization={"attention": QuantSpec("affine", 4, 64)})
    with pytest.raises(ConversionError, match="will not re-quantize it to float"):
        convert(root / "mlxlm-q8", tmp_path / "out", quantization={"lm_head": None})
    assert not (tmp_path / "out").exists()


def test_affine_experts_and_uneven_layers_are_refused(root, tmp_path):
    four_bit = mlxlm_save(root / "release", tmp_path / "4bit", dequantize=True)
    with pytest.raises(
        ConversionError, match=r"experts model.layers.0.mlp.experts.gate_proj are stored affine 4-bit .*MXFP4 experts only"
    ):
        convert(four_bit, tmp_path / "out")

    def uneven(path, module):
        return {**Q8, "bits": 4} if path == "model.layers.1.self_attn.k_proj" else q8_predicate(path, module)

    mixed = mlxlm_save(root / "release", tmp_path / "uneven", uneven)
    with pytest.raises(
        ConversionError, match=r"q_proj is stored affine 8-bit .* but model.layers.1.self_attn.k_proj affine 4-bit"
    ):
        convert(mixed, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_converts_an_mlxlm_folder(root, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mlx_gptoss.cli", "convert", str(root / "mlxlm-q8"), str(tmp_path / "out")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]["router"] == Q8


def test_quantized_router_streams_under_a_memory_budget(root, tmp_path):
    from mlx_gptoss.memory import budget_for_slots, read_tensors

    out = convert(root / "mlxlm-q8", tmp_path / "out")
    base = mlx_gptoss.load(out, dtype=mx.float32)
    budget = budget_for_slots(base.config, read_tensors(out), 4, context=512, float_bytes=4)
    small = mlx_gptoss.load(out, dtype=mx.float32, memory_budget=budget, context=512)
    assert small.memory_plan.expert_slots == 4
    np.testing.assert_array_equal(np.array(small(IDS)), np.array(base(IDS)))


def test_dense_mlxlm_experts_are_refused_by_name(root, tmp_path):
    from mlx_lm.utils import dequantize_model, load_model, save_config, save_model

    model, config = load_model(root / "release")
    dequantize_model(model)
    config.pop("quantization"), config.pop("quantization_config")
    save_model(tmp_path / "dense", model)
    save_config(config, tmp_path / "dense" / "config.json")
    with pytest.raises(
        ConversionError, match=r"experts model.layers.0.mlp.experts.gate_proj are stored dense \(float\) in mlx-lm's layout"
    ):
        convert(tmp_path / "dense", tmp_path / "out")
    assert not (tmp_path / "out").exists()
