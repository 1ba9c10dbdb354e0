"""Export: release -> ours -> hf is the release, byte for byte; ours -> mlx-lm loads and generates in
mlx-lm, and reads back into ours byte for byte; quantized layers are refused for hf (or dequantized
when asked); the destination is as safe as convert's.

The release here uses YaRN factor 1 (as tests/test_lora_mlxlm.py does): mlx-lm rounds YaRN's
correction range and the release does not (tests/test_parity.py), which changes nothing when the
interpolated and extrapolated frequencies coincide, so the two engines must agree at every position.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_gptoss
from mlx_gptoss.config import GptOssConfig, QuantSpec, YarnScaling
from mlx_gptoss.safetensors_io import read_header
from mlx_gptoss.testing import write_release
from mlx_gptoss_convert import ConversionError, convert
from mlx_gptoss_convert.export import MARKER, export

pytest.importorskip("mlx_lm")
from helpers import fail_write_at, leftovers  # noqa: E402
from test_parity import BOUND, relative_error  # noqa: E402  (the parity test's measure and bound)

CFG = GptOssConfig.tiny(rope_scaling=YarnScaling(factor=1.0))
Q8 = {"attention": QuantSpec(), "lm_head": QuantSpec(), "embed_tokens": QuantSpec()}
IDS = mx.array(np.random.default_rng(8).integers(0, CFG.vocab_size, (1, 2 * CFG.sliding_window)))


def tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...], bytes, str]]:
    """name -> (dtype, shape, bytes, file name) of every tensor in a folder."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        for name, info in read_header(f)[0].items():
            out[name] = (info.dtype, info.shape, info.read_bytes(), f.name)
    return out


def by_file(t: dict) -> set[frozenset[str]]:
    """The sets of tensor names held together in one file."""
    return {frozenset(n for n in t if t[n][3] == f) for f in {v[3] for v in t.values()}}


@pytest.fixture(scope="module")
def models(tokenizer_json, tmp_path_factory):
    """The release, ours converted from it (float, and 8-bit attention/embedding/lm_head), and their exports."""
    root = tmp_path_factory.mktemp("export")
    rel = write_release(root / "release", CFG, seed=5, tokenizer=tokenizer_json)
    ours, q8 = convert(rel, root / "ours"), convert(rel, root / "q8", quantization=Q8)
    return {
        "release": rel, "ours": ours, "q8": q8,
        "hf": export(ours, root / "hf", fmt="hf"),
        "mlx-lm": export(ours, root / "mlx-lm", fmt="mlx-lm"),
        "q8-mlx-lm": export(q8, root / "q8-mlx-lm", fmt="mlx-lm"),
    }  # fmt: skip


# -- hf: the release, byte for byte ------------------------------------------------------------


