"""`lora train` and `train()` keep what is not theirs and say what they do: where metrics and the
run may be written (the model, the data, `/`, the current folder), what a resume accepts (same
base, same adapter and data, a checked checkpoint), divergence, Ctrl-C, absurd options.

CLI cases run the real command in a subprocess and want exactly one ``Error:`` line and no
traceback, except ``-o /``: it must never really run (it would write into the filesystem root), so
there the CLI runs in-process with the training loop replaced by a recorder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import pytest

import mlx_gptoss
from mlx_gptoss.lora.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from mlx_gptoss.lora.train import TrainConfig, TrainConfigError, train

CLI = [sys.executable, "-m", "mlx_gptoss.cli"]
FAST = ["--iters", "1", "--eval-every", "0", "--no-progress"]
ROWS = [{"prompt": "What is 2+2?", "completion": "4"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}]  # fmt: skip


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture(scope="module")
def other_vocab_model_dir(tokenizer_json, tmp_path_factory) -> Path:
    """Another base of the same architecture as ``vocab_model_dir`` (other weights, other fingerprint)."""
    from conftest import TINY_VOCAB

    from mlx_gptoss.testing import write_release
    from mlx_gptoss_convert import convert

    root = tmp_path_factory.mktemp("vocab_other")
    return convert(write_release(root / "release", TINY_VOCAB, seed=4, tokenizer=tokenizer_json), root / "converted")


def model_copy(src: Path, dst: Path) -> Path:
    """A converted folder whose config.json is a real copy (the rest hard links: nothing here writes them)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (shutil.copy2 if f.name == "config.json" else os.link)(f, dst / f.name)
    return dst


def run_cli(*args, cwd: Path | None = None, env: dict | None = None, timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}, **kw)  # fmt: skip


def train_cli(model: Path, data: Path, out, *extra, **kw) -> subprocess.CompletedProcess:
    return run_cli("lora", "train", "-m", model, "--data", data, "-o", out, *extra, **kw)


def error_line(r: subprocess.CompletedProcess) -> str:
    """The one ``Error:`` line of a refused command (exactly one, no traceback, rc != 0)."""
    lines = r.stderr.strip().splitlines() or [""]
    assert r.returncode != 0, f"the command succeeded (rc 0), its last line: {lines[-1]!r}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, f"expected one 'Error:' line (rc {r.returncode}), got {errors!r}; stderr:\n{r.stderr[-2000:]}"
    return errors[0]


def loaded_first(r: subprocess.CompletedProcess) -> bool:
    """Whether the command read the data (so loaded the model) before it stopped."""
    return "sequences from" in r.stderr


