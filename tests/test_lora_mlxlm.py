"""mlx-lm adapter folders read into ours, and ours written for mlx-lm, against mlx-lm's own LoRA on the
same tiny release (float32).

mlx-lm rounds YaRN's correction range and the release does not (see tests/test_parity.py), so the
logits of the two engines differ past position 0 for the usual rope scaling. Here the release uses
YaRN factor 1: the correction range then changes nothing (interpolated and extrapolated
frequencies coincide), and both engines must agree at every position, base and adapted.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import mlx_gptoss
from mlx_gptoss.config import GptOssConfig, YarnScaling
from mlx_gptoss.lora.adapters import LoRAError, LoRASpec, apply_lora, lora_parameters, remove_lora, set_lora_parameters
from mlx_gptoss.lora.formats import detect_adapter_format, read_adapter
from mlx_gptoss.testing import write_release
from mlx_gptoss_convert import convert

pytest.importorskip("mlx_lm")
from test_parity import BOUND, relative_error  # noqa: E402  (the parity test's measure and bound)

CFG = GptOssConfig.tiny(rope_scaling=YarnScaling(factor=1.0))
IDS = mx.array(np.random.default_rng(6).integers(0, CFG.vocab_size, (2, 2 * CFG.sliding_window)))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlxlm")
    rel = write_release(root / "release", CFG, seed=4)
    return rel, convert(rel, root / "converted")


def mlxlm_model(rel):
    """mlx-lm's gpt_oss on the release, as mlx-lm loads it, its float weights made float32."""
    from mlx_lm.utils import load_model

    model, _ = load_model(rel)
    model.set_dtype(mx.float32)
    return model


