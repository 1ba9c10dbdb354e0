"""The converter: every released layout gives the same model, experts stay bit-exact, bad input
gives a clear error and leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY
from helpers import fail_write_at, leftovers

from mlx_gptoss.safetensors_io import read_header
from mlx_gptoss.testing import write_release
from mlx_gptoss_convert import ConversionError, convert


def tensors(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        for name, info in read_header(f)[0].items():
            out[name] = np.frombuffer(info.read_bytes(), dtype=np.uint8)
    return out


@pytest.fixture(scope="module")
def converted(releases, tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    return {lay: convert(src, root / lay) for lay, src in releases.items()}


def test_hf_and_original_layouts_give_identical_bytes(converted):
    a, b = tensors(converted["hf"]), tensors(converted["original"])
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_experts_are_the_released_bytes(releases, converted):
    src = {}
    for f in releases["hf"].glob("*.safetensors"):
        src.update(read_header(f)[0])
    ours = tensors(converted["hf"])
    for i in range(TINY.num_hidden_layers):
        for proj, ours_name in (("gate_up_proj", "gate_up"), ("down_proj", "down")):
            base = f"model.layers.{i}.mlp.experts.{proj}"
            assert ours[f"layers.{i}.mlp.{ours_name}.weight"].tobytes() == src[base + "_blocks"].read_bytes()
            assert ours[f"layers.{i}.mlp.{ours_name}.scales"].tobytes() == src[base + "_scales"].read_bytes()


def test_dense_experts_quantize_to_the_same_model(converted):
    """Dense exports hold exact MXFP4 values: requantized, they dequantize to the same weights."""
    hf, dense = (
        mx.load(str(next(converted["hf"].glob("*.safetensors")))),
        mx.load(str(next(converted["hf-dense"].glob("*.safetensors")))),
    )
    assert hf.keys() == dense.keys()
    for k in hf:
        if k.endswith((".weight", ".scales")) and (".mlp.gate_up." in k or ".mlp.down." in k):
            continue  # compared dequantized below
        assert mx.array_equal(hf[k], dense[k]), k
    for i in range(TINY.num_hidden_layers):
        for p in ("gate_up", "down"):
            w = [mx.dequantize(d[f"layers.{i}.mlp.{p}.weight"], d[f"layers.{i}.mlp.{p}.scales"], group_size=32, bits=4,
                               mode="mxfp4", dtype=mx.float32) for d in (hf, dense)]  # fmt: skip
            assert mx.array_equal(w[0], w[1]), (i, p)


def test_output_is_readable_by_the_safetensors_library(converted):
    """An independent reader agrees with our streaming writer, byte for byte."""
    from safetensors import safe_open

    f = next(converted["hf"].glob("*.safetensors"))
    ours = read_header(f)[0]
    with safe_open(str(f), framework="np") as st:
        assert set(st.keys()) == set(ours)
        for k in st.keys():
            if ours[k].dtype != "BF16":  # numpy has no bfloat16
                assert st.get_tensor(k).tobytes() == ours[k].read_bytes(), k


def test_config_and_index(converted):
    cfg = json.loads((converted["hf"] / "config.json").read_text())
    assert cfg["mlx_gptoss"]["format_version"] == 1 and cfg["mlx_gptoss"]["source_layout"] == "hf"
    assert cfg["rope_scaling"]["truncate"] is False
    index = json.loads((converted["hf"] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors(converted["hf"]))


def test_tokenizer_files_and_harmony_vocab(vocab_model_dir):
    assert (vocab_model_dir / "tokenizer.json").is_file()
    assert (vocab_model_dir / "o200k_base.tiktoken").is_file()


def test_sharding(releases, tmp_path):
    out = convert(releases["hf"], tmp_path / "sharded", shard_bytes=100_000)
    assert len(list(out.glob("*.safetensors"))) > 3
    assert tensors(out).keys() == tensors(convert(releases["hf"], tmp_path / "one")).keys()


# -- bad input ---------------------------------------------------------------------------------


def copy_release(releases, tmp_path, layout="hf") -> Path:
    dst = tmp_path / "src"
    shutil.copytree(releases[layout], dst)
    return dst


def expect_error(src: Path, tmp_path: Path, *needles: str, **kw) -> None:
    dst = tmp_path / "out"
    with pytest.raises(ConversionError) as e:
        convert(src, dst, **kw)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    assert not dst.exists()
    assert leftovers(tmp_path) == []


def test_missing_shard(releases, tmp_path):
    src = tmp_path / "src"
    write_release(src, TINY, seed=0, shard_bytes=200_000)
    victim = sorted(src.glob("*.safetensors"))[1]
    victim.unlink()
    expect_error(src, tmp_path, victim.name, "missing shard")


def test_truncated_file(releases, tmp_path):
    src = copy_release(releases, tmp_path)
    f = next(src.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    expect_error(src, tmp_path, f.name, "truncated")


def test_truncated_header(releases, tmp_path):
    src = copy_release(releases, tmp_path)
    f = next(src.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:100])
    expect_error(src, tmp_path, f.name, "truncated")


def test_wrong_shape(releases, tmp_path):
    src = copy_release(releases, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (src / "config.json").write_text(json.dumps(cfg))
    expect_error(src, tmp_path, "model.layers.0.mlp.experts.gate_up_proj_blocks", "[8, 192, 2, 16]", "[8, 128, 2, 16]")


def test_unknown_model_type(releases, tmp_path):
    src = copy_release(releases, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    expect_error(src, tmp_path, "model_type 'llama'", "config.json")


def test_missing_config_key(releases, tmp_path):
    src = copy_release(releases, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["hidden_size"]
    (src / "config.json").write_text(json.dumps(cfg))
    expect_error(src, tmp_path, "hidden_size")


def test_config_with_fewer_layers_than_the_weights(releases, tmp_path):
    src = copy_release(releases, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    cfg["layer_types"] = cfg["layer_types"][:2]
    (src / "config.json").write_text(json.dumps(cfg))
    expect_error(src, tmp_path, "model.layers.2.", "num_hidden_layers")


def test_missing_tensor_original_layout(releases, tmp_path):
    from mlx_gptoss.safetensors_io import SafetensorsWriter

    src = copy_release(releases, tmp_path, "original")
    f = src / "original" / "model.safetensors"
    header = read_header(f)[0]
    keep = [h for n, h in header.items() if n != "block.1.attn.sinks"]
    tmp = f.with_suffix(".new")
    with SafetensorsWriter(tmp, [(h.name, h.dtype, h.shape) for h in keep]) as w:
        for h in keep:
            w.write(h.name, h.read_bytes())
    tmp.replace(f)
    expect_error(src, tmp_path, "block.1.attn.sinks", "not found")


def test_existing_destination_needs_force(releases, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists"):
        convert(releases["hf"], dst)
    assert (dst / "keep.txt").read_text() == "mine"
    # --force replaces only an earlier conversion (tests/test_convert_safety.py has the details)
    (dst / "keep.txt").unlink()
    convert(releases["hf"], dst, force=True)  # an empty folder
    convert(releases["hf"], dst, force=True)  # an earlier conversion
    assert (dst / "config.json").is_file()
    assert leftovers(tmp_path) == []


def test_failure_midway_leaves_nothing(releases, tmp_path, monkeypatch):
    """An error after writing has started removes the partial output."""
    fail_write_at(monkeypatch, 20)
    with pytest.raises(OSError, match="disk full"):
        convert(releases["hf"], tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