def test_hf_export_is_the_release(models):
    rel, out = tensors(models["release"]), tensors(models["hf"])
    assert rel.keys() == out.keys()
    for k in rel:
        assert rel[k][:3] == out[k][:3], k  # dtype, shape, bytes
    # the same tensors per file (one file here; the release names its files model-00000-of-0000N, N the last
    # index, where the synthetic release writes N files), and the index lists them all
    assert by_file(rel) == by_file(out)
    index = json.loads((models["hf"] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(rel)
    load = lambda d, f: json.loads((d / f).read_text())  # noqa: E731
    assert load(models["hf"], "config.json") == load(models["release"], "config.json")
    for f in ("tokenizer.json", "generation_config.json"):
        assert (models["hf"] / f).read_bytes() == (models["release"] / f).read_bytes(), f


def test_hf_file_is_what_safetensors_writes_for_the_release(models):
    """The whole file, header included, is the safetensors library's (which wrote the release) for the same tensors."""
    st = pytest.importorskip("safetensors.torch")
    ref = models["hf"].parent / "ref.safetensors"
    st.save_file(st.load_file(next(models["release"].glob("*.safetensors"))), ref, metadata={"format": "pt"})
    assert next(models["hf"].glob("*.safetensors")).read_bytes() == ref.read_bytes()


def test_hf_refuses_quantized_layers(models, tmp_path):
    with pytest.raises(ConversionError) as e:
        export(models["q8"], tmp_path / "out", fmt="hf")
    for needle in ("attention (8-bit", "lm_head", "embed_tokens", "--dequantize", "--format mlx-lm"):
        assert needle in str(e.value), needle
    assert list(tmp_path.iterdir()) == []


def test_hf_dequantize_writes_bf16_of_our_quantized_weights(models, tmp_path):
    out = export(models["q8"], tmp_path / "out", fmt="hf", dequantize=True)
    got, rel = tensors(out), tensors(models["release"])
    assert got.keys() == rel.keys() and all(got[k][:2] == rel[k][:2] for k in rel)  # release names, dtypes, shapes
    ours = mx.load(str(next(models["q8"].glob("*.safetensors"))))
    q = {k: ours[f"layers.0.self_attn.qkv.{k}"] for k in ("weight", "scales", "biases")}
    qkv = mx.dequantize(q["weight"], q["scales"], q["biases"], group_size=64, bits=8)
    k_proj = np.frombuffer(got["model.layers.0.self_attn.k_proj.weight"][2], np.uint16).reshape(-1, CFG.hidden_size)
    Q, KV = CFG.num_attention_heads * CFG.head_dim, CFG.num_key_value_heads * CFG.head_dim
    np.testing.assert_array_equal(k_proj, np.array(qkv[Q : Q + KV].view(mx.uint16)))
    # the experts are still the release's bytes
    e = "model.layers.1.mlp.experts.gate_up_proj_blocks"
    assert got[e][:3] == rel[e][:3]
    assert "attention dequantized to bf16" in json.loads((out / MARKER).read_text())["notes"][0]


# -- mlx-lm: loads, generates, agrees, reads back ----------------------------------------------


def test_mlx_lm_loads_and_generates(models):
    from mlx_lm import generate, load

    model, tokenizer = load(str(models["mlx-lm"]))
    text = generate(model, tokenizer, "Hello", max_tokens=4)
    assert isinstance(text, str)
    assert len(tokenizer.encode(text, add_special_tokens=False)) >= 1


@pytest.mark.parametrize("which", ["ours", "q8"])
def test_mlx_lm_logits_equal_ours(models, which):
    from mlx_lm.utils import load_model

    theirs, _ = load_model(models["mlx-lm" if which == "ours" else "q8-mlx-lm"])
    ref = mlx_gptoss.load(models[which], dtype=mx.float32)
    if which == "q8":  # held quantized by mlx-lm too: nothing was dequantized or re-quantized on the way
        attn = theirs.model.layers[0].self_attn.q_proj
        assert (type(attn).__name__, attn.bits, attn.group_size) == ("QuantizedLinear", 8, 64)
    theirs.set_dtype(mx.float32)
    assert relative_error(np.array(theirs(IDS)), np.array(ref(IDS))) <= BOUND


def test_mlx_lm_keeps_the_experts_bit_exact(models):
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    model, _ = load_model(models["mlx-lm"])
    loaded = dict(tree_flatten(model.parameters()))
    ours = mx.load(str(next(models["ours"].glob("*.safetensors"))))
    e = "model.layers.2.mlp.experts."
    gate_up = ours["layers.2.mlp.gate_up.weight"]
    assert mx.array_equal(loaded[e + "gate_proj.weight"], gate_up[:, 0::2]) and loaded[e + "gate_proj.weight"].dtype == mx.uint32
    assert mx.array_equal(loaded[e + "up_proj.weight"], gate_up[:, 1::2])
    assert mx.array_equal(loaded[e + "up_proj.scales"], ours["layers.2.mlp.gate_up.scales"][:, 1::2])
    assert mx.array_equal(loaded[e + "down_proj.weight"], ours["layers.2.mlp.down.weight"])


@pytest.mark.parametrize("which", ["ours", "q8"])
def test_ours_to_mlx_lm_to_ours_is_byte_identical(models, which, tmp_path):
    back = convert(models["mlx-lm" if which == "ours" else "q8-mlx-lm"], tmp_path / "back")
    a, b = tensors(models[which]), tensors(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][:3] == b[k][:3], k
    cfg = lambda d: json.loads((d / "config.json").read_text())["quantization"]  # noqa: E731
    assert cfg(back) == cfg(models[which])


def test_mlx_lm_config_names_each_quantized_path(models):
    q = json.loads((models["q8-mlx-lm"] / "config.json").read_text())["quantization"]
    assert {k: q[k] for k in ("group_size", "bits", "mode")} == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    want = {"group_size": 64, "bits": 8, "mode": "affine"}
    for i in range(CFG.num_hidden_layers):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert q[f"model.layers.{i}.self_attn.{p}"] == want
    assert q["lm_head"] == q["model.embed_tokens"] == want
    assert "model.layers.0.mlp.router" not in q  # held in bf16


# -- destination safety ------------------------------------------------------------------------


def test_existing_destination_needs_force_and_force_replaces_only_ours(models, tmp_path):
    dst = tmp_path / "out"
    export(models["ours"], dst, fmt="mlx-lm")
    with pytest.raises(ConversionError, match="already exists"):
        export(models["ours"], dst, fmt="hf")
    export(models["ours"], dst, fmt="hf", force=True)  # an earlier export
    assert json.loads((dst / MARKER).read_text())["format"] == "hf"
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match="notes.txt"):
        export(models["ours"], dst, fmt="hf", force=True)
    assert (dst / "notes.txt").read_text() == "mine"
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(ConversionError, match="not an mlx-gptoss conversion"):
        export(models["ours"], other, fmt="hf", force=True)
    assert leftovers(tmp_path) == []


def test_destination_inside_the_model_is_refused(models):
    with pytest.raises(ConversionError, match="destroy the source"):
        export(models["ours"], models["ours"] / "hf", fmt="hf")
    assert not (models["ours"] / "hf").exists()


def test_not_a_converted_model_is_refused(models, tmp_path):
    with pytest.raises(ConversionError, match="released checkpoint, not a converted one"):
        export(models["release"], tmp_path / "out", fmt="hf")
    assert list(tmp_path.iterdir()) == []


def test_missing_tensor_is_named(models, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(models["ours"], src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    (src / "model.safetensors.index.json").unlink()
    f = src / next(iter(set(index["weight_map"].values())))
    from mlx_gptoss.safetensors_io import SafetensorsWriter

    keep = [h for n, h in read_header(f)[0].items() if n != "layers.1.self_attn.sinks"]
    with SafetensorsWriter(f.with_suffix(".new"), [(h.name, h.dtype, h.shape) for h in keep]) as w:
        for h in keep:
            w.write(h.name, h.read_bytes())
    f.with_suffix(".new").replace(f)
    with pytest.raises(ConversionError, match="missing tensor.*layers.1.self_attn.sinks"):
        export(src, tmp_path / "out", fmt="mlx-lm")
    assert not (tmp_path / "out").exists()


def test_failure_midway_leaves_nothing(models, tmp_path, monkeypatch):
    fail_write_at(monkeypatch, 20)
    with pytest.raises(OSError, match="disk full"):
        export(models["ours"], tmp_path / "out", fmt="hf")
    assert list(tmp_path.iterdir()) == []


# -- the command -------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_gptoss.cli", "export", *args], capture_output=True, text=True)


def test_cli_exports_and_refuses_clearly(models, tmp_path):
    r = run_cli(str(models["ours"]), str(tmp_path / "hf"), "--format", "hf")
    assert r.returncode == 0, r.stderr
    assert tensors(tmp_path / "hf").keys() == tensors(models["release"]).keys()
    r = run_cli(str(models["q8"]), str(tmp_path / "q"), "--format", "hf")
    assert r.returncode == 1 and "--dequantize" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "q").exists()
    r = run_cli(str(models["q8"]), str(tmp_path / "q"), "--format", "hf", "--dequantize")
    assert r.returncode == 0 and "dequantized to bf16" in r.stderr