def mlxlm_adapter(rel, dst, num_layers, lora_parameters):
    """Train-ready mlx-lm LoRA with random A and B, saved as mlx-lm's lora command saves it; its logits."""
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import save_config

    model = mlxlm_model(rel)
    model.freeze()
    linear_to_lora_layers(model, num_layers, lora_parameters)
    rng = np.random.default_rng(7)
    model.update(tree_unflatten([(k, mx.array(rng.normal(0, 0.1, v.shape).astype(np.float32)))
                                 for k, v in tree_flatten(model.trainable_parameters())]))  # fmt: skip
    dst.mkdir()
    mx.save_safetensors(str(dst / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    save_config({"model": str(rel), "fine_tune_type": "lora", "num_layers": num_layers,
                 "lora_parameters": lora_parameters}, dst / "adapter_config.json")  # fmt: skip
    return np.array(model(IDS))


@pytest.fixture(scope="module")
def base(release):
    model = mlx_gptoss.load(release[1], dtype=mx.float32)
    return model, np.array(model(IDS))


def test_the_engines_agree_without_adapters(release, base):
    assert relative_error(base[1], np.array(mlxlm_model(release[0])(IDS))) <= BOUND


CASES = {
    # mlx-lm's defaults on gpt_oss: every linear of the last layers (gate and up each with their A: rank 2r here)
    "all keys, last 2 layers": (2, {"rank": 4, "scale": 2.0, "dropout": 0.0}, 8, (2, 3)),
    "q and up only, all layers": (-1, {"rank": 4, "scale": 3.5, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.experts.up_proj"]}, 4, None),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_mlxlm_adapter_gives_mlxlm_logits(case, release, base, tmp_path):
    from mlx_lm.tuner.utils import load_adapters

    num_layers, params, rank, layers = CASES[case]
    ref = mlxlm_adapter(release[0], tmp_path / "adapter", num_layers, params)
    # the folder is what mlx-lm itself reads back
    assert relative_error(np.array(load_adapters(mlxlm_model(release[0]), str(tmp_path / "adapter"))(IDS)), ref) <= 1e-6
    assert detect_adapter_format(tmp_path / "adapter") == "mlx-lm"
    model, plain = base
    remove_lora(model)
    spec, flat = read_adapter(tmp_path / "adapter", model)
    assert (spec.rank, spec.layers, spec.scale) == (rank, layers, pytest.approx(params["scale"]))
    apply_lora(model, spec)
    set_lora_parameters(model, flat)
    got = np.array(model(IDS))
    assert relative_error(plain, ref) > 1e-2  # the adapter changes the logits
    assert relative_error(got, ref) <= BOUND


def test_gate_up_pair_is_block_diagonal(release, base, tmp_path):
    """gate j's update reads only A_gate, up j's only A_up: rows 2j / 2j+1 of one rank-2r pair."""
    mlxlm_adapter(release[0], tmp_path / "a", 1, {"rank": 2, "scale": 1.0, "dropout": 0.0})
    src = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    _, flat = read_adapter(tmp_path / "a", base[0])
    e = "layers.3.mlp.experts_lora.gate_up"
    a, b = np.array(flat[f"{e}.lora_a"]), np.array(flat[f"{e}.lora_b"])
    g, u = "model.layers.3.mlp.experts.gate_proj", "model.layers.3.mlp.experts.up_proj"
    np.testing.assert_array_equal(a, np.concatenate([np.array(src[f"{g}.lora_a"]), np.array(src[f"{u}.lora_a"])], axis=1))
    np.testing.assert_array_equal(b[:, 0::2, :2], np.array(src[f"{g}.lora_b"]))
    np.testing.assert_array_equal(b[:, 1::2, 2:], np.array(src[f"{u}.lora_b"]))
    assert not b[:, 0::2, 2:].any() and not b[:, 1::2, :2].any()


@pytest.mark.parametrize("change, message", [
    ({"fine_tune_type": "dora"}, "'fine_tune_type' is 'dora'"),
    ({"lora_parameters": {"rank": 4, "alpha": 8}}, "'lora_parameters' must hold numbers 'rank' and 'scale'"),
    ({"lora_parameters": {"rank": 3, "scale": 2.0}}, "has rank 4 but adapter_config.json gives rank 3"),
])  # fmt: skip
def test_unsupported_mlxlm_config_is_refused(change, message, release, base, tmp_path):
    mlxlm_adapter(release[0], tmp_path / "a", 1, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(LoRAError, match=message):
        read_adapter(tmp_path / "a", base[0])


def test_mlxlm_adapter_for_another_model_is_refused(release, base, tmp_path):
    mlxlm_adapter(release[0], tmp_path / "a", 1, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    weights = tmp_path / "a" / "adapters.safetensors"
    tensors = mx.load(str(weights))
    mx.eval(tensors)  # read before the file is overwritten
    mx.save_safetensors(str(weights), {**tensors, "model.layers.3.self_attn.o_proj.lora_a": mx.zeros((96, 4))})
    with pytest.raises(
        LoRAError, match=r"adapters.safetensors: model.layers.3.self_attn.o_proj: .*expected \[128, r\] and \[r, 64\]"
    ):
        read_adapter(tmp_path / "a", base[0])


@pytest.mark.parametrize("layers", [None, (2, 3), (0, 2)], ids=["all", "last2", "0,2"])
def test_our_adapter_written_for_mlxlm_gives_our_logits_in_mlxlm(layers, release, base, tmp_path):
    """export_mlxlm's folder, read by mlx-lm's own load_adapters, computes what our model computes;
    read back by us it is the same adapter (gate and up share our A, so the rank stays r)."""
    from mlx_lm.tuner.utils import load_adapters

    from mlx_gptoss.lora.formats import export_mlxlm

    model, plain = base
    remove_lora(model)
    spec = LoRASpec(rank=3, alpha=5.0, targets=("attention", "router", "experts"), layers=layers, rslora=True)
    apply_lora(model, spec, seed=0)
    rng = np.random.default_rng(8)
    set_lora_parameters(
        model, {k: mx.array(rng.normal(0, 0.1, v.shape).astype(np.float32)) for k, v in lora_parameters(model).items()}
    )
    ours = np.array(model(IDS))
    dst = export_mlxlm(model, tmp_path / "mlxlm", spec=spec)
    assert detect_adapter_format(dst) == "mlx-lm"
    theirs = np.array(load_adapters(mlxlm_model(release[0]), str(dst))(IDS))
    assert relative_error(plain, ours) > 1e-2  # the adapter changes the logits
    assert relative_error(theirs, ours) <= BOUND
    spec2, flat2 = read_adapter(dst, model)
    assert (spec2.rank, spec2.layers, spec2.targets, spec2.scale) == (3, layers, spec.targets, pytest.approx(spec.scale))
    for k, v in lora_parameters(model).items():
        np.testing.assert_array_equal(np.array(flat2[k]), np.array(v), err_msg=k)
    remove_lora(model)
