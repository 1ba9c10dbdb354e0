"""The LoRA training loop: loss, accumulation, checkpointing, resume after SIGKILL, cancel, CLI errors.

The loop trains whatever is trainable: most tests train the tiny model's own norms (the base
frozen, the RMSNorm weights unfrozen), so they test the loop apart from the adapters; the resume,
budget and CLI tests train real adapters.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_gptoss
from mlx_gptoss.lora.checkpoint import CheckpointError, latest_checkpoint
from mlx_gptoss.lora.train import TrainConfig, TrainConfigError, batch_loss, make_batch, train

CLI = [sys.executable, "-m", "mlx_gptoss.cli"]

# A process that builds the model and trains: the SIGKILL test runs it in a subprocess.
TRAIN_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import mlx.core as mx
    import mlx_gptoss
    from types import SimpleNamespace as E
    from mlx_gptoss.lora.train import TrainConfig, train

    model_dir, out, resume, slow = sys.argv[1], sys.argv[2], sys.argv[3] == "1", float(sys.argv[4])
    model = mlx_gptoss.load(model_dir, dtype=mx.float32)
    spec = None
    if sys.argv[5] == "lora":
        from mlx_gptoss.lora.adapters import LoRASpec, apply_lora
        spec = LoRASpec(rank=4, targets=("attention", "experts"), layers=(2, 3))
        apply_lora(model, spec, seed=1)
    else:
        model.freeze()
        for layer in model.layers:
            layer.input_layernorm.unfreeze()
            layer.post_attention_layernorm.unfreeze()
    rows = [[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 6, 8, 10], [3, 7, 11, 15, 19, 23], [30, 31, 32, 33]]
    ex = [E(ids=r, targets=[False, False] + [True] * (len(r) - 2), line=i + 1) for i, r in enumerate(rows)]
    cfg = TrainConfig(out, iterations=8, batch_size=2, learning_rate=1e-2, save_every=2, eval_every=0, seed=7)
    train(model, ex, None, cfg, spec=spec, resume=resume, on_progress=lambda p: time.sleep(slow))
    """
)


def _norms_trainable(model: nn.Module) -> nn.Module:
    model.freeze()
    for layer in model.layers:
        layer.input_layernorm.unfreeze()
        layer.post_attention_layernorm.unfreeze()
    return model


@pytest.fixture
def model(tiny_model_dir):
    return _norms_trainable(mlx_gptoss.load(tiny_model_dir, dtype=mx.float32))


def _ex(ids, n_prompt, line=1):
    return SimpleNamespace(ids=list(ids), targets=[False] * n_prompt + [True] * (len(ids) - n_prompt), line=line)


EXAMPLES = [_ex([1, 5, 9, 13, 17, 21, 25, 29], 3, 1), _ex([2, 4, 6, 8, 10], 1, 2), _ex([3, 7, 11, 15, 19, 23], 2, 3)]


def _flat(tree) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(tree)}


def _grads(model, batches, **kw):
    """Token-mean loss and gradients over ``batches`` (summed cross-entropy / trained tokens)."""
    n = sum(b.n_targets for b in batches)
    fn = nn.value_and_grad(model, lambda m: sum(batch_loss(m, b, **kw) for b in batches) / n)
    loss, g = fn(model)
    mx.eval(loss, g)
    return loss.item(), _flat(g)


def _assert_close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=tol, atol=tol, err_msg=k)


def test_loss_decreases_on_a_repeated_dataset(model, tmp_path):
    cfg = TrainConfig(tmp_path / "run", iterations=25, batch_size=3, learning_rate=3e-2, save_every=0, eval_every=0)
    result = train(model, EXAMPLES, EXAMPLES, cfg)
    losses = [h["loss"] for h in result.history if h["kind"] == "train"]
    assert result.status == "completed" and result.steps == 25
    assert losses[-1] < 0.8 * losses[0]
    assert result.val_loss is not None and result.val_loss < losses[0]
    assert (tmp_path / "run" / "trainable.safetensors").is_file()
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == list(range(1, 26))
    assert lines[-1]["kind"] == "eval" and lines[-1]["val_loss"] == pytest.approx(result.val_loss)


