"""LoRA on a memory-budgeted model (experts streamed into slots) and the training memory plan.

The budgeted model keeps 4 of the tiny model's 8 experts per layer resident; its loss, logits and
every adapter gradient (with per-block gradient checkpointing, so each streamed layer runs again in
the backward pass) must equal the unbudgeted model's.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import TINY
from mlx.utils import tree_flatten

import mlx_gptoss
from mlx_gptoss.lora.adapters import LoRASpec, apply_lora, lora_parameters, set_lora_parameters
from mlx_gptoss.lora.train import batch_loss, loss_and_grads, make_batch
from mlx_gptoss.memory import BudgetError, budget_for_slots, plan_memory, plan_training, read_tensors
from mlx_gptoss.streaming import StreamedMoE

SPEC = LoRASpec(rank=4, alpha=8.0, targets=("attention", "router", "experts"))


class _Ex:
    def __init__(self, ids, targets):
        self.ids, self.targets = ids, targets


def _batch(T: int, seed: int):
    ids = [int(t) for t in np.random.default_rng(seed).integers(0, TINY.vocab_size, T)]
    return make_batch([_Ex(ids, [False] + [True] * (T - 1))])


def _with_adapter(folder, budget):
    """The tiny model (float32) with the same random, non-zero adapter on every layer."""
    m = mlx_gptoss.load(folder, dtype=mx.float32, memory_budget=budget, context=256)
    apply_lora(m, SPEC, seed=1)
    rng = np.random.default_rng(0)
    flat = {k: mx.array(rng.normal(0, 0.2, v.shape).astype(np.float32)) for k, v in lora_parameters(m).items()}
    set_lora_parameters(m, flat)
    return m


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    base = _with_adapter(tiny_model_dir, None)
    budget = budget_for_slots(TINY, read_tensors(tiny_model_dir), 4, context=256, float_bytes=4)
    small = _with_adapter(tiny_model_dir, budget)
    assert small.memory_plan.expert_slots == 4 and all(isinstance(layer.mlp, StreamedMoE) for layer in small.layers)
    return base, small


def _loss_and_grads(model, batch, between=None):
    def loss_fn(m):
        loss = batch_loss(m, batch, chunk=8, checkpoint=True)
        if between is not None:  # runs after the forward pass and before the backward's recomputation
            loss = loss + 0 * mx.stop_gradient(between(m).sum())
        return loss

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    mx.eval(loss, grads)
    return loss.item(), dict(tree_flatten(grads))


def _assert_same(got, want, experts=True):
    # the same float32 computation in another association (slot-indexed gathers, groups of experts):
    # equal to rounding, ~1e-6 of the norm after the backward through 4 layers; a wrong expert or a
    # missing update is off by orders of magnitude more
    (loss_g, g), (loss_w, w) = got, want
    assert abs(loss_g - loss_w) <= 1e-6 * abs(loss_w)
    assert g.keys() == w.keys() and any(".experts_lora." in k for k in w) == experts
    for k in w:
        a, b = np.array(g[k], dtype=np.float64), np.array(w[k], dtype=np.float64)
        assert np.linalg.norm(b) > 0, k  # every adapter gets a gradient (none silently skipped)
        assert np.linalg.norm(a - b) <= 5e-6 * np.linalg.norm(b), k


@pytest.mark.parametrize("T", [1, 40])  # 1 token: its 4 experts fit the slots; 40: grouped, 8 experts > 4 slots
def test_budget_gives_the_same_loss_and_adapter_gradients(pair, T):
    base, small = pair
    batch = _batch(T + 1, seed=T)
    _assert_same(_loss_and_grads(small, batch), _loss_and_grads(base, batch))


def test_slots_refilled_between_forward_and_recomputation_do_not_change_gradients(pair):
    # another pass (other tokens, other experts) between the forward and the backward evicts the
    # experts the forward used: the recomputation must find them by expert id, not by slot
    base, small = pair
    batch, other = _batch(30, seed=7), mx.array(np.random.default_rng(8).integers(0, TINY.vocab_size, (1, 25)))
    want = _loss_and_grads(base, batch)
    misses = sum(small.stream_stats.misses)
    _assert_same(_loss_and_grads(small, batch, between=lambda m: m(other)), want)
    assert sum(small.stream_stats.misses) > misses


def _some_layers(folder, budget, spec):
    m = mlx_gptoss.load(folder, dtype=mx.float32, memory_budget=budget, context=256)
    apply_lora(m, spec, seed=1)
    rng = np.random.default_rng(2)
    set_lora_parameters(m, {k: mx.array(rng.normal(0, 0.2, v.shape).astype(np.float32)) for k, v in lora_parameters(m).items()})
    m.norm.unfreeze()  # a trainable parameter above the blocks too
    return m


def _layerwise(m, batch, seed=0):
    loss, grads = loss_and_grads(m, batch, chunk=8, seed=seed)
    mx.eval(loss, grads)
    return loss.item(), dict(tree_flatten(grads))


@pytest.mark.parametrize("budgeted", [False, True])  # with a budget: 40 tokens use all 8 experts, 4 slots
def test_layerwise_gradients_equal_plain_gradients_with_adapters_on_some_layers(tiny_model_dir, budgeted):
    # the trainer's backward (forward outside the transform, then one block's graph at a time, down
    # to the lowest adapted layer) against the whole model's un-checkpointed gradient
    budget = budget_for_slots(TINY, read_tensors(tiny_model_dir), 4, context=256, float_bytes=4) if budgeted else None
    m = _some_layers(
        tiny_model_dir, budget, LoRASpec(rank=4, alpha=8.0, targets=("attention", "router", "experts"), layers=(1, 3))
    )
    batch = _batch(41, seed=5)
    got = _layerwise(m, batch)
    loss, grads = nn.value_and_grad(m, lambda mm: batch_loss(mm, batch, chunk=1000, checkpoint=False))(m)
    mx.eval(loss, grads)
    want = (loss.item(), dict(tree_flatten(grads)))
    assert "norm.weight" in got[1] and not any(k.startswith(("layers.0.", "layers.2.")) for k in got[1])
    _assert_same(got, want)


def test_layerwise_gradients_draw_the_forward_dropout_masks_again(tiny_model_dir):
    # each block reseeds from (seed, layer) in the forward and in its recomputation, as the
    # checkpointed loss does: the same loss and gradients as that loss under the same seed
    m = _some_layers(
        tiny_model_dir, None, LoRASpec(rank=4, alpha=8.0, dropout=0.3, targets=("attention", "router"), layers=(2, 3))
    )
    m.train()
    batch = _batch(30, seed=6)
    got = _layerwise(m, batch, seed=11)
    loss, grads = nn.value_and_grad(m, lambda mm: batch_loss(mm, batch, chunk=8, checkpoint=True, seed=11))(m)
    mx.eval(loss, grads)
    m.eval()
    _assert_same(got, (loss.item(), dict(tree_flatten(grads))), experts=False)
    assert got[0] != pytest.approx(_layerwise(m, batch, seed=11)[0], rel=1e-6)  # dropout did change the loss


@pytest.mark.filterwarnings("ignore:the model was loaded with an inference memory plan")
def test_a_training_step_under_a_budget_needs_about_the_memory_of_one_without(tiny_model_dir, tmp_path):
    # streamed slots are rewritten group by group: under a whole-model gradient transform every
    # slot version a group computed with stayed alive for the step (8x the step's memory here)
    from mlx_gptoss.lora.train import TrainConfig, train

    example = _Ex([int(t) for t in np.random.default_rng(0).integers(0, TINY.vocab_size, 200)], [False] + [True] * 199)
    step_bytes = {}
    for name, budget in (
        ("resident", None),
        ("budgeted", budget_for_slots(TINY, read_tensors(tiny_model_dir), 4, context=256, float_bytes=4)),
    ):
        m = mlx_gptoss.load(tiny_model_dir, dtype=mx.float32, memory_budget=budget, context=256)
        apply_lora(m, LoRASpec(rank=4, targets=("attention", "experts")), seed=0)
        mx.eval(m.parameters())
        mx.clear_cache()
        before = mx.get_active_memory()
        res = train(m, [example], None, TrainConfig(tmp_path / name, iterations=1, loss_chunk=64, save_every=0, eval_every=0))
        step_bytes[name] = res.peak_memory_gb * 1e9 - before
    assert 0 < step_bytes["budgeted"] < 1.5 * step_bytes["resident"], step_bytes


def test_logits_with_an_adapter_equal_with_and_without_budget(pair):
    base, small = pair
    ids = mx.array(np.random.default_rng(3).integers(0, TINY.vocab_size, (1, 50)))
    want = np.array(base(ids))
    np.testing.assert_allclose(np.array(small(ids)), want, rtol=1e-5, atol=1e-5)
    c1, c2 = base.make_cache(), small.make_cache()
    base(ids[:, :10], c1), small(ids[:, :10], c2)
    for t in range(10, 14):  # decode: one token's 4 experts through the slot path
        np.testing.assert_allclose(
            np.array(small(ids[:, t : t + 1], c2)), np.array(base(ids[:, t : t + 1], c1)), rtol=1e-5, atol=1e-5
        )


# -- the training memory plan ---------------------------------------------------------------------


def test_training_plan_counts_adapters_optimizer_and_activations(tiny_model_dir):
    tensors = read_tensors(tiny_model_dir)
    spec = LoRASpec(rank=4, targets=("attention", "experts"), layers=(1, 3))
    m = mlx_gptoss.load(tiny_model_dir, dtype=mx.float32)
    apply_lora(m, spec)
    n_params = sum(v.size for v in lora_parameters(m).values())
    plan = plan_training(TINY, tensors, spec, max_seq_len=64, float_bytes=4)
    by_name = {c.name.split(" (")[0]: c.nbytes for c in plan.components}
    assert by_name["adapters"] == 4 * n_params and by_name["adapter gradients"] == 4 * n_params
    assert by_name["AdamW state"] == 8 * n_params and "KV cache" not in by_name
    assert by_name["saved block inputs"] == (TINY.num_hidden_layers + 1) * 64 * TINY.hidden_size * 4
    longer = plan_training(TINY, tensors, spec, max_seq_len=128, float_bytes=4)
    assert longer.mlx_bytes > plan.mlx_bytes and "training on sequences of up to 128 tokens" in longer.table()
    # under a budget the weights are placed as for inference (embedding on the host, expert slots)
    # beside the training extras
    assert [c.nbytes for c in plan.components[:5]] == [
        c.nbytes for c in plan_memory(TINY, tensors, None, float_bytes=4).components[:5]
    ]
    extras = sum(c.nbytes for c in plan.components[5:])
    # ... and, streaming, one more copy of a layer's slots (a recomputed block re-reads experts
    # into slots its first experts still hold for the backward)
    slots = TINY.num_local_experts - 3
    budget = sum(c.nbytes for c in plan.components[1:5]) - 3 * TINY.num_hidden_layers * plan.expert_bytes + extras
    budget += slots * plan.expert_bytes
    tight = plan_training(TINY, tensors, spec, max_seq_len=64, budget=budget, float_bytes=4)
    assert tight.expert_slots == slots and tight.mlx_bytes <= budget
    assert {c.name: c.nbytes for c in tight.components}["expert slots re-read in a recompute"] == slots * plan.expert_bytes
    assert plan_training(TINY, tensors, spec, max_seq_len=64, budget=budget - 1, float_bytes=4).expert_slots == slots - 1
    with pytest.raises(BudgetError, match=r"training on 1 x 64 tokens .* shorter --max-seq-len"):
        plan_training(TINY, tensors, spec, max_seq_len=64, budget=extras, float_bytes=4)


def test_cli_doctor_prints_the_training_plan(tiny_model_dir):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "mlx_gptoss.cli", "doctor", "-m", str(tiny_model_dir), "--train-seq-len", "64",
           "--lora-rank", "4", "--lora-targets", "attention,experts", "--lora-layers", "last:2"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "LoRA rank 4 on attention, experts of layers 2,3, batch 1 x 64 tokens" in res.stdout
    assert "AdamW state" in res.stdout and "saved block inputs (T=64, B=1)" in res.stdout and "KV cache" not in res.stdout
    bad = subprocess.run(cmd[:-2] + ["--lora-layers", "last:9"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "1..4" in bad.stderr + bad.stdout


def test_the_planner_defaults_are_the_trainers():
    # doctor and plan_training's callers rely on these agreeing: a plan for other chunk sizes
    # would under- or over-count the step's activations
    import inspect

    from mlx_gptoss.lora.train import TrainConfig

    params = inspect.signature(plan_training).parameters
    assert params["loss_chunk"].default == TrainConfig.loss_chunk
    assert params["attention_chunk"].default == TrainConfig.attention_chunk


def test_the_python_api_plans_for_training_and_warns_about_an_inference_plan(tiny_model_dir, tmp_path):
    import warnings

    from mlx_gptoss.lora.plan import training_plan
    from mlx_gptoss.lora.train import TrainConfig, train

    spec = LoRASpec(rank=4, targets=("attention", "experts"), layers=(3,))
    example = _Ex([int(t) for t in np.random.default_rng(1).integers(0, TINY.vocab_size, 40)], [False] + [True] * 39)
    cfg = TrainConfig(tmp_path / "planned", iterations=1, max_seq_len=64, save_every=0, eval_every=0)
    full = training_plan(tiny_model_dir, spec, cfg, 10**15)
    plan = training_plan(tiny_model_dir, spec, cfg, full.mlx_bytes - 1)  # just short of all resident
    assert plan.training and plan.streaming
    model = mlx_gptoss.load(tiny_model_dir, dtype=mx.float32, memory_budget=plan)
    assert model.memory_plan is plan and isinstance(model.layers[3].mlp, StreamedMoE)
    apply_lora(model, spec, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a training plan: no warning
        assert train(model, [example], None, cfg, spec=spec).status == "completed"
    model = mlx_gptoss.load(tiny_model_dir, dtype=mx.float32, memory_budget=10**15)  # planned for inference
    apply_lora(model, spec, seed=0)
    cfg2 = TrainConfig(tmp_path / "inference", iterations=1, max_seq_len=64, save_every=0, eval_every=0)
    with pytest.warns(UserWarning, match="inference memory plan"):
        train(model, [example], None, cfg2, spec=spec)
