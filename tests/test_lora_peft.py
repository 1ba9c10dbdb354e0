"""PEFT adapters in and out, against transformers + PEFT on the same tiny checkpoint (float32).

The reference is the one of tests/test_parity.py: transformers' GptOssForCausalLM from the
released HF layout, experts dequantized by transformers, eager attention.
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_gptoss
from mlx_gptoss.config import GptOssConfig
from mlx_gptoss.lora.adapters import LoRAError, LoRASpec, apply_lora, lora_parameters, set_lora_parameters
from mlx_gptoss.lora.formats import detect_adapter_format, export_peft, from_peft, read_adapter

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from test_parity import BOUND, relative_error  # noqa: E402  (the parity test's measure and bound)

CFG = GptOssConfig.tiny()
IDS = np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 2 * CFG.sliding_window))
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def hf_model(release):
    """A fresh transformers model (PEFT wraps its modules in place)."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    return GptOssForCausalLM.from_pretrained(
        release, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32, attn_implementation="eager"
    ).eval()


def peft_model(release, seed=0, **config):
    """transformers + PEFT with random, non-zero A and B."""
    pm = peft.get_peft_model(hf_model(release), peft.LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return pm


def hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    """Our tiny model (float32) and its logits without adapters."""
    model = mlx_gptoss.load(tiny_model_dir, dtype=mx.float32)
    return model, np.array(model(mx.array(IDS)))


def ours_with(model, folder) -> np.ndarray:
    from mlx_gptoss.lora.adapters import remove_lora

    remove_lora(model)
    spec, flat = read_adapter(folder, model)
    apply_lora(model, spec)
    set_lora_parameters(model, flat, source=str(folder))
    return np.array(model(mx.array(IDS)))


CASES = {
    "attention+experts": dict(r=4, lora_alpha=8, target_modules=ATTN, target_parameters=EXPERTS),
    "router, rsLoRA": dict(r=4, lora_alpha=3, use_rslora=True, target_modules=ATTN,
                           target_parameters=EXPERTS + ["mlp.router.weight"]),
    # per-module rank and alpha (folded into B), some modules and layers left out (zero adapters)
    "rank/alpha patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                                target_parameters=["mlp.experts.down_proj"], layers_to_transform=[1, 2],
                                rank_pattern={"layers.1.self_attn.q_proj": 2, "mlp.experts.down_proj": 6},
                                alpha_pattern={"o_proj": 3, "layers.2.mlp.experts.down_proj": 5}),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_gives_transformers_peft_logits(case, releases, base, tmp_path):
    pm = peft_model(releases["hf"], **CASES[case])
    pm.save_pretrained(tmp_path)
    assert detect_adapter_format(tmp_path) == "peft"
    ref = hf_logits(pm)
    model, plain = base
    got = ours_with(model, tmp_path)
    assert relative_error(plain, ref) > 1e-2  # the adapter changes the logits
    assert relative_error(got, ref) <= BOUND


def test_rank_pattern_spec_is_the_largest_rank(releases, base, tmp_path):
    peft_model(releases["hf"], **CASES["rank/alpha patterns"]).save_pretrained(tmp_path)
    spec, flat = read_adapter(tmp_path, base[0])
    # PEFT applies layers_to_transform to target_modules only: experts are adapted in every layer
    assert (spec.rank, spec.alpha, spec.layers, spec.targets) == (6, 8.0, None, ("attention", "experts"))
    assert np.array(flat["layers.0.mlp.experts_lora.down.lora_b"]).any()
    for k in ("layers.0.self_attn.q_proj.lora_b", "layers.1.self_attn.k_proj.lora_b", "layers.1.mlp.experts_lora.gate_up.lora_b"):
        assert not np.array(flat[k]).any(), k  # not targeted: zero
    assert not np.array(flat["layers.1.self_attn.q_proj.lora_a"])[2:].any()  # rank 2 padded to 6


def test_loss_and_gradients_match_transformers_peft(releases, base, tmp_path):
    config = CASES["router, rsLoRA"]
    pm = peft_model(releases["hf"], seed=1, **config)
    logits = pm(torch.tensor(IDS)).logits
    ref_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, CFG.vocab_size), torch.tensor(IDS[:, 1:]).reshape(-1))
    ref_loss.backward()
    ref_grads = {n.replace(".default", ""): mx.array(p.grad.numpy()) for n, p in pm.named_parameters() if "lora_" in n}
    peft_config = pm.peft_config["default"].to_dict()
    # gradients map through the same packing as the weights (the scale is one: nothing folded)
    _, ref_grads = from_peft(ref_grads, peft_config, CFG)

    pm.save_pretrained(tmp_path)
    model = base[0]
    ours_with(model, tmp_path)

    def loss_fn(m, ids):
        return nn.losses.cross_entropy(m(ids)[:, :-1], ids[:, 1:]).mean()

    loss, grads = nn.value_and_grad(model, loss_fn)(model, mx.array(IDS))
    grads = dict(tree_flatten(grads))
    assert abs(loss.item() - ref_loss.item()) <= 1e-4 * abs(ref_loss.item())
    assert set(grads) == set(ref_grads) == set(lora_parameters(model))
    for k, ref in ref_grads.items():
        ref, got = np.array(ref), np.array(grads[k])
        assert np.abs(ref).max() > 0, k
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), k


