"""Serving adapters: load(adapter=) equals applying them by hand, wrong base refused, --adapter on
generate and chat, and `lora fuse` (attention/router merged: equal logits in float32, KL reported
when quantized; expert adapters refused; written atomically, never over the model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import mlx_gptoss
from mlx_gptoss.config import QuantSpec
from mlx_gptoss.lora import fuse as fuse_mod
from mlx_gptoss.lora.adapters import LoRAError, LoRASpec, apply_lora, lora_parameters, set_lora_parameters
from mlx_gptoss.lora.fuse import FuseError, fuse, mxfp4_requant_change, mxfp4_update_loss
from mlx_gptoss.lora.io import CONFIG, base_fingerprint, save_adapter
from mlx_gptoss_convert import convert

IDS = mx.array([[5, 17, 3, 99, 250, 7, 1, 42]])
ALL = ("attention", "router", "experts")
CLI = [sys.executable, "-m", "mlx_gptoss.cli"]


def make_adapter(model_dir, dst, targets, *, seed=0, std=0.1, rank=4):
    """A saved adapter with random A and B (B is zero at init, which would hide every error)."""
    m = mlx_gptoss.load(model_dir, dtype=mx.float32)
    spec = LoRASpec(rank=rank, alpha=2 * rank, targets=targets)
    apply_lora(m, spec)
    rng = np.random.default_rng(seed)
    set_lora_parameters(m, {k: mx.array(rng.normal(0, std, v.shape).astype(np.float32)) for k, v in lora_parameters(m).items()})
    save_adapter(m, spec, dst, base_fingerprint=base_fingerprint(m))
    return m, dst


@pytest.fixture(scope="module")
def attn_router(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("ad") / "attn_router", ("attention", "router"))


@pytest.fixture(scope="module")
def with_experts(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("ad") / "all", ALL, seed=1, std=0.02)


def run_cli(*args, stdin=None):
    return subprocess.run([*CLI, *map(str, args)], input=stdin, capture_output=True, text=True, timeout=300)


# -- load(adapter=) ---------------------------------------------------------------------------


def test_load_with_adapter_equals_applying_it_by_hand(tiny_model_dir, with_experts):
    by_hand, ad = with_experts
    m = mlx_gptoss.load(tiny_model_dir, dtype=mx.float32, adapter=ad)
    assert lora_parameters(m).keys() == lora_parameters(by_hand).keys()
    assert mx.array_equal(m(IDS), by_hand(IDS))
    assert not mx.allclose(m(IDS), mlx_gptoss.load(tiny_model_dir, dtype=mx.float32)(IDS), atol=1e-3)


def test_load_with_adapter_for_another_base_is_refused(tiny_model_dir, attn_router, tmp_path):
    import shutil

    ad = shutil.copytree(attn_router[1], tmp_path / "other")
    cfg = json.loads((ad / CONFIG).read_text())
    cfg["base_model"] = {"fingerprint": "sha256:" + "0" * 64, "name": "someone-else"}
    (ad / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(LoRAError, match="another base model") as e:
        mlx_gptoss.load(tiny_model_dir, adapter=ad)
    assert "sha256:" + "0" * 64 in str(e.value) and base_fingerprint(tiny_model_dir) in str(e.value)


def test_load_with_a_missing_adapter_folder_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(LoRAError, match="no such adapter folder"):
        mlx_gptoss.load(tiny_model_dir, adapter=tmp_path / "nope")


def test_chat_session_with_adapter_runs_in_another_thread(vocab_model_dir, tmp_path):
    import threading

    _, ad = make_adapter(vocab_model_dir, tmp_path / "ad", ("attention",), std=0.05)
    m = mlx_gptoss.load(vocab_model_dir, adapter=ad)
    session = m.chat(max_tokens=3)  # reads every weight, adapters included, in this thread
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("reply", session.send("hi")))
    t.start()
    t.join(120)
    assert out["reply"].stats.generation_tokens >= 1


# -- --adapter on the command line ------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab_adapter(vocab_model_dir, tmp_path_factory):
    _, ad = make_adapter(vocab_model_dir, tmp_path_factory.mktemp("vad") / "ad", ("attention", "router"), std=0.3)
    return ad


def test_generate_with_adapter_on_the_command_line(vocab_model_dir, vocab_adapter):
    got = run_cli("generate", "-m", vocab_model_dir, "--adapter", vocab_adapter, "--raw", "--max-tokens", 4, "--json", "Hello")
    assert got.returncode == 0, got.stderr
    want = mlx_gptoss.generate(mlx_gptoss.load(vocab_model_dir, adapter=vocab_adapter), "Hello", raw=True, max_tokens=4)
    base = mlx_gptoss.generate(mlx_gptoss.load(vocab_model_dir), "Hello", raw=True, max_tokens=4)
    assert json.loads(got.stdout)["tokens"] == want.tokens != base.tokens


def test_chat_with_adapter_on_the_command_line(vocab_model_dir, vocab_adapter):
    got = run_cli("chat", "-m", vocab_model_dir, "--adapter", vocab_adapter, "--max-tokens", 3, stdin="hi\n/quit\n")
    assert got.returncode == 0, got.stderr
    assert "Traceback" not in got.stderr


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_adapter_folder_is_a_one_line_error(vocab_model_dir, tmp_path, command):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / CONFIG).write_text("{not json")
    args = ["--raw", "hi"] if command == "generate" else []
    for folder, msg in ((tmp_path / "missing", "no such adapter folder"), (bad, CONFIG)):
        got = run_cli(command, "-m", vocab_model_dir, "--adapter", folder, *args, stdin="")
        assert got.returncode == 1 and "Traceback" not in got.stderr, got.stderr
        lines = got.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and msg in lines[0], got.stderr


# -- fuse ---------------------------------------------------------------------------------------


def test_fuse_float32_gives_the_unfused_logits(tiny_model_dir, attn_router, tmp_path):
    unfused, ad = attn_router
    report = fuse(tiny_model_dir, ad, tmp_path / "fused", dtype="float32", verbose=False)
    fused = mlx_gptoss.load(tmp_path / "fused", dtype=mx.float32)
    assert mx.abs(fused(IDS) - unfused(IDS)).max().item() <= 1e-5
    assert report.update_lost < 1e-6 and abs(report.kl_mean) < 1e-6
    # only the adapted tensors changed; every other one is the source's, byte for byte
    names = {
        f"layers.{i}.{k}.weight" for i in range(len(fused.layers)) for k in ("self_attn.qkv", "self_attn.o_proj", "mlp.router")
    }
    assert set(report.merged) == names
    src, out = mlx_gptoss.load(tiny_model_dir, dtype=mx.float32), fused
    from mlx.utils import tree_flatten

    for (k, a), (_, b) in zip(tree_flatten(src.parameters()), tree_flatten(out.parameters())):
        assert mx.array_equal(a, b) != (k in names), k
    record = json.loads((tmp_path / "fused" / fuse_mod.FUSE_RECORD).read_text())
    assert record["report"]["kl_mean"] == report.kl_mean and record["spec"]["targets"] == ["attention", "router"]


def test_fuse_at_the_stored_bf16_reports_what_rounding_costs(tiny_model_dir, attn_router, tmp_path, capfd):
    report = fuse(tiny_model_dir, attn_router[1], tmp_path / "fused", verbose=True)
    err = capfd.readouterr().err
    assert 0 < report.update_lost < 0.05 and 0 <= report.kl_mean < 1e-2 and report.kl_max >= report.kl_mean
    assert report.kl_adapter_mean > 100 * report.kl_mean  # the error is small next to what the adapter does
    assert "KL(unfused || fused) over 64 random tokens" in err and "update lost to the stored precision" in err


def test_fuse_of_quantized_attention_requantizes_and_reports_kl(releases, tmp_path):
    base = convert(releases["hf"], tmp_path / "q8", quantization={"attention": QuantSpec("affine", 8, 64)})
    unfused, ad = make_adapter(base, tmp_path / "ad", ("attention", "router"), std=0.05)
    got = run_cli("lora", "fuse", "-m", base, "--adapter", ad, "-o", tmp_path / "fused", "--check-tokens", 32)
    assert got.returncode == 0, got.stderr
    assert "KL(unfused || fused) over 32 random tokens" in got.stderr
    record = json.loads((tmp_path / "fused" / fuse_mod.FUSE_RECORD).read_text())["report"]
    assert 0 < record["update_lost"] < 0.5 and 0 <= record["kl_mean"] < 1e-2  # 8-bit groups of 64: a small error
    assert "layers.0.self_attn.qkv.scales" in record["merged"] and "layers.0.self_attn.qkv.biases" in record["merged"]
    fused = mlx_gptoss.load(tmp_path / "fused", dtype=mx.float32)
    assert fused.layers[0].self_attn.qkv.weight.dtype == mx.uint32  # still 8-bit
    # the update survives re-quantization: the fused model is far nearer the unfused one than the base is
    base_err = mx.abs(mlx_gptoss.load(base, dtype=mx.float32)(IDS) - unfused(IDS)).mean().item()
    assert mx.abs(fused(IDS) - unfused(IDS)).mean().item() < base_err / 4


def test_fuse_of_a_small_update_into_8bit_never_adds_error_beyond_it(releases, tmp_path):
    # an update below half a code step: re-quantizing from scratch re-rounds all of W (more error
    # than the update itself); codes on the base's own grid round the update only
    base = convert(releases["hf"], tmp_path / "q8", quantization={"attention": QuantSpec("affine", 8, 64)})
    _, ad = make_adapter(base, tmp_path / "ad", ("attention",), std=0.003)
    with pytest.raises(fuse_mod.UpdateLostError, match="stored quantized") as e:  # most of it is lost: refused unless allowed
        fuse(base, ad, tmp_path / "fused", check_tokens=0, verbose=False)
    assert "float32" not in str(e.value)  # --dtype changes float weights only: no use for 8-bit attention
    report = fuse(base, ad, tmp_path / "fused", check_tokens=0, verbose=False, allow_loss=True)
    assert 0 < report.update_lost <= 1.0 + 1e-4 and report.kl_mean is None  # 24x the update when W was re-rounded
    src, out = mlx_gptoss.load(base, dtype=mx.float32), mlx_gptoss.load(tmp_path / "fused", dtype=mx.float32)
    a, b = src.layers[0].self_attn.qkv, out.layers[0].self_attn.qkv
    assert mx.array_equal(a.scales, b.scales) and mx.array_equal(a.biases, b.biases)  # the grid is kept


def test_fuse_refuses_expert_adapters_and_says_what_mxfp4_would_lose(tiny_model_dir, with_experts, tmp_path):
    with pytest.raises(
        FuseError, match=r"into MXFP4 would lose \d+\.\d% of the update \(\d+\.\d% even keeping the base's scales"
    ) as e:
        fuse(tiny_model_dir, with_experts[1], tmp_path / "fused")
    assert "--adapter" in str(e.value)
    got = run_cli("lora", "fuse", "-m", tiny_model_dir, "--adapter", with_experts[1], "-o", tmp_path / "fused", "--experts-bf16")
    assert got.returncode == 1 and "MXFP4 experts only" in got.stderr and " GB to " in got.stderr, got.stderr
    assert "Traceback" not in got.stderr
    assert not (tmp_path / "fused").exists() and os.listdir(tmp_path) == []


def test_mxfp4_requantization_loses_a_lora_sized_update():
    rng = np.random.default_rng(0)
    w = mx.array(rng.normal(0, 0.02, (64, 256)).astype(np.float32))  # a trained weight's scale
    codes, scales = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")
    assert mxfp4_requant_change(codes, scales) == 0  # MLX's quantizer gives stored codes back
    a, b = rng.normal(0, 1 / 16, (8, 256)), rng.normal(0, 1e-3, (64, 8))
    delta = mx.array((2 * b @ a).astype(np.float32))  # ~1 % of the weight's size
    # even on the base's own scales the update mostly rounds away; MLX's quantizer does worse: a
    # group whose largest value moves past the top code gets twice the scale (coarser codes)
    assert 0.8 < mxfp4_update_loss(codes, scales, delta, keep_scales=True) <= 1.0 + 1e-6
    assert mxfp4_update_loss(codes, scales, delta) > 1.0
    assert mxfp4_update_loss(codes, scales, 100 * delta, keep_scales=True) < 0.5  # a large update survives


def test_fuse_is_atomic_and_never_writes_over_the_model(tiny_model_dir, attn_router, tmp_path, monkeypatch):
    ad = attn_router[1]
    before = sorted(os.listdir(tiny_model_dir))
    for out, msg in ((tiny_model_dir, "already exists"), (tiny_model_dir / "fused", "inside the source"),
                     (ad / "fused", "inside the source")):  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            fuse(tiny_model_dir, ad, out, verbose=False)
    assert sorted(os.listdir(tiny_model_dir)) == before

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fuse_mod, "_kl_check", boom)
    with pytest.raises(OSError):
        fuse(tiny_model_dir, ad, tmp_path / "fused", verbose=False)
    assert os.listdir(tmp_path) == []  # neither the folder nor a hidden partial one is left
