"""mlx_gptoss.inspect: hook points against an independent float64 computation built here from the
weights, interventions against hand-edited models, the undo, capture, routing records and
statistics, and expert pruning."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest

import mlx_gptoss
from mlx_gptoss import inspect
from mlx_gptoss.config import FULL
from mlx_gptoss.generate import stream_tokens
from mlx_gptoss.rope import yarn_inv_freq
from mlx_gptoss.testing import tiny_model

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float64)
T = 24  # past the tiny model's sliding window (16)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("inspect") / "tiny", vocab=512, layers=2, seed=5)


@pytest.fixture
def model(path):
    return mlx_gptoss.load(path, dtype=mx.float32)


@pytest.fixture(scope="module")
def ids():
    return mx.array(np.random.default_rng(0).integers(0, 512, (1, T)))


def f64(a) -> np.ndarray:
    return np.array(a.astype(mx.float32) if isinstance(a, mx.array) else a, dtype=np.float64)


# -- an independent float64 reference, from the weights ------------------------------------------


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w


def mxfp4(codes, scales) -> np.ndarray:
    """Converted MXFP4 [out, in/8] u32 codes and [out, in/32] u8 scales -> float64 [out, in]."""
    b = np.array(codes).view(np.uint8)  # little-endian words: element 2j in the low nibble of byte j
    vals = np.stack([E2M1[b & 0x0F], E2M1[b >> 4]], axis=-1).reshape(b.shape[0], -1)
    return vals * np.repeat(np.ldexp(1.0, np.array(scales).astype(np.int64) - 127), 32, axis=1)


def attention(layer, x, cfg, kind):
    a = layer.self_attn
    Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    xn = rms(x, f64(layer.input_layernorm.weight), cfg.rms_norm_eps)
    qkv = xn @ f64(a.qkv.weight).T + f64(a.qkv.bias)  # [T, (Hq + 2 Hkv) D]
    q = qkv[:, : Hq * D].reshape(T, Hq, D)
    k = qkv[:, Hq * D : (Hq + Hkv) * D].reshape(T, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D :].reshape(T, Hkv, D)
    ang = np.arange(T)[:, None] * yarn_inv_freq(D, cfg.rope_theta, cfg.rope_scaling)[None]  # [T, D/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rope(t):
        t1, t2 = t[..., : D // 2], t[..., D // 2 :]
        return np.concatenate([t1 * cos - t2 * sin, t2 * cos + t1 * sin], axis=-1)

    q, k = rope(q), rope(k)
    factor = cfg.rope_scaling.attention_factor**2 / math.sqrt(D)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    visible = (j <= i) if kind == FULL else (j <= i) & (i - j < cfg.sliding_window)
    sinks = f64(a.sinks)
    heads = np.zeros((Hq, T, D))
    for h in range(Hq):
        g = h // (Hq // Hkv)
        s = np.where(visible, q[:, h] @ k[:, g].T * factor, -np.inf)
        m = np.maximum(s.max(axis=1, keepdims=True), sinks[h])
        p = np.exp(s - m)
        p /= p.sum(axis=1, keepdims=True) + np.exp(sinks[h] - m)
        heads[h] = p @ v[:, g]
    out = heads.transpose(1, 0, 2).reshape(T, Hq * D) @ f64(a.o_proj.weight).T + f64(a.o_proj.bias)
    return heads, out


def moe(layer, x, cfg):
    mlp = layer.mlp
    xn = rms(x, f64(layer.post_attention_layernorm.weight), cfg.rms_norm_eps)
    logits = xn @ f64(mlp.router.weight).T + f64(mlp.router.bias)
    ids = np.argsort(-logits, axis=1, kind="stable")[:, : cfg.num_experts_per_tok]
    top = np.take_along_axis(logits, ids, axis=1)
    w = np.exp(top - top.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    out = np.zeros_like(x)
    for n in range(T):
        for e, we in zip(ids[n], w[n]):
            h = mxfp4(mlp.gate_up.weight[e], mlp.gate_up.scales[e]) @ xn[n] + f64(mlp.gate_up.bias[e])
            gate, up = np.minimum(h[0::2], cfg.swiglu_limit), np.clip(h[1::2], -cfg.swiglu_limit, cfg.swiglu_limit)
            act = (up + 1) * gate / (1 + np.exp(-cfg.swiglu_alpha * gate))
            out[n] += we * (mxfp4(mlp.down.weight[e], mlp.down.scales[e]) @ act + f64(mlp.down.bias[e]))
    return logits, ids, w, out


def close(got, want, what):
    got = f64(got).reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * max(1.0, np.abs(want).max()), err_msg=what)


def test_every_point_equals_a_float64_computation_from_the_weights(model, ids):
    cfg = model.config
    _, t = inspect.run_with_cache(model, ids)
    close(t["embed.out"], f64(model.embed_tokens.weight)[np.array(ids[0])], "embed.out")
    x = f64(t["embed.out"])[0]
    for i, layer in enumerate(model.layers):
        p = f"blocks.{i}."
        close(t[p + "input"], x, p + "input")
        heads, attn_out = attention(layer, x, cfg, cfg.layer_types[i])
        close(t[p + "attn.heads"][0], heads, p + "attn.heads")
        close(t[p + "attn.out"][0], attn_out, p + "attn.out")
        mid = x + attn_out
        close(t[p + "resid.mid"][0], mid, p + "resid.mid")
        logits, eids, w, moe_out = moe(layer, f64(t[p + "resid.mid"])[0], cfg)
        close(t[p + "router.logits"], logits, p + "router.logits")
        got_ids = np.array(t[p + "router.topk.ids"])
        order = np.argsort(got_ids, axis=1)
        np.testing.assert_array_equal(np.sort(got_ids, axis=1), np.sort(eids, axis=1), err_msg=p + "router.topk.ids")
        close(np.take_along_axis(f64(t[p + "router.topk.weights"]), order, axis=1),
              np.take_along_axis(w, np.argsort(eids, axis=1), axis=1), p + "router.topk.weights")  # fmt: skip
        close(t[p + "moe.out"][0], moe_out, p + "moe.out")
        x = f64(t[p + "resid.mid"])[0] + moe_out
        close(t[p + "resid.post"][0], x, p + "resid.post")
        x = f64(t[p + "resid.post"])[0]
    final = rms(x, f64(model.norm.weight), cfg.rms_norm_eps)
    close(t["final.norm"][0], final, "final.norm")
    close(t["logits"][0], final @ f64(model.lm_head.weight).T, "logits")


def test_no_hook_is_the_plain_pass(model, ids):
    """With nothing registered the model has no registry (the plain pass, compiled decode allowed)."""
    assert model.hooks is None and model._plain()
    with inspect.trace(model, "blocks.0.moe.out"):
        assert model.hooks is not None and not model._plain()
        assert model.hooks.block(1) is None  # blocks without a hook run the plain path
    assert model.hooks is None and model._plain()


# -- interventions against hand-edited models ------------------------------------------------------


def edited(path, edit) -> mlx_gptoss.Model:
    m = mlx_gptoss.load(path, dtype=mx.float32)
    edit(m)
    mx.eval(m.parameters())
    return m


def set_row(a, i, value):
    b = np.array(a)
    b[i] = value
    return mx.array(b)


def test_removing_experts_equals_router_rows_at_minus_infinity(model, path, ids):
    def edit(m):
        r = m.layers[0].mlp.router
        r.bias = set_row(r.bias, [1, 6], -np.inf)

    with inspect.remove_experts(model, [1, 6], layers=[0]):
        got = np.array(model(ids))
    np.testing.assert_array_equal(got, np.array(edited(path, edit)(ids)))


def test_forcing_routing_to_a_set_equals_the_others_removed_by_hand(model, path, ids):
    keep = [0, 2, 5, 7]

    def edit(m):
        for layer in m.layers:
            layer.mlp.router.bias = set_row(layer.mlp.router.bias, [e for e in range(8) if e not in keep], -np.inf)

    with inspect.force_experts(model, keep), inspect.trace(model, "blocks.*.router.topk") as t:
        got = np.array(model(ids))
    np.testing.assert_array_equal(got, np.array(edited(path, edit)(ids)))
    assert set(np.unique(np.array(t["blocks.1.router.topk.ids"]))) == set(keep)


def test_router_bias_zeroed_heads_and_sinks_equal_hand_edits(model, path, ids):
    bias = np.linspace(-1, 1, 8).astype(np.float32)

    def edit(m):
        r = m.layers[1].mlp.router
        r.bias = r.bias + mx.array(bias)
        o = m.layers[0].self_attn.o_proj
        w = np.array(o.weight)
        w[:, 3 * 16 : 4 * 16] = 0  # head 3's columns of o_proj: its output zeroed
        o.weight = mx.array(w)
        for layer in m.layers:
            layer.self_attn.sinks = layer.self_attn.sinks + math.log(0.5)

    with inspect.bias_router(model, bias, layers=1), inspect.zero_heads(model, {0: [3]}), inspect.scale_sinks(model, 0.5):
        got = np.array(model(ids))
    np.testing.assert_allclose(got, np.array(edited(path, edit)(ids)), rtol=0, atol=1e-5)


def test_zero_steering_and_self_patching_change_nothing_and_steering_adds(model, ids):
    base, t = inspect.run_with_cache(model, ids, names="blocks.*.resid.post")
    with inspect.steer(model, "blocks.*.resid.post", np.zeros(64)):
        np.testing.assert_array_equal(np.array(model(ids)), np.array(base))
    with inspect.patch(model, t):
        np.testing.assert_array_equal(np.array(model(ids)), np.array(base))
    v = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    with inspect.steer(model, "blocks.0.resid.post", v, scale=0.5), inspect.trace(model, "blocks.1.input") as s:
        model(ids)
    np.testing.assert_allclose(np.array(s["blocks.1.input"]), np.array(t["blocks.0.resid.post"]) + 0.5 * v, atol=1e-5)


def test_patching_positions_from_another_run(model, ids):
    other = mx.array(np.random.default_rng(9).integers(0, 512, (1, T)))
    _, clean = inspect.run_with_cache(model, other, names="blocks.0.resid.post")
    with inspect.patch(model, clean, positions=[T - 1]), inspect.trace(model, "blocks.0.resid.post") as t:
        model(ids)
    got, src = np.array(t["blocks.0.resid.post"]), np.array(clean["blocks.0.resid.post"])
    np.testing.assert_array_equal(got[0, -1], src[0, -1])
    assert not np.allclose(got[0, :-1], src[0, :-1])


def test_every_intervention_is_undone_also_after_an_exception(model, ids):
    before = np.array(model(ids))
    sinks = [np.array(layer.self_attn.sinks) for layer in model.layers]

    def boom(x, point):
        raise RuntimeError("a hook that fails")

    for iv in (
        lambda: inspect.remove_experts(model, [0]), lambda: inspect.force_experts(model, [1, 2, 3, 4]),
        lambda: inspect.bias_router(model, np.ones(8)), lambda: inspect.steer(model, "blocks.*.input", np.ones(64)),
        lambda: inspect.zero_heads(model, [(1, 0)]), lambda: inspect.scale_sinks(model, 3.0),
        lambda: inspect.intervene(model, {"blocks.1.moe.out": boom}),
    ):  # fmt: skip
        with pytest.raises(RuntimeError), iv(), inspect.intervene(model, {"logits": boom}):
            model(ids)
        assert model.hooks is None
        np.testing.assert_array_equal(np.array(model(ids)), before)
    assert all(np.array_equal(np.array(layer.self_attn.sinks), s) for layer, s in zip(model.layers, sinks))


def test_bad_requests_name_what_is_wrong(model):
    with pytest.raises(ValueError, match=r"no hook point matches 'blocks\.7\.\*'.*0\.\.1"):
        inspect.trace(model, "blocks.7.*").__enter__()
    with pytest.raises(ValueError, match=r"shape \(64,\)"):
        inspect.steer(model, "blocks.0.resid.post", np.ones(65))
    with pytest.raises(ValueError, match="residual-stream points"):
        inspect.steer(model, "blocks.0.router.logits", np.ones(64))
    with pytest.raises(ValueError, match=r"expert ids in 0\.\.7"):
        inspect.remove_experts(model, [8])
    with pytest.raises(ValueError, match="fewer than the 4"):
        inspect.remove_experts(model, [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"layers must be block indices in 0\.\.1"):
        inspect.remove_experts(model, [0], layers=[2])
    with pytest.raises(ValueError, match="head 8 of layer 0"):
        inspect.zero_heads(model, {0: [8]})
    with pytest.raises(ValueError, match=r"patch blocks\.0\.resid\.post: the source holds shape"), inspect.patch(
        model, {"blocks.0.resid.post": np.zeros((1, 3, 64), np.float32)}
    ):  # fmt: skip
        model(mx.array([[1, 2]]))
    assert model.hooks is None


# -- capture ---------------------------------------------------------------------------------------


def test_capture_over_a_generation_a_ring_and_running_statistics(model, ids, tmp_path):
    prompt = [int(t) for t in np.array(ids[0])]
    with inspect.trace(model, "blocks.*.router.topk") as full, inspect.record_routing(model) as rec:
        generated = list(stream_tokens(model, prompt, max_tokens=6))  # no tokenizer here: the token loop
    n = full["blocks.0.router.topk.ids"].shape[0]
    assert len(prompt) + len(generated) - 1 <= n <= len(prompt) + len(generated)
    np.testing.assert_array_equal(rec.ids[:, 1], np.array(full["blocks.1.router.topk.ids"]))
    with inspect.trace(model, "blocks.0.resid.post", last=5) as ring, inspect.trace(model, "blocks.0.resid.post") as all_:
        cache = model.make_cache()
        model(ids, cache)
        for t in (3, 4, 5):
            model(mx.array([[t]]), cache)
    np.testing.assert_array_equal(np.array(ring["blocks.0.resid.post"]), np.array(all_["blocks.0.resid.post"])[:, -5:])
    with inspect.trace(model, ["blocks.0.resid.post", "blocks.0.router.topk"], stats=True) as st:
        model(ids)
    x = np.array(all_["blocks.0.resid.post"])[0, :T].astype(np.float64)
    s = st["blocks.0.resid.post"]
    np.testing.assert_allclose(s["mean"], x.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s["var"], x.var(axis=0), rtol=1e-4, atol=1e-6)
    assert int(s["count"]) == T and st["blocks.0.router.topk.ids"]["counts"].sum() == T * 4
    for suffix in ("npz", "safetensors"):
        saved = full.save(tmp_path / f"t.{suffix}")
        loaded = np.load(saved) if suffix == "npz" else mx.load(str(saved))
        np.testing.assert_array_equal(np.array(loaded["blocks.0.router.topk.ids"]), np.array(full["blocks.0.router.topk.ids"]))
    rec.save(tmp_path / "r.jsonl", tokens=prompt + generated, first_generated=len(prompt))
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(rows) == n and rows[0]["experts"] == rec.ids[0].tolist() and rows[-1]["generated"]


def test_capture_of_a_chat_turn_on_a_budgeted_model_with_streamed_experts(vocab_model_dir):
    from mlx_gptoss.memory import budget_for_slots, read_tensors

    cfg = mlx_gptoss.load(vocab_model_dir).config
    budget = budget_for_slots(cfg, read_tensors(vocab_model_dir), 4, context=512)
    plain, streamed = mlx_gptoss.load(vocab_model_dir), mlx_gptoss.load(vocab_model_dir, memory_budget=budget, context=512)
    assert streamed.stream_stats is not None
    got = []
    for m in (plain, streamed):
        with inspect.record_routing(m) as rec:
            m.chat(max_tokens=8).send("Hello")
        got.append(rec.ids)
    np.testing.assert_array_equal(got[0], got[1])


# -- routing statistics ----------------------------------------------------------------------------


def test_statistics_count_what_the_capture_saw(model, ids, tmp_path, path):
    stats = inspect.RoutingStats.empty(model)
    with inspect.record_routing(model) as rec:
        model(ids)
    kinds = ["prompt"] * 10 + ["final"] * (T - 10)
    stats.add(rec.ids, rec.weights, kinds)
    for i in range(2):
        np.testing.assert_array_equal(stats.counts[i], np.bincount(rec.ids[:, i].reshape(-1), minlength=8))
        np.testing.assert_array_equal(np.diag(stats.coactivation[i]), stats.counts[i])
    assert stats.tokens == T and sum(stats.tokens_by_kind.values()) == T
    assert (stats.by_kind["prompt"] + stats.by_kind["final"] == stats.counts).all()
    assert np.all(stats.usage_entropy() <= 3 + 1e-9)
    loaded = inspect.RoutingStats.load(stats.save(tmp_path / "s.json"))
    assert loaded.to_json() == stats.to_json()
    other = mlx_gptoss.load(tiny_model(tmp_path / "other", vocab=512, layers=2, seed=6))
    with pytest.raises(ValueError, match="collected on another model"):
        loaded.check_model(other)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="bad.json: not a routing statistics file"):
        inspect.RoutingStats.load(tmp_path / "bad.json")


def test_token_kinds_and_statistics_over_conversations(vocab_model_dir):
    from openai_harmony import Author, Conversation, Message, Role

    from mlx_gptoss.testing import rig

    model = mlx_gptoss.load(vocab_model_dir)
    enc = model.tokenizer.encoding
    convo = [Message.from_role_and_content(Role.USER, "Weather?"),
             Message.from_role_and_content(Role.ASSISTANT, '{"city": "Paris"}').with_channel("commentary").with_recipient("functions.w"),
             Message.from_author_and_content(Author.new(Role.TOOL, "functions.w"), "sunny").with_channel("commentary"),
             Message.from_role_and_content(Role.ASSISTANT, "It is sunny.").with_channel("final")]  # fmt: skip
    tokens = enc.render_conversation(Conversation.from_messages(convo))
    kinds = inspect.token_kinds(enc, tokens)
    text = {k: enc.decode([t for t, kk in zip(tokens, kinds) if kk == k]) for k in set(kinds)}
    assert text["tool_call"] == '{"city": "Paris"}' and text["final"] == "It is sunny."
    assert "Weather?" in text["prompt"] and "sunny" in text["prompt"] and "<|start|>assistant" in text["header"]
    stats = inspect.routing_stats(model, [convo, convo[:1]])
    assert stats.tokens == len(tokens) + len(enc.render_conversation(Conversation.from_messages(convo[:1])))
    rig(model, "A rigged answer.")
    gen = inspect.routing_stats(model, [convo[:1]], generate=True, max_tokens=16)
    assert gen.tokens_by_kind["final"] == len(enc.encode("A rigged answer."))


# -- pruning ---------------------------------------------------------------------------------------


def test_a_pruned_checkpoint_computes_the_model_with_those_experts_removed(model, path, ids, tmp_path):
    stats = inspect.RoutingStats.empty(model)
    with inspect.record_routing(model) as rec:
        model(ids)
    stats.add(rec.ids, rec.weights)
    kept = inspect.kept_experts(stats, 6)
    dst = inspect.prune_experts(path, tmp_path / "pruned", keep=6, stats=stats)
    pruned = mlx_gptoss.load(dst, dtype=mx.float32)
    assert pruned.config.num_local_experts == 6
    removed = {i: [e for e in range(8) if e not in k] for i, k in kept.items()}
    with inspect.remove_experts(model, removed), inspect.trace(model, "blocks.*.router.topk") as full:
        want = np.array(model(ids))
    with inspect.trace(pruned, "blocks.*.router.topk") as small:
        got = np.array(pruned(ids))
    for i, k in kept.items():  # the same experts, renumbered: pruned id j is original k[j]
        name = f"blocks.{i}.router.topk.ids"
        np.testing.assert_array_equal(np.sort(np.array(k)[np.array(small[name])]), np.sort(np.array(full[name])))
    # float32 rounding only: a 6-row router matmul may block its sums differently from an 8-row one
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    record = json.loads((dst / "config.json").read_text())["mlx_gptoss"]["pruned"]
    assert record["removed"] == {str(i): r for i, r in removed.items()} and record["experts_before"] == 8
    # it is a conversion like any other: exported, budgeted, trained
    from mlx_gptoss.lora.adapters import LoRASpec, apply_lora
    from mlx_gptoss.lora.train import TrainConfig, train
    from mlx_gptoss.memory import budget_for_slots, read_tensors
    from mlx_gptoss_convert.export import export

    export(dst, tmp_path / "hf", fmt="hf", progress=False)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_local_experts"] == 6
    budget = budget_for_slots(pruned.config, read_tensors(dst), 4, context=256, float_bytes=4)
    np.testing.assert_array_equal(np.array(mlx_gptoss.load(dst, dtype=mx.float32, memory_budget=budget, context=256)(ids)), got)
    apply_lora(pruned, LoRASpec(rank=2, alpha=4.0))
    ex = [type("Ex", (), {"ids": list(range(1, 12)), "targets": [False] + [True] * 10})()]
    assert train(pruned, ex, None, TrainConfig(tmp_path / "adapter", iterations=1)).steps == 1


def test_saliency_is_weight_times_expert_output_norm(model, ids):
    """Saliency per expert = sum over its tokens of routing weight x |expert output|, checked against
    the float64 experts of the reference above."""
    stats = inspect.RoutingStats.empty(model)
    with inspect.hooked(model, inspect.routing.saliency_hooks(model, stats)), inspect.trace(model, "blocks.0.*") as t:
        model(ids)
    cfg, layer = model.config, model.layers[0]
    xn = rms(f64(t["blocks.0.resid.mid"])[0], f64(layer.post_attention_layernorm.weight), cfg.rms_norm_eps)
    want = np.zeros(8)
    for n in range(T):
        for e, w in zip(np.array(t["blocks.0.router.topk.ids"])[n], f64(t["blocks.0.router.topk.weights"])[n]):
            mlp = layer.mlp
            h = mxfp4(mlp.gate_up.weight[e], mlp.gate_up.scales[e]) @ xn[n] + f64(mlp.gate_up.bias[e])
            gate, up = np.minimum(h[0::2], cfg.swiglu_limit), np.clip(h[1::2], -cfg.swiglu_limit, cfg.swiglu_limit)
            y = mxfp4(mlp.down.weight[e], mlp.down.scales[e]) @ ((up + 1) * gate / (1 + np.exp(-cfg.swiglu_alpha * gate)))
            want[e] += w * np.linalg.norm(y + f64(mlp.down.bias[e]))
    np.testing.assert_allclose(stats.saliency[0], want, rtol=1e-4)
    assert stats.ranking("saliency").shape == (2, 8)


def test_pruning_refuses_bad_requests(model, path, ids, tmp_path):
    stats = inspect.RoutingStats.empty(model)
    for keep in (3, 8, 0, "6"):
        with pytest.raises(ValueError, match=r"--keep must be an integer in 4\.\.7"):
            inspect.prune_experts(path, tmp_path / "p", keep=keep, stats=stats)
    other = inspect.RoutingStats.empty(mlx_gptoss.load(tiny_model(tmp_path / "o", vocab=512, layers=2, seed=7)))
    with pytest.raises(ValueError, match="collected on another model"):
        inspect.prune_experts(path, tmp_path / "p", keep=6, stats=other)
    with pytest.raises(ValueError, match="hold no saliency"):
        inspect.prune_experts(path, tmp_path / "p", keep=6, stats=stats, by="saliency")
    assert not (tmp_path / "p").exists()