@pytest.fixture(scope="module")
def _one_step_run(vocab_model_dir, chats, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    r = train_cli(vocab_model_dir, chats, out, *FAST)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def one_step_run(_one_step_run, tmp_path) -> Path:
    """A finished 1-step CLI run on ``chats`` (its checkpoint kept), a fresh copy for each test."""
    return Path(shutil.copytree(_one_step_run, tmp_path / "run"))


def _state_file(run: Path) -> Path:
    return latest_checkpoint(run) / "state.json"


def _edit_state(folder: Path, **fields) -> None:
    f = _state_file(folder)
    state = json.loads(f.read_text())
    state.update(fields)
    f.write_text(json.dumps(state))


def _all_finite(path: Path) -> bool:
    return all(mx.all(mx.isfinite(v)).item() for v in mx.load(str(path)).values())


@pytest.fixture
def lora_model(tiny_model_dir):
    from mlx_gptoss.lora.adapters import LoRASpec, apply_lora

    model = mlx_gptoss.load(tiny_model_dir, dtype=mx.float32)
    spec = LoRASpec(rank=2)
    apply_lora(model, spec, seed=0)
    return model, spec


EXAMPLES = [SimpleNamespace(ids=[1, 5, 9, 13, 17], targets=[False, False, True, True, True], line=1),
            SimpleNamespace(ids=[2, 4, 6, 8], targets=[False, True, True, True], line=2)]  # fmt: skip


# -- item 1: metrics never over a model, a dataset or another file ----------------------------


def test_metrics_file_never_overwrites_a_model_config(vocab_model_dir, chats, tmp_path):
    model = model_copy(vocab_model_dir, tmp_path / "model")
    before = (model / "config.json").read_bytes()
    r = train_cli(model, chats, tmp_path / "out", *FAST, "--metrics", model / "config.json")
    assert (model / "config.json").read_bytes() == before, "the model's config.json was overwritten with metrics"
    line = error_line(r)
    assert "--metrics" in line and "model" in line, line
    assert not loaded_first(r), "checked only after the model and data were loaded"


def test_metrics_file_never_overwrites_the_training_data(vocab_model_dir, chats, tmp_path):
    data = Path(shutil.copy(chats, tmp_path / "train.jsonl"))
    before = data.read_bytes()
    r = train_cli(vocab_model_dir, data, tmp_path / "out", *FAST, "--metrics", data)
    assert data.read_bytes() == before, "the training data was overwritten with metrics"
    line = error_line(r)
    assert "--metrics" in line and "--data" in line, line
    assert not loaded_first(r)


def test_metrics_file_never_overwrites_an_existing_non_metrics_file(vocab_model_dir, chats, tmp_path):
    notes = tmp_path / "NOTES.md"
    notes.write_text("# my notes\nkeep me\n")
    r = train_cli(vocab_model_dir, chats, tmp_path / "out", *FAST, "--metrics", notes)
    assert notes.read_text() == "# my notes\nkeep me\n", "an unrelated file was overwritten with metrics"
    line = error_line(r)
    assert "--metrics" in line and str(notes) in line, line
    assert not loaded_first(r)


def test_metrics_go_into_a_new_file_or_over_a_metrics_file_of_lora_train(vocab_model_dir, chats, tmp_path):
    log = tmp_path / "logs" / "run.jsonl"
    r = train_cli(vocab_model_dir, chats, tmp_path / "a", *FAST, "--metrics", log)
    assert r.returncode == 0, r.stderr
    first = json.loads(log.read_text().splitlines()[0])
    assert first["kind"] == "train" and first["step"] == 1
    # a new run may replace a metrics file lora train wrote (recognised by its first line)
    r = train_cli(vocab_model_dir, chats, tmp_path / "b", *FAST, "--metrics", log)
    assert r.returncode == 0, r.stderr
    assert len(log.read_text().splitlines()) == 1


def test_train_api_refuses_metrics_over_the_training_data(lora_model, tmp_path):
    model, spec = lora_model
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "hello world"}\n')
    before = data.read_bytes()
    ds = SimpleNamespace(examples=EXAMPLES, path=data)  # a dataset read from that file
    with pytest.raises(ValueError, match="metrics_file"):
        train(model, ds, None, TrainConfig(tmp_path / "out", iterations=1, metrics_file=data), spec=spec)
    assert data.read_bytes() == before
    other = tmp_path / "other.txt"
    other.write_text("not metrics\n")
    with pytest.raises(ValueError, match="metrics_file"):
        train(model, EXAMPLES, None, TrainConfig(tmp_path / "out", iterations=1, metrics_file=other), spec=spec)
    assert other.read_text() == "not metrics\n"


# -- item 6: never into /, '' or the current folder --------------------------------------------


def test_output_filesystem_root_is_refused_before_training(vocab_model_dir, chats, monkeypatch):
    """Never really run: the training loop is replaced by a recorder, so nothing is written to /."""
    from click.testing import CliRunner

    import mlx_gptoss.lora.train as train_mod
    from mlx_gptoss.cli import main

    reached = []

    def recorder(model, train_ds, valid_ds=None, cfg=None, **kw):
        reached.append((Path(cfg.output_dir), cfg.metrics_path))
        return train_mod.TrainResult("completed", 0, 0, Path(cfg.output_dir))

    monkeypatch.setattr(train_mod, "train", recorder)
    monkeypatch.setattr(train_mod, "DestinationLock", _no_lock)  # not even a lock file in /
    before = sorted(os.listdir("/"))
    res = CliRunner().invoke(main, ["lora", "train", "-m", str(vocab_model_dir), "--data", str(chats), "-o", "/", *FAST])
    assert not reached, f"lora train -o / went on to train into {reached[0][0]} (metrics {reached[0][1]})"
    assert res.exit_code == 1 and "Error:" in res.output and "root" in res.output, res.output
    assert sorted(os.listdir("/")) == before