def test_loss_is_the_cross_entropy_at_trained_positions_chunked_or_not(model):
    batch = make_batch(EXAMPLES)
    logits = model(batch.ids).astype(mx.float32)  # the plain forward: the reference
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    ref = 0.0
    for b, e in enumerate(EXAMPLES):
        ref -= sum(logp[b, i - 1, e.ids[i]].item() for i in range(1, len(e.ids)) if e.targets[i])
    assert batch.n_targets == sum(sum(e.targets) for e in EXAMPLES)
    for chunk in (1, 4, 1000):
        for ckpt in (True, False):
            assert batch_loss(model, batch, chunk=chunk, checkpoint=ckpt).item() == pytest.approx(ref, rel=1e-5)


def test_checkpointed_gradients_equal_plain_gradients(model):
    batch = make_batch(EXAMPLES)
    loss_c, g_c = _grads(model, [batch], checkpoint=True, chunk=4)
    loss_p, g_p = _grads(model, [batch], checkpoint=False, chunk=1000)
    assert loss_c == pytest.approx(loss_p, rel=1e-6)
    assert any(np.abs(v).max() > 0 for v in g_p.values())
    _assert_close(g_c, g_p, 1e-5)


def test_two_accumulated_batches_of_one_equal_one_batch_of_two(model, tiny_model_dir, tmp_path):
    # the step's loss is the mean over all its trained tokens, whichever micro-batch holds them
    two = EXAMPLES[:2]
    loss_b, g_b = _grads(model, [make_batch(two)])
    loss_a, g_a = _grads(model, [make_batch([e]) for e in two])
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    _assert_close(g_a, g_b, 1e-5)
    # and so the loop's steps agree
    runs = {}
    for name, bs, ga in (("batch", 2, 1), ("accum", 1, 2)):
        m = _norms_trainable(mlx_gptoss.load(tiny_model_dir, dtype=mx.float32))
        cfg = TrainConfig(tmp_path / name, iterations=3, batch_size=bs, grad_accumulation=ga, learning_rate=1e-2,
                          save_every=0, eval_every=0, warmup=0)  # fmt: skip
        res = train(m, two, None, cfg)
        runs[name] = ([h["loss"] for h in res.history], _flat(m.trainable_parameters()))
    np.testing.assert_allclose(runs["batch"][0], runs["accum"][0], rtol=1e-5)
    _assert_close(runs["batch"][1], runs["accum"][1], 1e-5)


def test_training_runs_the_differentiable_kernel_twins_and_restores_the_mode(model, tmp_path):
    # the custom GPU kernels have no gradient: on a GPU, training through them would fail
    from mlx_gptoss import kernels

    seen = []
    kernels.set_mode("auto")
    try:
        cfg = TrainConfig(tmp_path / "run", iterations=2, save_every=0, eval_every=1)
        train(model, EXAMPLES, EXAMPLES, cfg, on_progress=lambda p: seen.append(kernels.mode()))
        assert seen == ["twin"] * 4 and kernels.mode() == "auto"
    finally:
        kernels.set_mode(os.environ.get("MLX_GPTOSS_KERNELS", "auto"))


def test_all_masked_batches_are_skipped_without_nan(model, tmp_path):
    masked = _ex([4, 5, 6, 7], 4, line=9)
    assert batch_loss(model, make_batch([masked])).item() == 0.0
    cfg = TrainConfig(tmp_path / "run", iterations=4, batch_size=1, learning_rate=1e-2, save_every=0, eval_every=0)
    result = train(model, [masked, EXAMPLES[0]], [masked], cfg)
    assert result.skipped_steps == 2  # each epoch visits the masked example once
    assert all(np.isfinite(v).all() for v in _flat(model.trainable_parameters()).values())
    assert all(h["loss"] is None or np.isfinite(h["loss"]) for h in result.history)
    assert result.val_loss is None  # no trained token to validate on: None, not NaN


