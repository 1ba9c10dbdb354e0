"""LoRA adapters: placement and names, zero-B identity, the update against float64 references
(attention, router, experts on the sorted and unsorted paths), gradients, frozen base, and our
adapter folder (round trip, wrong base, corrupt files, atomic save)."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import TINY
from mlx.utils import tree_flatten

import mlx_gptoss
from mlx_gptoss import kernels
from mlx_gptoss.config import QuantSpec
from mlx_gptoss.kernels import ops
from mlx_gptoss.layers import QuantLinear
from mlx_gptoss.lora.adapters import (
    LoRAError,
    LoRASpec,
    apply_lora,
    last_layers,
    lora_parameters,
    remove_lora,
    set_lora_parameters,
)  # fmt: skip
from mlx_gptoss.lora.io import CONFIG, WEIGHTS, base_fingerprint, load_adapter, save_adapter
from mlx_gptoss.testing import dequantize_mxfp4
from mlx_gptoss_convert import convert

ALL = ("attention", "router", "experts")
IDS = mx.array([[5, 17, 3, 99, 250, 7, 1, 42, 8, 300, 11, 64]])


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    m = mlx_gptoss.load(tiny_model_dir, dtype=mx.float32)
    yield m
    remove_lora(m)


@pytest.fixture(autouse=True)
def _clean(request):
    yield
    if "model" in request.fixturenames:
        remove_lora(request.getfixturevalue("model"))


def randomise(model, seed=0, std=0.3):
    """Random A and B (B is zero at init, which would hide every error)."""
    rng = np.random.default_rng(seed)
    flat = {k: mx.array(rng.normal(0, std, v.shape).astype(np.float32)) for k, v in lora_parameters(model).items()}
    set_lora_parameters(model, flat)
    return flat


def f64(a):
    if isinstance(a, np.ndarray):
        return a.astype(np.float64)
    return np.array(a.astype(mx.float32)).astype(np.float64)


# -- placement, names, zero-B identity ---------------------------------------------------------


def test_names_are_the_contract_and_only_adapters_train(model):
    apply_lora(model, LoRASpec(rank=4, alpha=8, targets=ALL, layers=[1, 3]))
    names = {k for k, _ in tree_flatten(model.trainable_parameters())}
    want = set()
    for i in (1, 3):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            want |= {f"layers.{i}.self_attn.{p}.lora_a", f"layers.{i}.self_attn.{p}.lora_b"}
        want |= {f"layers.{i}.mlp.router.lora_a", f"layers.{i}.mlp.router.lora_b"}
        for p in ("gate_up", "down"):
            want |= {f"layers.{i}.mlp.experts_lora.{p}.lora_a", f"layers.{i}.mlp.experts_lora.{p}.lora_b"}
    assert names == want == set(lora_parameters(model))
    E, H, I, r = TINY.num_local_experts, TINY.hidden_size, TINY.intermediate_size, 4
    p = lora_parameters(model)
    assert p["layers.1.self_attn.q_proj.lora_b"].shape == (TINY.num_attention_heads * TINY.head_dim, r)
    assert p["layers.1.self_attn.k_proj.lora_a"].shape == (r, H)
    assert p["layers.1.mlp.experts_lora.gate_up.lora_a"].shape == (E, r, H)
    assert p["layers.1.mlp.experts_lora.gate_up.lora_b"].shape == (E, 2 * I, r)
    assert p["layers.1.mlp.experts_lora.down.lora_a"].shape == (E, r, I)
    assert p["layers.1.mlp.experts_lora.down.lora_b"].shape == (E, H, r)
    remove_lora(model)
    assert lora_parameters(model) == {} and model.layers[1].mlp.experts_lora is None
    assert "qkv.weight" in dict(tree_flatten(model.layers[1].self_attn.parameters()))


def test_zero_b_gives_the_base_logits_exactly(model):
    base = model(IDS)
    apply_lora(model, LoRASpec(rank=4, targets=ALL))
    assert mx.array_equal(model(IDS), base)
    randomise(model)
    assert not mx.allclose(model(IDS), base, atol=1e-3)
    remove_lora(model)
    assert mx.array_equal(model(IDS), base)


def test_zero_b_identity_and_update_on_quantized_attention(releases, tmp_path):
    path = convert(releases["hf"], tmp_path / "q8", quantization={"attention": QuantSpec("affine", 8, 64)})
    m = mlx_gptoss.load(path, dtype=mx.float32)
    base = m(IDS)
    apply_lora(m, LoRASpec(rank=4, alpha=4, targets=("attention",)))
    attn = m.layers[0].self_attn
    assert isinstance(attn.qkv.base, QuantLinear) and attn.qkv.base.weight.dtype == mx.uint32
    assert mx.array_equal(m(IDS), base)
    p = randomise(m)
    x = mx.random.normal((3, TINY.hidden_size))
    got = f64(attn.qkv(x))
    delta = np.concatenate([f64(x) @ f64(p[f"layers.0.self_attn.{n}.lora_a"]).T @ f64(p[f"layers.0.self_attn.{n}.lora_b"]).T
                            for n in ("q_proj", "k_proj", "v_proj")], axis=-1)  # fmt: skip
    np.testing.assert_allclose(got, f64(attn.qkv.base(x)) + delta, rtol=1e-5, atol=1e-4)


def test_bfloat16_model_runs_with_adapters(tiny_model_dir):
    m = mlx_gptoss.load(tiny_model_dir, dtype=mx.bfloat16)
    base = m(IDS)
    apply_lora(m, LoRASpec(rank=2, targets=ALL))
    out = m(IDS)
    assert out.dtype == mx.bfloat16 and mx.array_equal(out, base)


# -- the update against float64 references ----------------------------------------------------


def test_attention_and_router_update_matches_float64(model):
    spec = LoRASpec(rank=3, alpha=5, targets=("attention", "router"), layers=[2], rslora=True)
    apply_lora(model, spec)
    p = randomise(model)
    s = 5 / np.sqrt(3)
    attn, mlp = model.layers[2].self_attn, model.layers[2].mlp
    x = mx.random.normal((2, 5, TINY.hidden_size))
    o = mx.random.normal((2, 5, TINY.num_attention_heads * TINY.head_dim))
    X = f64(x)

    def lin(x, base, name):
        X = f64(x)
        return X @ f64(base.weight).T + f64(base.bias) + s * X @ f64(p[name + ".lora_a"]).T @ f64(p[name + ".lora_b"]).T

    np.testing.assert_allclose(f64(mlp.router(x)), lin(x, mlp.router.base, "layers.2.mlp.router"), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(attn.o_proj(o)), lin(o, attn.o_proj.base, "layers.2.self_attn.o_proj"), rtol=1e-5, atol=1e-5)
    w, b = f64(attn.qkv.base.weight), f64(attn.qkv.base.bias)
    parts = [s * X @ f64(p[f"layers.2.self_attn.{n}.lora_a"]).T @ f64(p[f"layers.2.self_attn.{n}.lora_b"]).T
             for n in ("q_proj", "k_proj", "v_proj")]  # fmt: skip
    np.testing.assert_allclose(f64(attn.qkv(x)), X @ w.T + b + np.concatenate(parts, -1), rtol=1e-5, atol=1e-5)


def dense_experts(mlp):
    """The MXFP4 experts dequantized: gate_up [E, 2I, H], down [E, H, I] float64, and biases."""
    out = []
    for e in (mlp.gate_up, mlp.down):
        w = np.array(e.weight)
        blocks = w.view(np.uint8).reshape(*w.shape[:2], -1, 16)
        out += [dequantize_mxfp4(blocks, np.array(e.scales)).astype(np.float64), f64(e.bias)]
    return out


def ref_moe(mlp, X, p, prefix, s):
    """Float64 reference of the adapted MoE on tokens X [N, H]: route, dense experts + s B A, combine."""
    gu, gub, dn, dnb = dense_experts(mlp)
    router = mlp.router.base if hasattr(mlp.router, "base") else mlp.router
    logits = X @ f64(router.weight).T + f64(router.bias)
    ga, gb = f64(p[prefix + "gate_up.lora_a"]), f64(p[prefix + "gate_up.lora_b"])
    da, db = f64(p[prefix + "down.lora_a"]), f64(p[prefix + "down.lora_b"])
    gu, dn = gu + s * gb @ ga, dn + s * db @ da  # merged per expert: [E, out, in]
    k = mlp.k
    y = np.zeros_like(X)
    for n in range(X.shape[0]):
        ids = np.argsort(-logits[n], kind="stable")[:k]
        w = np.exp(logits[n, ids] - logits[n, ids].max())
        w /= w.sum()
        for e, we in zip(ids, w):
            h = gu[e] @ X[n] + gub[e]
            gate, up = np.minimum(h[::2], mlp.limit), np.clip(h[1::2], -mlp.limit, mlp.limit)
            act = (up + 1) * gate / (1 + np.exp(-mlp.alpha * gate))
            y[n] += we * (dn[e] @ act + dnb[e])
    return y


@pytest.mark.parametrize("n_tokens", [3, 20], ids=["unsorted", "sorted"])  # N*K = 12 < 64 <= 80
def test_expert_update_matches_float64(model, n_tokens):
    assert (3 * TINY.num_experts_per_tok < ops.SORT_THRESHOLD) and (20 * TINY.num_experts_per_tok >= ops.SORT_THRESHOLD)
    apply_lora(model, LoRASpec(rank=4, alpha=8, targets=("experts",), layers=[1]))
    p = randomise(model, std=0.2)
    mlp = model.layers[1].mlp
    x = mx.random.normal((n_tokens, TINY.hidden_size), key=mx.random.key(n_tokens))
    ref = ref_moe(mlp, f64(x), p, "layers.1.mlp.experts_lora.", 2.0)
    base = ref_moe(mlp, f64(x), {k: v * 0 for k, v in p.items()}, "layers.1.mlp.experts_lora.", 2.0)
    assert np.abs(ref - base).max() > 0.1  # the update is visible
    np.testing.assert_allclose(f64(mlp(x)), ref, rtol=1e-4, atol=1e-4)


def test_delta_runs_the_twin_on_gpu_backends(model, monkeypatch):
    """The fused GPU kernels cannot take the update: with a delta the dispatcher must not call them."""
    apply_lora(model, LoRASpec(rank=2, targets=("experts",), layers=[0]))
    randomise(model)
    mlp = model.layers[0].mlp
    x = mx.random.normal((2, TINY.hidden_size))
    want = mlp(x)

    def boom(*a, **k):
        raise AssertionError("fused kernel called with a delta")

    monkeypatch.setattr(kernels.backends, "backend", lambda: "metal")
    monkeypatch.setattr(kernels, "route_topk_softmax", ops.route_topk_softmax)  # no Metal here
    monkeypatch.setattr(kernels.gpu, "mxfp4_gate_up_swiglu", boom)
    assert mx.array_equal(mlp(x), want)


def test_delta_select_serves_slot_indexed_experts(model):
    """What streamed experts need: base weights in slots, the delta gathered into the same slots."""
    apply_lora(model, LoRASpec(rank=2, targets=("experts",), layers=[0]))
    randomise(model)
    mlp = model.layers[0].mlp
    x = mx.random.normal((20, TINY.hidden_size))
    ids, w = ops.route_topk_softmax(mlp.router(x), mlp.k)
    args = [a for e in (mlp.gate_up, mlp.down) for a in (e.weight, e.scales, e.bias)]
    delta = mlp.experts_lora.delta()
    want = kernels.moe_mxfp4_swiglu(x, ids, w, *args, limit=mlp.limit, alpha=mlp.alpha, delta=delta)
    resident = mx.array([5, 0, 7, 2, 6, 1, 3, 4])  # slot s holds expert resident[s]
    slot_of = mx.argsort(resident).astype(mx.uint32)
    got = kernels.moe_mxfp4_swiglu(x, slot_of[ids], w, *(a[resident] for a in args), limit=mlp.limit, alpha=mlp.alpha,
                                   delta=delta.select(resident))  # fmt: skip
    assert mx.array_equal(got, want)


# -- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n_tokens", [3, 20], ids=["unsorted", "sorted"])
def test_expert_gradients_match_finite_differences(model, n_tokens):
    apply_lora(model, LoRASpec(rank=2, alpha=2, targets=("experts",), layers=[1]))
    p = randomise(model, seed=1, std=0.2)
    mlp = model.layers[1].mlp
    x = mx.random.normal((n_tokens, TINY.hidden_size), key=mx.random.key(7))
    c = mx.random.normal((n_tokens, TINY.hidden_size), key=mx.random.key(8))
    prefix = "layers.1.mlp.experts_lora."

    def loss(params, x):
        set_lora_parameters(model, params)
        return (mlp(x) * c).sum()

    gp, gx = mx.grad(loss, argnums=(0, 1))(p, x)
    rng = np.random.default_rng(0)
    C = f64(c)
    for name in ("gate_up.lora_a", "gate_up.lora_b", "down.lora_a", "down.lora_b"):
        key = prefix + name
        base = {k: f64(v) for k, v in p.items()}
        for _ in range(3):
            idx = tuple(rng.integers(0, n) for n in base[key].shape)
            eps = 1e-5
            plus, minus = dict(base), dict(base)
            plus[key], minus[key] = base[key].copy(), base[key].copy()
            plus[key][idx] += eps
            minus[key][idx] -= eps
            fd = ((ref_moe(mlp, f64(x), plus, prefix, 1.0) - ref_moe(mlp, f64(x), minus, prefix, 1.0)) * C).sum() / (2 * eps)
            assert abs(float(gp[key][idx]) - fd) <= 1e-3 * (1 + abs(fd)), (key, idx)
    # the gradient w.r.t. x flows through the frozen MXFP4 experts (the router's path included)
    X = f64(x)
    for _ in range(3):
        idx = tuple(rng.integers(0, n) for n in X.shape)
        plus, minus = X.copy(), X.copy()
        plus[idx] += 1e-5
        minus[idx] -= 1e-5
        pp = {k: f64(v) for k, v in p.items()}
        fd = ((ref_moe(mlp, plus, pp, prefix, 1.0) - ref_moe(mlp, minus, pp, prefix, 1.0)) * C).sum() / 2e-5
        assert abs(float(gx[idx]) - fd) <= 1e-3 * (1 + abs(fd)), idx


def test_attention_gradients_match_finite_differences(model):
    apply_lora(model, LoRASpec(rank=2, alpha=2, targets=("attention", "router"), layers=[0]))
    p = randomise(model, seed=2, std=0.2)
    attn = model.layers[0].self_attn
    x = mx.random.normal((1, 4, TINY.hidden_size), key=mx.random.key(3))
    c = mx.random.normal((1, 4, TINY.qkv_dim), key=mx.random.key(4))

    def loss(params):
        set_lora_parameters(model, params)
        return (attn.qkv(x) * c).sum()

    g = mx.grad(loss)(p)
    X, C = f64(x)[0], f64(c)[0]
    W, b = f64(attn.qkv.base.weight), f64(attn.qkv.base.bias)

    def ref(q):
        parts = [
            X @ q[f"layers.0.self_attn.{n}.lora_a"].T @ q[f"layers.0.self_attn.{n}.lora_b"].T
            for n in ("q_proj", "k_proj", "v_proj")
        ]
        return ((X @ W.T + b + np.concatenate(parts, -1)) * C).sum()

    base = {k: f64(v) for k, v in p.items()}
    for key in ("layers.0.self_attn.k_proj.lora_a", "layers.0.self_attn.v_proj.lora_b", "layers.0.self_attn.q_proj.lora_b"):
        idx = (1, 1)
        plus, minus = dict(base), dict(base)
        plus[key], minus[key] = base[key].copy(), base[key].copy()
        plus[key][idx] += 1e-5
        minus[key][idx] -= 1e-5
        fd = (ref(plus) - ref(minus)) / 2e-5
        assert abs(float(g[key][idx]) - fd) <= 1e-3 * (1 + abs(fd)), key


def test_base_gets_no_gradient_and_stays_untouched(model):
    before = {k: mx.array(v) for k, v in tree_flatten(model.parameters())}
    apply_lora(model, LoRASpec(rank=2, targets=ALL, layers=last_layers(2, TINY.num_hidden_layers)))
    randomise(model)
    target = mx.array([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]])

    def loss(m):
        return nn.losses.cross_entropy(m(IDS), target).mean()

    lv, grads = nn.value_and_grad(model, loss)(model)
    names = {k for k, _ in tree_flatten(grads)}
    assert names == set(lora_parameters(model)) and all(".layers.0." not in "." + k for k in names)
    adapters = lora_parameters(model)
    optim.SGD(learning_rate=0.1).update(model, grads)
    mx.eval(model.parameters())
    assert any(not mx.array_equal(adapters[k], v) for k, v in lora_parameters(model).items())
    remove_lora(model)
    after = dict(tree_flatten(model.parameters()))
    assert set(after) == set(before) and all(mx.array_equal(before[k], after[k]) for k in before)


# -- the spec -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(rank=0), "rank"),
        (dict(alpha=-1.0), "alpha"),
        (dict(targets=("mlp",)), "targets"),
        (dict(targets=()), "targets"),
        (dict(layers=[1, 1]), "layers"),
        (dict(layers=[-1]), "layers"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=0.1, targets=("experts",)), "expert"),
    ],
)
def test_bad_spec_is_a_clear_error(kw, msg):
    with pytest.raises(LoRAError, match=msg):
        LoRASpec(**kw)


def test_spec_layers_out_of_range_and_last_layers(model):
    assert last_layers(2, 4) == (2, 3)
    with pytest.raises(LoRAError, match=r"layers \[7\] do not exist"):
        apply_lora(model, LoRASpec(layers=[1, 7]))
    assert lora_parameters(model) == {}
    assert LoRASpec(rank=8, alpha=16).scale == 2.0 and LoRASpec(rank=4, alpha=16, rslora=True).scale == 8.0


# -- our adapter folder -------------------------------------------------------------------------


@pytest.fixture
def saved(model, tmp_path):
    spec = LoRASpec(rank=3, alpha=6, targets=ALL, layers=[0, 2])
    apply_lora(model, spec)
    flat = randomise(model, seed=5)
    logits = model(IDS)
    dst = save_adapter(
        model, spec, tmp_path / "ad", base_fingerprint=base_fingerprint(model), base_name="tiny", extra={"steps": 3}
    )
    remove_lora(model)
    return dst, spec, flat, logits


def test_round_trip_is_bit_exact(model, saved, tiny_model_dir):
    dst, spec, flat, logits = saved
    cfg = json.loads((dst / CONFIG).read_text())
    assert cfg["format"] == "mlx-gptoss-lora" and cfg["version"] == 1 and cfg["extra"] == {"steps": 3}
    assert cfg["base_model"] == {"fingerprint": base_fingerprint(tiny_model_dir), "name": "tiny"}
    assert load_adapter(model, dst) == spec
    got = lora_parameters(model)
    assert set(got) == set(flat) and all(mx.array_equal(got[k], flat[k]) for k in flat)
    assert mx.array_equal(model(IDS), logits)


def test_fingerprint_ignores_the_load_dtype_and_sees_the_weights(model, tiny_model_dir):
    fp = base_fingerprint(model)
    assert fp == base_fingerprint(tiny_model_dir) == base_fingerprint(mlx_gptoss.load(tiny_model_dir, dtype=mx.bfloat16))
    other = mlx_gptoss.load(tiny_model_dir, dtype=mx.float32)
    other.layers[3].self_attn.sinks = other.layers[3].self_attn.sinks + 0.5
    assert base_fingerprint(other) != fp


def test_adapter_for_another_base_is_refused(saved, tiny_model_dir):
    dst = saved[0]
    other = mlx_gptoss.load(tiny_model_dir, dtype=mx.float32)
    other.layers[1].mlp.router.bias = other.layers[1].mlp.router.bias + 1.0
    with pytest.raises(LoRAError, match="another base model") as e:
        load_adapter(other, dst)
    assert base_fingerprint(other) in str(e.value) and base_fingerprint(tiny_model_dir) in str(e.value)
    assert lora_parameters(other) == {}


def rewrite(dst, fn):
    w = dict(mx.load(str(dst / WEIGHTS)))
    fn(w)
    mx.save_safetensors(str(dst / WEIGHTS), w)


@pytest.mark.parametrize(
    "damage, msg",
    [
        (lambda d: os.truncate(d / WEIGHTS, os.path.getsize(d / WEIGHTS) - 10), "truncated"),
        (lambda d: (d / WEIGHTS).write_bytes(b"\x00" * 3), "truncated"),
        (lambda d: (d / WEIGHTS).unlink(), "file not found"),
        (
            lambda d: rewrite(d, lambda w: w.pop("layers.2.mlp.router.lora_b")),
            "missing adapter tensor 'layers.2.mlp.router.lora_b'",
        ),
        (
            lambda d: rewrite(d, lambda w: w.update({"layers.1.mlp.router.lora_a": mx.zeros((3, 64))})),
            "'layers.1.mlp.router.lora_a' has no place",
        ),
        (
            lambda d: rewrite(d, lambda w: w.update({"layers.0.self_attn.q_proj.lora_a": mx.zeros((4, 64))})),
            r"'layers.0.self_attn.q_proj.lora_a' has shape \(4, 64\), the model expects \(3, 64\)",
        ),
        (
            lambda d: rewrite(d, lambda w: w.update({"layers.0.self_attn.q_proj.lora_a": mx.zeros((3, 64), dtype=mx.int32)})),
            "dtype I32",
        ),
        (lambda d: rewrite(d, lambda w: w.update({"layers.0.mlp.router.lora_b": mx.full((8, 3), float("nan"))})), "NaN"),
        (lambda d: (d / CONFIG).write_text("{"), "not valid JSON"),
        (lambda d: (d / CONFIG).write_text(json.dumps({"format": "other"})), "'format'"),
    ],
    ids=["truncated", "tiny", "no-weights", "missing-key", "extra-key", "shape", "int", "nan", "json", "format"],
)
def test_bad_adapter_folder_is_a_clear_error(model, saved, damage, msg):
    dst = saved[0]
    damage(dst)
    with pytest.raises(LoRAError, match=msg) as e:
        load_adapter(model, dst)
    assert str(dst) in str(e.value)
    assert lora_parameters(model) == {}  # nothing half-applied


def test_bad_spec_in_config_names_the_file(model, saved):
    dst = saved[0]
    cfg = json.loads((dst / CONFIG).read_text())
    cfg["rank"] = 0
    (dst / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(LoRAError, match=f"{CONFIG}: rank must be"):
        load_adapter(model, dst)


def test_save_is_atomic(model, saved, tmp_path, monkeypatch):
    dst, spec, _, _ = saved
    old = (dst / WEIGHTS).read_bytes()
    load_adapter(model, dst)
    randomise(model, seed=9)

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)  # after both files are written, before the rename
    for target in (tmp_path / "fresh", dst):
        with pytest.raises(OSError, match="disk full"):
            save_adapter(model, spec, target, base_fingerprint="sha256:x")
    assert not (tmp_path / "fresh").exists()
    assert (dst / WEIGHTS).read_bytes() == old  # the earlier adapter is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temporary left behind
    monkeypatch.undo()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep")
    with pytest.raises(LoRAError, match="not an adapter folder"):
        save_adapter(model, spec, tmp_path / "notes", base_fingerprint="sha256:x")
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep"


def test_compiled_decode_never_serves_stale_weights_after_adapters(model):
    # the compiled one-token step captures the weights it reads when first traced
    from mlx_gptoss import decode
    from mlx_gptoss.generate import stream_tokens

    prompt = [1, 2, 3, 4, 5]
    decode.set_enabled(True)
    try:
        base = list(stream_tokens(model, prompt, max_tokens=6))  # traces the compiled step
        apply_lora(model, LoRASpec(rank=4, targets=("attention", "router", "experts")), seed=0)
        randomise(model, std=1.0)
        compiled = list(stream_tokens(model, prompt, max_tokens=6))
        decode.set_enabled(False)
        eager = list(stream_tokens(model, prompt, max_tokens=6))
    finally:
        decode.set_enabled(None)
    assert compiled == eager and eager != base