def _no_lock(*a, **k):
    raise AssertionError("the output was locked before it was checked")


@pytest.mark.parametrize("out", ["/", "", "."])
def test_train_api_refuses_the_root_empty_and_current_folder(lora_model, monkeypatch, out):
    """Never really run: the run and its lock are replaced by recorders."""
    import mlx_gptoss.lora.train as train_mod

    reached = []
    monkeypatch.setattr(train_mod, "DestinationLock", _no_lock)
    monkeypatch.setattr(train_mod, "_train_into", lambda *a, **kw: reached.append(a))
    model, spec = lora_model
    with pytest.raises(TrainConfigError, match="output_dir"):
        train(model, EXAMPLES, None, TrainConfig(out, iterations=1), spec=spec)
    assert not reached


def test_empty_output_does_not_train_into_the_current_folder(vocab_model_dir, chats, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = train_cli(vocab_model_dir, chats, "", *FAST, cwd=cwd)
    assert sorted(p.name for p in cwd.iterdir()) == [], f"-o '' wrote into the current directory (rc {r.returncode})"
    assert "-o" in error_line(r)


@pytest.mark.parametrize("where", ["dot", "cwd_parent", "home"])
def test_output_current_folder_or_home_is_refused(vocab_model_dir, chats, tmp_path, where):
    cwd = tmp_path / "home" / "work"
    cwd.mkdir(parents=True)
    out = {"dot": ".", "cwd_parent": "..", "home": "~"}[where]
    r = train_cli(vocab_model_dir, chats, out, *FAST, cwd=cwd, env={"HOME": str(tmp_path / "home")})
    assert sorted(p.name for p in (tmp_path / "home").rglob("*")) == ["work"], "something was written"
    line = error_line(r)
    assert "current directory" in line or "home" in line, line
    assert not loaded_first(r)


# -- item 8: an absurd rank is refused against memory before anything is allocated ------------


def _limit_memory(gb: float):
    import resource

    def set_limit() -> None:
        n = int(gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (n, n))

    return set_limit


def test_absurd_rank_is_refused_before_anything_is_allocated(vocab_model_dir, chats, tmp_path):
    # under a 4 GB address-space limit an absurd allocation fails fast; MLX then crashed with SIGSEGV
    r = train_cli(vocab_model_dir, chats, tmp_path / "ad", *FAST, "--rank", "100000000", preexec_fn=_limit_memory(4))
    assert r.returncode > 0, f"killed by signal {-r.returncode}: {r.stderr[-1500:]}"
    line = error_line(r)
    assert "rank" in line and "GB" in line, line
    assert not loaded_first(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a lock or folder was left"


def test_train_api_checks_the_optimizer_state_against_memory(lora_model, tmp_path, monkeypatch):
    import mlx_gptoss.lora.plan as plan_mod

    model, spec = lora_model
    monkeypatch.setattr(plan_mod, "machine_memory", lambda: 10_000)  # a machine of 10 kB
    with pytest.raises(ValueError, match="rank"):
        train(model, EXAMPLES, None, TrainConfig(tmp_path / "out", iterations=1), spec=spec)
    assert not (tmp_path / "out").exists()


# -- item 12a / 18: the checkpoint's state.json and latest.json are checked -------------------


@pytest.mark.parametrize("field,value", [("step", "ten"), ("step", -3), ("step", 99999), ("step", True),
                                         ("micro", None), ("micro", 7), ("trained_tokens", -1),
                                         ("metrics_offset", 1.5), ("base_fingerprint", 3), ("run", [])])  # fmt: skip
def test_hand_edited_state_is_refused_naming_file_and_field(one_step_run, field, value):
    _edit_state(one_step_run, **{field: value})
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(latest_checkpoint(one_step_run))
    assert str(_state_file(one_step_run)) in str(e.value) and field in str(e.value), e.value


@pytest.mark.parametrize("step", ["ten", -3, 99999])
def test_cli_resume_with_a_hand_edited_step_is_refused_before_loading(vocab_model_dir, chats, one_step_run, step):
    _edit_state(one_step_run, step=step)
    r = train_cli(vocab_model_dir, chats, one_step_run, "--iters", "3", "--resume", "--no-progress")
    line = error_line(r)
    assert "state.json" in line and "step" in line, line
    assert not loaded_first(r)


@pytest.mark.parametrize("how", ["relative", "absolute", "name"])
def test_latest_pointing_outside_the_run_is_refused(vocab_model_dir, chats, one_step_run, tmp_path, how):
    other = tmp_path / "other"
    shutil.copytree(one_step_run, other)
    target = latest_checkpoint(other)
    pointer = one_step_run / "checkpoints" / "latest.json"
    where = {"relative": os.path.relpath(target, pointer.parent), "absolute": str(target), "name": "elsewhere"}[how]
    pointer.write_text(json.dumps({"dir": where}))
    r = train_cli(vocab_model_dir, chats, one_step_run, "--iters", "2", "--resume", "--no-progress")
    line = error_line(r)
    assert "latest.json" in line, line


def test_checkpoint_tensor_of_the_wrong_shape_names_file_and_tensor(vocab_model_dir, chats, one_step_run):
    for kind in ("trainable", "optimizer"):
        f = latest_checkpoint(one_step_run) / f"{kind}.safetensors"
        saved = f.read_bytes()
        tensors = mx.load(str(f))
        name = sorted(k for k in tensors if tensors[k].ndim == 2)[0]
        tensors[name] = mx.zeros((tensors[name].shape[0], tensors[name].shape[1] // 2))
        mx.save_safetensors(str(f), tensors)
        r = train_cli(vocab_model_dir, chats, one_step_run, "--iters", "2", "--resume", "--no-progress")
        line = error_line(r)
        assert "[matmul]" not in line and "broadcast" not in line, line
        assert str(f) in line and name in line and "shape" in line, line
        f.write_bytes(saved)


# -- item 14: resume on another base --------------------------------------------------------------


def test_resume_on_another_base_model_is_refused_naming_both(vocab_model_dir, other_vocab_model_dir, chats, one_step_run):
    from mlx_gptoss.lora.io import base_fingerprint

    before = (one_step_run / "adapter_config.json").read_bytes()
    r = train_cli(other_vocab_model_dir, chats, one_step_run, "--iters", "2", "--resume", "--no-progress")
    assert (one_step_run / "adapter_config.json").read_bytes() == before
    line = error_line(r)
    ours, theirs = base_fingerprint(vocab_model_dir), base_fingerprint(other_vocab_model_dir)
    assert ours[:19] in line and theirs[:19] in line, line
    assert not loaded_first(r)
    assert json.loads(_state_file(one_step_run).read_text())["base_fingerprint"] == ours


def test_train_api_refuses_a_resume_on_another_base(tiny_model_dir, tmp_path):
    from mlx_gptoss.lora.adapters import LoRASpec, apply_lora

    spec = LoRASpec(rank=2)
    cfg = TrainConfig(tmp_path / "out", iterations=1, eval_every=0)
    model = mlx_gptoss.load(tiny_model_dir, dtype=mx.float32)
    apply_lora(model, spec, seed=0)
    train(model, EXAMPLES, None, cfg, spec=spec)
    other = mlx_gptoss.load(tiny_model_dir, dtype=mx.float32)
    other.layers[0].self_attn.sinks = other.layers[0].self_attn.sinks + 1  # another base
    apply_lora(other, spec, seed=0)
    cfg.iterations = 2
    with pytest.raises(CheckpointError, match="base model"):
        train(other, EXAMPLES, None, cfg, spec=spec, resume=True)


# -- item 15: divergence stops at the first non-finite step -----------------------------------------


def test_divergence_stops_at_the_first_non_finite_step(vocab_model_dir, chats, tmp_path):
    out = tmp_path / "run"
    r = train_cli(vocab_model_dir, chats, out, "--iters", "4", "--lr", "1e30", "--warmup", "0", "--save-every", "1",
                  "--eval-every", "0", "--no-progress")  # fmt: skip
    assert "loss nan" not in r.stderr and "completed" not in r.stderr, r.stderr
    line = error_line(r)
    assert "step 2" in line and "--lr" in line, line  # step 1's loss is finite, step 2's is the first NaN
    assert not (out / "adapters.safetensors").exists() or _all_finite(out / "adapters.safetensors")
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and _all_finite(ckpt / "trainable.safetensors"), "the last good checkpoint was not kept"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 1
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1], "a non-finite step was logged"


def test_train_api_divergence_raises_naming_the_step_and_keeps_finite_weights(lora_model, tmp_path):
    from mlx_gptoss.lora.train import TrainingDivergedError

    model, spec = lora_model
    cfg = TrainConfig(tmp_path / "out", iterations=5, learning_rate=1e30, warmup=0, save_every=0, eval_every=0)
    with pytest.raises(TrainingDivergedError, match=r"step \d.*learning_rate") as e:
        train(model, EXAMPLES, None, cfg, spec=spec)
    assert e.value.step >= 2
    from mlx.utils import tree_flatten

    assert all(mx.all(mx.isfinite(v)).item() for _, v in tree_flatten(model.trainable_parameters()))
    ckpt = latest_checkpoint(tmp_path / "out")  # the last good state, to resume with a lower rate
    assert ckpt is not None and json.loads((ckpt / "state.json").read_text())["step"] == e.value.step - 1
    assert not (tmp_path / "out" / "adapters.safetensors").exists()


def test_train_api_a_non_finite_update_is_undone(lora_model, tmp_path, monkeypatch):
    # finite loss and gradients, but an update that overflows: the weights of the step before stay
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from mlx_gptoss.lora.train import TrainingDivergedError

    class Overflowing(optim.AdamW):
        def apply_single(self, gradient, parameter, state):
            new = super().apply_single(gradient, parameter, state)
            return new * float("inf") if self.step.item() >= 2 else new

    monkeypatch.setattr(optim, "AdamW", Overflowing)
    model, spec = lora_model
    seen = {}

    def on_progress(p):
        seen.update({k: mx.array(v) for k, v in tree_flatten(model.trainable_parameters())})

    cfg = TrainConfig(tmp_path / "out", iterations=3, learning_rate=1e-2, warmup=0, save_every=0, eval_every=0)
    with pytest.raises(TrainingDivergedError, match="step 2: its update is not finite") as e:
        train(model, EXAMPLES, None, cfg, spec=spec, on_progress=on_progress)
    assert e.value.step == 2 and e.value.what == "update"
    now = dict(tree_flatten(model.trainable_parameters()))
    assert all(mx.array_equal(now[k], v).item() for k, v in seen.items())  # step 1's weights, not inf
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "out"))
    assert ckpt.state["step"] == 1 and all(mx.all(mx.isfinite(v)).item() for v in ckpt.optimizer.values())


# -- item 18: resume with changed options -------------------------------------------------------


@pytest.mark.parametrize("option,value", [("--rank", "4"), ("--alpha", "8"), ("--targets", "attention,router"),
                                          ("--layers", "0"), ("--train-on", "assistant"), ("--max-seq-len", "100"),
                                          ("--overflow", "truncate"), ("--seed", "3"), ("--batch-size", "2"),
                                          ("--grad-accum", "2")])  # fmt: skip
def test_resume_refuses_a_changed_adapter_or_data_option(vocab_model_dir, chats, one_step_run, option, value):
    r = train_cli(vocab_model_dir, chats, one_step_run, "--iters", "2", "--resume", "--no-progress", option, value)
    line = error_line(r)
    assert option in line and "checkpoint" in line, line
    assert not loaded_first(r)


def test_resume_with_the_same_values_given_again_is_accepted(vocab_model_dir, chats, one_step_run):
    r = train_cli(vocab_model_dir, chats, one_step_run, "--iters", "2", "--resume", "--no-progress", "--rank", "8",
                  "--targets", "attention", "--train-on", "final", "--max-seq-len", "2048")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "completed at step 2/2" in r.stderr


@pytest.mark.parametrize("option,value,field", [("--lr", "0.5", "learning_rate"), ("--warmup", "0", "warmup"),
                                                ("--schedule", "constant", "schedule"),
                                                ("--save-every", "7", "save_every")])  # fmt: skip
def test_resume_applies_a_changed_schedule_option_and_says_so(vocab_model_dir, chats, one_step_run, option, value, field):
    r = train_cli(vocab_model_dir, chats, one_step_run, "--iters", "2", "--resume", "--no-progress", option, value)
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if option in line]
    assert said and "checkpoint" in said[0], r.stderr
    config = json.loads(_state_file(one_step_run).read_text())["config"]
    assert str(config[field]) == value or config[field] == float(value) or config[field] == int(value)