def test_cancel_from_another_thread_saves_a_checkpoint_and_resume_finishes(model, tmp_path):
    cancel = threading.Event()

    def on_progress(p):
        if p.kind == "train" and p.step == 2:
            t = threading.Thread(target=cancel.set)
            t.start()
            t.join()

    cfg = TrainConfig(tmp_path / "run", iterations=5, learning_rate=1e-2, save_every=0, eval_every=0)
    result = train(model, EXAMPLES, None, cfg, cancel=cancel, on_progress=on_progress)
    assert (result.status, result.steps) == ("cancelled", 2)
    assert json.loads((latest_checkpoint(tmp_path / "run") / "state.json").read_text())["step"] == 2
    assert (tmp_path / "run" / "trainable.safetensors").is_file()  # what was trained so far
    with pytest.raises(CheckpointError, match="resume"):
        train(model, EXAMPLES, None, cfg)  # a fresh run would overwrite the checkpoint
    result = train(model, EXAMPLES, None, cfg, resume=True)
    assert (result.status, result.steps) == ("completed", 5)
    assert (tmp_path / "run" / "trainable.safetensors").is_file()


@pytest.mark.parametrize("trained", ["norms", "lora"])
def test_resume_after_sigkill_ends_with_the_same_weights(tiny_model_dir, tmp_path, trained):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    weights = "trainable.safetensors" if trained == "norms" else "adapters.safetensors"

    def run(out: Path, resume: bool) -> None:
        subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(out), "1" if resume else "0", "0",
                        trained], check=True, capture_output=True, timeout=120)  # fmt: skip

    run(tmp_path / "whole", resume=False)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_model_dir), str(killed), "0", "0.3", trained],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while latest_checkpoint(killed) is None:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = json.loads((latest_checkpoint(killed) / "state.json").read_text())["step"]
    assert 2 <= saved < 8
    run(killed, resume=True)

    whole = mx.load(str(tmp_path / "whole" / weights))
    resumed = mx.load(str(killed / weights))
    assert any(np.abs(np.array(v)).max() > 0 for k, v in whole.items() if "lora_b" in k or trained == "norms")
    _assert_close(_flat(resumed), _flat(whole), 1e-6)
    # the metrics of the lost steps were dropped, then written again once
    steps = [json.loads(s)["step"] for s in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_a_budgeted_model_gives_the_same_gradients(tiny_model_dir):
    # non-resident experts are read from disk in the forward pass and again in the recomputation
    from conftest import TINY

    from mlx_gptoss.lora.adapters import LoRASpec, apply_lora, lora_parameters, set_lora_parameters
    from mlx_gptoss.memory import budget_for_slots, read_tensors

    budget = budget_for_slots(TINY, read_tensors(tiny_model_dir), 4, context=256, float_bytes=4)
    batch = make_batch([_ex(range(5, 45), 5)])
    grads = {}
    for name, kw in (("resident", {}), ("budgeted", {"memory_budget": budget, "context": 256})):
        m = mlx_gptoss.load(tiny_model_dir, dtype=mx.float32, **kw)
        apply_lora(m, LoRASpec(rank=4, targets=("attention", "router")), seed=0)
        rng = np.random.default_rng(0)  # B away from zero, so A gets a gradient too
        set_lora_parameters(m, {k: mx.array(rng.normal(0, 0.1, v.shape).astype(np.float32)) if "lora_b" in k else v
                                for k, v in lora_parameters(m).items()})  # fmt: skip
        grads[name] = _grads(m, [batch], checkpoint=True)
        if name == "budgeted":
            assert m.stream_stats.as_dict()["tokens"] == 2 * 40  # the forward pass and the recomputation
    assert grads["budgeted"][0] == pytest.approx(grads["resident"][0], rel=1e-6)
    _assert_close(grads["budgeted"][1], grads["resident"][1], 1e-5)


def test_config_errors_name_the_option(model, tmp_path):
    for kw, msg in [({"iterations": 2, "epochs": 1}, "not both"), ({"iterations": 0}, "iterations"),
                    ({"batch_size": 0}, "batch_size"), ({"learning_rate": -1.0}, "learning_rate"),
                    ({"schedule": "linear"}, "schedule"), ({"max_grad_norm": 0.0}, "max_grad_norm")]:  # fmt: skip
        with pytest.raises(TrainConfigError, match=msg):
            train(model, EXAMPLES, None, TrainConfig(tmp_path, **kw))
    with pytest.raises(ValueError, match="line 1: 8 tokens, more than max_seq_len 4"):
        train(model, EXAMPLES, None, TrainConfig(tmp_path, max_seq_len=4))
    model.freeze()
    with pytest.raises(ValueError, match="no trainable parameter"):
        train(model, EXAMPLES, None, TrainConfig(tmp_path))


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig("x", learning_rate=1e-3, warmup=4, min_lr_ratio=0.1)
    lrs = [cfg.lr_at(s, 20) for s in range(20)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert TrainConfig("x").warmup_steps(50) == 5 and TrainConfig("x").warmup_steps(5000) == 100
    flat = TrainConfig("x", schedule="constant", warmup=0)
    assert {flat.lr_at(s, 10) for s in range(10)} == {1e-4}


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"prompt": "What is 2+2?", "completion": "4"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "lora", "train", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_bad_options_and_data_are_one_line_errors(vocab_model_dir, chats, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "completion": "y"}\n{"prompt": 1, "completion": "y"}\n')
    m, out = str(vocab_model_dir), str(tmp_path / "out")
    cases = [
        (["-m", str(tmp_path / "nope"), "--data", str(chats), "-o", out], "nope"),
        (["-m", m, "--data", str(bad), "-o", out], f"{bad}:2: field prompt"),
        (["-m", m, "--data", str(tmp_path / "missing.jsonl"), "-o", out], "missing.jsonl: no such file"),
        (["-m", m, "--data", str(chats), "-o", out, "--layers", "last:x"], "--layers"),
        (["-m", m, "--data", str(chats), "-o", out, "--layers", "9"], "layers [9] do not exist"),
        (["-m", m, "--data", str(chats), "-o", out, "--targets", "attention,mlp"], "targets"),
        (["-m", m, "--data", str(chats), "-o", out, "--iters", "2", "--epochs", "1"], "not both"),
        (["-m", m, "--data", str(chats), "-o", out, "--resume"], "no checkpoint to resume from"),
        (["-m", m, "--data", str(chats), "-o", out, "--memory-budget", "lots"], "cannot read the size 'lots'"),
        (["-m", m, "--data", str(chats), "-o", out, "--memory-budget", "1MB"], "training on 1 x 2048 tokens"),
    ]
    for args, msg in cases:
        r = _cli(*args)
        assert r.returncode == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr and msg in r.stderr, (args, r.stderr)
        assert r.stderr.strip().splitlines()[-1].startswith("Error: "), (args, r.stderr)


def test_cli_ctrl_c_saves_a_checkpoint_and_resume_completes(vocab_model_dir, chats, tmp_path):
    out = tmp_path / "adapter"
    args = ["-m", str(vocab_model_dir), "--data", str(chats), "--valid", str(chats), "-o", str(out),
            "--targets", "attention,experts", "--layers", "last:1", "--save-every", "1000", "--eval-every", "0"]  # fmt: skip
    proc = subprocess.Popen([*CLI, "lora", "train", *args, "--iters", "400"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    # a second run into the same folder while the first trains: refused, nothing of the first touched
    second = _cli(*args, "--iters", "3")
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"{out}: another training run into it is running (pid {proc.pid}" in second.stderr.strip().splitlines()[-1]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err  # stopped by Ctrl-C, as generate: 128 + SIGINT
    assert "sequences from 2 lines" in err  # the data summary comes first
    assert "cancelled at step" in err and "--resume" in err.splitlines()[-1]
    assert latest_checkpoint(out) is not None and (out / "adapter_config.json").is_file()
    stopped = int(err.split("cancelled at step ")[1].split("/")[0])
    total = stopped + 2
    r = _cli(*args, "--iters", str(total), "--resume")
    assert r.returncode == 0, r.stderr
    assert f"completed at step {total}/{total}" in r.stderr and "validation loss" in r.stderr
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows if x["kind"] == "train"] == list(range(1, total + 1))
    assert json.loads((out / "adapter_config.json").read_text())["targets"] == ["attention", "experts"]


def test_cli_refuses_to_train_into_a_model_folder_and_names_a_damaged_checkpoint_file(vocab_model_dir, chats, tmp_path):
    model_copy = tmp_path / "model"
    shutil.copytree(vocab_model_dir, model_copy)
    before = sorted(p.name for p in model_copy.iterdir())
    r = _cli("-m", str(model_copy), "--data", str(chats), "-o", str(model_copy), "--iters", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert (
        r.stderr.strip().splitlines()[-1]
        == f"Error: {model_copy}: holds a model (config.json); train the adapter into a folder of its own"
    )
    assert sorted(p.name for p in model_copy.iterdir()) == before  # nothing written into the model
    out = tmp_path / "adapter"
    args = ["-m", str(vocab_model_dir), "--data", str(chats), "-o", str(out), "--save-every", "1"]
    assert _cli(*args, "--iters", "1").returncode == 0
    damaged = latest_checkpoint(out) / "trainable.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])  # a truncated write
    r = _cli(*args, "--iters", "2", "--resume")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"Error: {damaged}: unreadable checkpoint file"), r.stderr
    (damaged.parent / "state.json").write_text("{")
    r = _cli(*args, "--iters", "2", "--resume")
    assert r.stderr.strip().splitlines()[-1].startswith(f"Error: {damaged.parent / 'state.json'}: unreadable checkpoint file"), (
        r.stderr
    )


def test_cli_plans_a_budget_for_training_and_streams_the_experts(vocab_model_dir, chats, tmp_path):
    # the inference planner left out the adapters, AdamW and the activations: it kept more expert
    # slots resident than training can afford (the full 20b went 0.6 GB over its budget)
    from mlx_gptoss.lora.adapters import LoRASpec
    from mlx_gptoss.lora.plan import training_plan
    from mlx_gptoss.memory import plan_memory, read_tensors

    cfg = mlx_gptoss.config.GptOssConfig.from_file(vocab_model_dir / "config.json")
    spec = LoRASpec(rank=8, alpha=16.0, targets=("attention", "experts"), layers=(cfg.num_hidden_layers - 1,))
    # a budget a little under what training with every expert resident needs
    cfg128 = TrainConfig(tmp_path / "unused", max_seq_len=128)
    full = training_plan(vocab_model_dir, spec, cfg128, 10**15)  # embedding on the host
    budget = full.mlx_bytes - 1
    plan = training_plan(vocab_model_dir, spec, cfg128, budget)
    assert plan.training and plan.expert_slots < cfg.num_local_experts
    assert plan.expert_slots < plan_memory(cfg, read_tensors(vocab_model_dir), budget, context=128).expert_slots
    out = tmp_path / "adapter"
    r = _cli("-m", str(vocab_model_dir), "--data", str(chats), "-o", str(out), "--iters", "2", "--max-seq-len", "128",
             "--targets", "attention,experts", "--layers", "last:1", "--memory-budget", str(budget))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "training on sequences of up to 128 tokens" in r.stderr
    assert f"experts: {plan.expert_slots} of {cfg.num_local_experts} per layer resident" in r.stderr
    assert "completed at step 2/2" in r.stderr and (out / "adapter_config.json").is_file()


def test_training_into_a_folder_holding_a_finished_adapter_is_refused(vocab_model_dir, chats, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_config.json").write_text('{"r": 8}')  # e.g. a PEFT adapter someone keeps there
    r = _cli("-m", str(vocab_model_dir), "--data", str(chats), "-o", str(out), "--iters", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert (
        r.stderr.strip().splitlines()[-1]
        == f"Error: {out} holds an adapter (adapter_config.json): train into another folder, or delete it first"
    )
    assert (out / "adapter_config.json").read_text() == '{"r": 8}' and sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json"
    ]


# -- attention a query chunk at a time ----------------------------------------------------------


def test_attention_in_query_chunks_equals_attention_at_once(tiny_model_dir):
    from mlx_gptoss.lora.adapters import LoRASpec, apply_lora
    from mlx_gptoss.lora.train import set_attention_chunk

    model = mlx_gptoss.load(tiny_model_dir, dtype=mx.float32)
    apply_lora(model, LoRASpec(rank=4, targets=("attention",)), seed=0)
    model.layers[1].self_attn.unfreeze(keys=["sinks"], recurse=False)  # a gradient through the chunks' inputs too
    ids = mx.array(np.random.default_rng(5).integers(0, 512, (2, 45)))  # past the sliding window (16)
    batch = make_batch([_ex(r.tolist(), 1, i + 1) for i, r in enumerate(np.array(ids))])
    want_logits = np.array(model(ids))
    want = _grads(model, [batch], checkpoint=True, chunk=8)
    for c in (1, 7, 16, 45, 64):  # a last chunk shorter than the rest, one chunk, no chunking
        old = set_attention_chunk(model, c)
        np.testing.assert_allclose(np.array(model(ids)), want_logits, rtol=1e-5, atol=1e-5)
        got = _grads(model, [batch], checkpoint=True, chunk=8)
        assert np.abs(got[1]["layers.1.self_attn.sinks"]).max() > 0
        assert got[0] == pytest.approx(want[0], rel=1e-6)
        _assert_close(got[1], want[1], 1e-5)
        assert [v for _, v in old] == [None] * 4 and model.layers[0].self_attn.query_chunk == c
        set_attention_chunk(model, None)
    cache = model.make_cache()  # with a cache (inference) the chunk setting is not used
    set_attention_chunk(model, 7)
    np.testing.assert_allclose(np.array(model(ids[:1], cache)), want_logits[:1], rtol=1e-5, atol=1e-5)


def test_attention_in_query_chunks_bounds_the_backward_memory(tiny_model_dir):
    # the backward of attention with sinks materialises [B, Hq, T, T] scores ~4.5 times; in chunks
    # of c queries each chunk is recomputed alone: [B, Hq, c, T]
    from mlx_gptoss.lora.adapters import LoRASpec, apply_lora
    from mlx_gptoss.lora.train import loss_and_grads, set_attention_chunk

    model = mlx_gptoss.load(tiny_model_dir, dtype=mx.float32)
    apply_lora(model, LoRASpec(rank=4, targets=("attention",), layers=(3,)), seed=0)
    mx.eval(model.parameters())
    T = 1024
    batch = make_batch([_ex(np.random.default_rng(6).integers(0, 512, T).tolist(), T - 8)])
    scores = TINY_HEADS * T * T * 4
    peaks = {}
    for c in (None, 64):
        set_attention_chunk(model, c)
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        loss, g = loss_and_grads(model, batch)
        mx.eval(loss, g)
        peaks[c] = mx.get_peak_memory() - before
    assert peaks[None] > 3 * scores, peaks  # the whole-sequence backward does hold the scores
    assert peaks[64] < 0.25 * peaks[None], peaks


TINY_HEADS = 8
