"""Loading: lazy, strict about names/shapes, clear about what is wrong."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

import mlx_gptoss
from mlx_gptoss.loader import LoadError
from mlx_gptoss.safetensors_io import SafetensorsWriter, read_header


def test_load_is_lazy_and_uses_the_requested_dtype(tiny_model_dir):
    mx.clear_cache()
    before = mx.get_active_memory()
    model = mlx_gptoss.load(tiny_model_dir)
    assert mx.get_active_memory() - before < 1000  # nothing read yet
    assert model.embed_tokens.weight.dtype == mx.bfloat16
    assert model.layers[0].mlp.gate_up.weight.dtype == mx.uint32
    assert model.config.num_hidden_layers == 4
    f32 = mlx_gptoss.load(tiny_model_dir, dtype=mx.float32)
    assert f32.layers[1].self_attn.sinks.dtype == mx.float32
    logits = f32(mx.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, f32.config.vocab_size) and logits.dtype == mx.float32


def test_bf16_default_is_close_to_float32(tiny_model_dir):
    ids = mx.array([[5, 17, 3, 99, 250, 7, 1, 2]])
    a = mlx_gptoss.load(tiny_model_dir)(ids).astype(mx.float32)
    b = mlx_gptoss.load(tiny_model_dir, dtype=mx.float32)(ids)
    assert (mx.abs(a - b).max() / mx.abs(b).max()).item() < 0.05


def copy_model(src, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    return dst


def rewrite(f, drop=None, reshape=None):
    """Rewrite a shard without tensor ``drop`` / with zeros of another shape for ``reshape`` entries."""
    from mlx_gptoss.safetensors_io import DTYPE_SIZE

    reshape = reshape or {}
    keep = [h for n, h in read_header(f)[0].items() if n != drop]
    shapes = {h.name: reshape.get(h.name, h.shape) for h in keep}
    with SafetensorsWriter(f.with_suffix(".new"), [(h.name, h.dtype, shapes[h.name]) for h in keep]) as w:
        for h in keep:
            n = DTYPE_SIZE[h.dtype] * int(np.prod(shapes[h.name]))
            w.write(h.name, h.read_bytes() if h.name not in reshape else bytes(n))
    f.with_suffix(".new").replace(f)


def test_missing_tensor(tiny_model_dir, tmp_path):
    m = copy_model(tiny_model_dir, tmp_path)
    rewrite(next(m.glob("*.safetensors")), drop="layers.2.self_attn.sinks")
    with pytest.raises(LoadError, match=r"missing tensor\(s\) layers\.2\.self_attn\.sinks"):
        mlx_gptoss.load(m)


def test_wrong_shape(tiny_model_dir, tmp_path):
    m = copy_model(tiny_model_dir, tmp_path)
    f = next(m.glob("*.safetensors"))
    rewrite(f, reshape={"norm.weight": (32,)})
    with pytest.raises(LoadError) as e:
        mlx_gptoss.load(m)
    assert f.name in str(e.value) and "'norm.weight'" in str(e.value) and "[32]" in str(e.value) and "[64]" in str(e.value)


def test_truncated_shard(tiny_model_dir, tmp_path):
    m = copy_model(tiny_model_dir, tmp_path)
    f = next(m.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(LoadError, match="truncated"):
        mlx_gptoss.load(m)


def test_released_checkpoint_is_refused_with_advice(releases):
    with pytest.raises(LoadError, match="convert it first"):
        mlx_gptoss.load(releases["hf"])


def test_future_format_version(tiny_model_dir, tmp_path):
    m = copy_model(tiny_model_dir, tmp_path)
    cfg = json.loads((m / "config.json").read_text())
    cfg["mlx_gptoss"]["format_version"] = 99
    (m / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="format version 99"):
        mlx_gptoss.load(m)


def test_not_a_folder_nor_a_repo_id():
    with pytest.raises(LoadError, match="not a Hugging Face repo id"):
        mlx_gptoss.load("/no/such/model/here")


def test_repo_id_without_network_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_GPTOSS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from mlx_gptoss_convert import ConversionError

    with pytest.raises(ConversionError, match="cannot download openai/gpt-oss-20b"):
        mlx_gptoss.load("openai/gpt-oss-20b")
    assert not (tmp_path / "cache" / "models" / "openai--gpt-oss-20b").exists()