def test_resume_keeps_the_checkpoints_options_that_are_not_given(vocab_model_dir, chats, tmp_path):
    out = tmp_path / "run"
    first = ["--lr", "0.001", "--max-seq-len", "512", "--rank", "4", "--save-every", "1", "--warmup", "0"]
    assert train_cli(vocab_model_dir, chats, out, *FAST, *first).returncode == 0
    r = train_cli(vocab_model_dir, chats, out, "--iters", "2", "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr
    state = json.loads(_state_file(out).read_text())
    assert (state["config"]["learning_rate"], state["config"]["max_seq_len"], state["spec"]["rank"]) == (0.001, 512, 4)
    assert "LoRA rank 4" in r.stderr and "--lr" not in r.stderr


def test_resume_with_an_edited_dataset_is_refused(vocab_model_dir, chats, one_step_run, tmp_path):
    data = tmp_path / "train.jsonl"  # same number of lines, other content
    data.write_text('{"prompt": "Totally different?", "completion": "yes indeed"}\n{"prompt": "b", "completion": "c"}\n')
    r = train_cli(vocab_model_dir, data, one_step_run, "--iters", "2", "--resume", "--no-progress")
    line = error_line(r)
    assert "--data" in line and "changed" in line, line
    assert not loaded_first(r)
    moved = Path(shutil.copy(chats, tmp_path / "moved.jsonl"))  # the same data elsewhere is the same data
    r = train_cli(vocab_model_dir, moved, one_step_run, "--iters", "2", "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr


def test_train_api_resume_refuses_other_data_or_adapter(tiny_model_dir, tmp_path):
    from mlx_gptoss.lora.adapters import LoRASpec, apply_lora

    def fresh(spec):
        m = mlx_gptoss.load(tiny_model_dir, dtype=mx.float32)
        apply_lora(m, spec, seed=0)
        return m

    spec = LoRASpec(rank=2)
    cfg = TrainConfig(tmp_path / "out", iterations=1, eval_every=0)
    train(fresh(spec), EXAMPLES, None, cfg, spec=spec)
    cfg.iterations = 2
    edited = [EXAMPLES[0], SimpleNamespace(ids=[2, 4, 6, 9], targets=[False, True, True, True], line=2)]
    with pytest.raises(CheckpointError, match="training data"):
        train(fresh(spec), edited, None, cfg, spec=spec, resume=True)
    with pytest.raises(CheckpointError, match="rank"):
        train(fresh(LoRASpec(rank=3)), EXAMPLES, None, cfg, spec=LoRASpec(rank=3), resume=True)
    with pytest.raises(CheckpointError, match="max_seq_len"):
        train(fresh(spec), EXAMPLES, None, TrainConfig(tmp_path / "out", iterations=2, max_seq_len=64), spec=spec, resume=True)
    result = train(fresh(spec), EXAMPLES, None, TrainConfig(tmp_path / "out", iterations=2, learning_rate=1e-3),
                   spec=spec, resume=True)  # fmt: skip
    assert result.status == "completed" and result.changed["learning_rate"] == (1e-4, 1e-3)


# -- item 26: Ctrl-C exits 130 after the checkpoint ---------------------------------------------


def test_interrupted_training_exits_130_after_saving(vocab_model_dir, chats, tmp_path):
    out = tmp_path / "ad"
    proc = subprocess.Popen([*CLI, "lora", "train", "-m", str(vocab_model_dir), "--data", str(chats), "-o", str(out),
                             "--iters", "100000", "--eval-every", "0", "--no-progress"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (proc.returncode, err)
    assert "cancelled at step" in err and "Traceback" not in err
    assert latest_checkpoint(out) is not None and (out / "adapter_config.json").is_file()


# -- item 29: hints, help, the busy folder -------------------------------------------------------


def test_a_finished_run_is_not_told_to_add_resume(vocab_model_dir, chats, one_step_run):
    r = train_cli(vocab_model_dir, chats, one_step_run, *FAST)  # the run that made it, once more
    line = error_line(r)
    assert "finished" in line and "add --resume" not in line, line
    metrics = (one_step_run / "metrics.jsonl").read_text()
    r = train_cli(vocab_model_dir, chats, one_step_run, *FAST, "--resume")  # nothing left to train
    line = error_line(r)
    assert "finished at step 1/1" in line and "--iters" in line, line
    assert (one_step_run / "metrics.jsonl").read_text() == metrics
    r = train_cli(vocab_model_dir, chats, one_step_run, "--iters", "2", "--resume", "--no-progress")  # the way on
    assert r.returncode == 0 and "completed at step 2/2" in r.stderr, r.stderr


def test_an_unfinished_run_is_told_to_add_resume(vocab_model_dir, chats, one_step_run):
    _edit_state(one_step_run, total_steps=5)  # as a cancelled run of 5 steps leaves it
    line = error_line(train_cli(vocab_model_dir, chats, one_step_run, *FAST))
    assert "add --resume" in line and "step 1/5" in line, line


def test_help_shows_a_single_percent():
    r = run_cli("lora", "train", "--help")
    assert r.returncode == 0 and "%%" not in r.stdout and "10%" in r.stdout, r.stdout


def test_a_busy_folder_is_refused_before_loading(vocab_model_dir, chats, tmp_path):
    from mlx_gptoss_convert.destination import DestinationLock

    out = tmp_path / "busy"
    with DestinationLock(out, "training run"):  # another run holds the folder
        r = train_cli(vocab_model_dir, chats, out, *FAST)
    line = error_line(r)
    assert "another training run" in line, line
    assert not loaded_first(r), f"the model and the data were loaded first: {r.stderr[-800:]}"


def test_train_api_inside_the_clis_lock_does_not_lock_itself_out(lora_model, tmp_path):
    from mlx_gptoss.lora.train import output_lock

    model, spec = lora_model
    with output_lock(tmp_path / "out"):
        result = train(model, EXAMPLES, None, TrainConfig(tmp_path / "out", iterations=1), spec=spec)
    assert result.status == "completed" and not (tmp_path / ".out.lock").exists()


# -- item 17: NaN, inf and absurd numbers ----------------------------------------------------------


@pytest.mark.parametrize("option,value", [("--lr", "nan"), ("--lr", "inf"), ("--alpha", "inf"), ("--alpha", "nan"),
                                          ("--seed", str(2**64))])  # fmt: skip
def test_cli_refuses_nan_and_inf_naming_the_option(vocab_model_dir, chats, tmp_path, option, value):
    r = train_cli(vocab_model_dir, chats, tmp_path / "out", *FAST, option, value)
    line = error_line(r)
    assert option in line, line
    assert not loaded_first(r) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("field,value", [("learning_rate", float("nan")), ("learning_rate", float("inf")),
                                         ("weight_decay", float("nan")), ("weight_decay", float("inf")),
                                         ("min_lr_ratio", float("nan")), ("max_grad_norm", float("inf")),
                                         ("save_every", True), ("eval_every", 1.5), ("seed", -1), ("seed", 2**64),
                                         ("warmup", False), ("iterations", 2.0)])  # fmt: skip
def test_train_config_refuses_nan_inf_and_odd_types_naming_the_field(field, value):
    with pytest.raises(TrainConfigError, match=field):
        TrainConfig("out", **{field: value}).validate()