@pytest.mark.parametrize("layers", [None, (1, 3)])
def test_ours_to_peft_to_transformers(layers, releases, base, tmp_path):
    model = base[0]
    from mlx_gptoss.lora.adapters import remove_lora

    remove_lora(model)
    spec = LoRASpec(rank=3, alpha=5.0, targets=("attention", "router", "experts"), layers=layers, rslora=True)
    apply_lora(model, spec, seed=0)
    rng = np.random.default_rng(2)
    set_lora_parameters(
        model, {k: mx.array(rng.normal(0, 0.1, v.shape).astype(np.float32)) for k, v in lora_parameters(model).items()}
    )
    ours = np.array(model(mx.array(IDS)))
    export_peft(model, tmp_path / "peft", spec=spec)
    pm = peft.PeftModel.from_pretrained(hf_model(releases["hf"]), tmp_path / "peft").eval()
    n_lora = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    assert n_lora == sum(v.size for v in lora_parameters(model).values())  # nothing dropped, nothing extra
    assert relative_error(ours, base[1]) > 1e-2
    assert relative_error(ours, hf_logits(pm)) <= BOUND
    # and back: the PEFT folder read by us is the same adapter
    spec2, flat2 = read_adapter(tmp_path / "peft", model)
    assert spec2 == spec
    for k, v in lora_parameters(model).items():
        np.testing.assert_array_equal(np.array(flat2[k]), np.array(v), err_msg=k)
    # without the spec, alpha is read back as scale * r: the same update
    export_peft(model, tmp_path / "peft2")
    cfg = json.loads((tmp_path / "peft2" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] / cfg["r"] == pytest.approx(spec.scale) and not cfg["use_rslora"]


REFUSED = {
    "bias": ({"bias": "all"}, "'bias' is 'all'"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, "'modules_to_save'"),
    "dora": ({"use_dora": True}, "DoRA"),
    "other tuner": ({"peft_type": "IA3"}, "only LORA"),
    "rank mismatch": ({"r": 5}, "has rank 4 but adapter_config.json gives r=5"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_unsupported_peft_config_is_refused(case, releases, base, tmp_path):
    peft_model(releases["hf"], **CASES["attention+experts"]).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    change, message = REFUSED[case]
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(LoRAError, match=message):
        read_adapter(tmp_path, base[0])


def test_bad_peft_tensors_are_refused(releases, base, tmp_path):
    peft_model(releases["hf"], **CASES["attention+experts"]).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = mx.load(str(weights))
    mx.eval(tensors)  # read before the file is overwritten
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    mx.save_safetensors(str(weights), {**tensors, key: mx.zeros((7, 4))})
    with pytest.raises(
        LoRAError, match=r"adapter_model.safetensors: model.layers.0.self_attn.q_proj: .*expected \[1·r, 64\] and \[128, 1·r\]"
    ):
        read_adapter(tmp_path, base[0])
    mx.save_safetensors(str(weights), {**tensors, "base_model.model.model.embed_tokens.lora_A.weight": mx.zeros((4, 8))})
    with pytest.raises(LoRAError, match="tensor 'base_model.model.model.embed_tokens.lora_A.weight' is not a LoRA tensor"):
        read_adapter(tmp_path, base[0])


def test_export_refuses_a_spec_of_another_rank(base, tmp_path):
    model = base[0]
    from mlx_gptoss.lora.adapters import remove_lora

    remove_lora(model)
    apply_lora(model, LoRASpec(rank=2))
    with pytest.raises(LoRAError, match="has rank 2, the spec says 4"):
        export_peft(model, tmp_path / "peft", spec=LoRASpec(rank=4))
    assert not (tmp_path / "peft").exists()


def test_a_folder_of_no_known_tool_is_refused(tmp_path):
    with pytest.raises(LoRAError, match="adapter_config.json: not found"):
        detect_adapter_format(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"some": "thing"}')
    with pytest.raises(LoRAError, match="not an adapter config this library reads"):
        detect_adapter_format(tmp_path)


AGREE = {
    "names": dict(target_modules=["q_proj"]),
    "layers": dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    "one layer": dict(target_modules=["o_proj"], layers_to_transform=2),
    "pattern": dict(target_modules=ATTN, layers_to_transform=[0, 3], layers_pattern="layers"),
    "other pattern": dict(target_modules=ATTN, layers_to_transform=[0], layers_pattern="blocks"),
    "exclude": dict(target_modules=ATTN, exclude_modules=["q_proj"]),
    "exclude regex": dict(target_modules=ATTN, exclude_modules=r".*layers\.2\..*"),
    "regex": dict(target_modules=r".*\.layers\.[01]\.self_attn\.(q|k)_proj"),
    "full name": dict(target_modules=["model.layers.1.self_attn.o_proj", "k_proj"], layers_to_transform=[0]),
    "parameters only": dict(target_parameters=["mlp.router.weight"]),
}


@pytest.mark.parametrize("case", AGREE)
def test_peft_target_rules_match_peft(case):
    """Which attention tensors a PEFT config allows is what PEFT itself decides (check_target_module_exists)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    from mlx_gptoss.lora.formats import _peft_refusal

    config = AGREE[case]
    peft_config = peft.LoraConfig(**config)
    keys = [f"model.layers.{i}.self_attn.{p}" for i in range(CFG.num_hidden_layers) for p in ATTN]
    theirs = [bool(check_target_module_exists(peft_config, k)) for k in keys]
    ours = [_peft_refusal(config, k, config.get("target_parameters") or []) is None for k in keys]
    assert ours == theirs, list(zip(keys, ours, theirs))
    # each case allows some keys and refuses others, but the two that refuse every attention module
    assert any(theirs) != all(theirs) or (case in ("other pattern", "parameters only") and not any(theirs))
