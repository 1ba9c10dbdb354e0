"""Adapter files that cannot destroy or deceive: exports never empty a folder they did not write
(and ``lora export``), an adapter is not applied or fused twice, PEFT configs that contradict their
tensors and folders of two formats are refused, errors name the file and field, and ``lora fuse``
refuses absurd sizes, never prints a negative KL and does not exit 0 after losing most of an update."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_gptoss
from mlx_gptoss.lora import fuse as fuse_mod
from mlx_gptoss.lora.adapters import LoRAError, LoRASpec, apply_lora, lora_parameters, remove_lora, set_lora_parameters
from mlx_gptoss.lora.files import FUSE_RECORD
from mlx_gptoss.lora.formats import export_mlxlm, export_peft, read_adapter
from mlx_gptoss.lora.fuse import FuseError, UpdateLostError, fuse
from mlx_gptoss.lora.io import CONFIG, WEIGHTS, base_fingerprint, load_adapter, save_adapter

CLI = [sys.executable, "-m", "mlx_gptoss.cli"]
PEFT_WEIGHTS = "adapter_model.safetensors"


def make_adapter(model_dir, dst, targets=("attention",), *, rank=4, std=0.05, seed=0, zero=()):
    """Our adapter folder with random A and B (B is zero at init, which would hide every error);
    tensors whose name holds one of ``zero`` are zeros."""
    m = mlx_gptoss.load(model_dir, dtype=mx.float32)
    spec = LoRASpec(rank=rank, alpha=2.0 * rank, targets=targets)
    apply_lora(m, spec)
    rng = np.random.default_rng(seed)
    flat = {k: mx.zeros(v.shape) if any(z in k for z in zero) else mx.array(rng.normal(0, std, v.shape).astype(np.float32))
            for k, v in lora_parameters(m).items()}  # fmt: skip
    set_lora_parameters(m, flat)
    return save_adapter(m, spec, dst, base_fingerprint=base_fingerprint(m))


def run_cli(*args, cwd=None):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd, stdin=subprocess.DEVNULL)


def one_error(proc) -> str:
    """The one ``Error:`` line of a refused command (non-zero exit, no traceback)."""
    assert proc.returncode > 0, (proc.returncode, proc.stderr[-2000:])  # not 0, and not killed by a signal (< 0)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("ad") / "attention")


@pytest.fixture(scope="module")
def peft_adapter(adapter, tmp_path_factory) -> Path:
    return export_peft(adapter, tmp_path_factory.mktemp("ad") / "peft")


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


def variant(src: Path, dst: Path, config=None, drop=None, remove=()) -> Path:
    """A copy of adapter folder ``src``: config fields updated (``remove`` deleted), tensors matching ``drop`` left out."""
    shutil.copytree(src, dst)
    f = dst / CONFIG
    cfg = {**json.loads(f.read_text()), **(config or {})}
    for k in remove:
        cfg.pop(k, None)
    f.write_text(json.dumps(cfg))
    if drop:
        w = next(dst.glob("*.safetensors"))
        tensors = dict(mx.load(str(w)))
        mx.save_safetensors(str(w), {k: v for k, v in tensors.items() if not re.search(drop, k)}, metadata={"format": "pt"})
    return dst


# -- item 2: exports never empty a folder they did not write --------------------------------------


@pytest.fixture
def training_folder(adapter, tmp_path) -> Path:
    """A training run's folder: the adapter beside checkpoints, metrics and the user's notes."""
    out = Path(shutil.copytree(adapter, tmp_path / "run"))
    (out / "checkpoints" / "step-000001").mkdir(parents=True)
    (out / "checkpoints" / "step-000001" / "state.json").write_text('{"step": 1}')
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    (out / "NOTES.md").write_text("what I tried\n")
    return out


@pytest.mark.parametrize("force", [False, True])
def test_export_peft_never_empties_a_training_folder(adapter, training_folder, force):
    before = {p.relative_to(training_folder): p.read_bytes() for p in training_folder.rglob("*") if p.is_file()}
    with pytest.raises(ValueError) as e:
        export_peft(adapter, training_folder, force=force)
    assert str(training_folder) in str(e.value)
    if force:
        assert "NOTES.md" in str(e.value) and "checkpoints" in str(e.value)
    else:
        assert "force" in str(e.value)
    after = {p.relative_to(training_folder): p.read_bytes() for p in training_folder.rglob("*") if p.is_file()}
    assert after == before
    assert [n for n in names(training_folder.parent) if n.startswith(".")] == []  # no lock, no partial folder


def test_save_adapter_never_empties_a_training_folder(model, training_folder):
    apply_lora(model, LoRASpec(rank=4))
    with pytest.raises(LoRAError, match="NOTES.md"):
        save_adapter(model, LoRASpec(rank=4), training_folder, base_fingerprint="sha256:x")
    assert (training_folder / "NOTES.md").is_file() and (training_folder / "checkpoints").is_dir()


def test_export_peft_keeps_a_peft_folders_readme_and_training_args(adapter, peft_adapter, tmp_path):
    dst = Path(shutil.copytree(peft_adapter, tmp_path / "peft"))
    (dst / "README.md").write_text("model card\n")
    (dst / "training_args.bin").write_bytes(b"\x80\x04 pickled args")
    with pytest.raises(ValueError, match="README.md, training_args.bin") as e:
        export_peft(adapter, dst, force=True)
    assert str(dst) in str(e.value)
    assert names(dst) == ["README.md", CONFIG, PEFT_WEIGHTS, "training_args.bin"]


def test_export_onto_or_around_its_own_source_is_refused(adapter, tmp_path):
    src = Path(shutil.copytree(adapter, tmp_path / "a"))
    weights = (src / WEIGHTS).read_bytes()
    for dst in (src, src / "peft", tmp_path):
        for force in (False, True):
            with pytest.raises(ValueError, match="source"):
                export_peft(src, dst, force=force)
    with pytest.raises(ValueError, match="source"):
        export_mlxlm(src, src, force=True)
    assert names(src) == [CONFIG, WEIGHTS] and (src / WEIGHTS).read_bytes() == weights
    assert names(tmp_path) == ["a"]


def test_force_replaces_only_an_earlier_export_of_the_same_kind(tiny_model_dir, adapter, tmp_path):
    other = make_adapter(tiny_model_dir, tmp_path / "other", seed=7)
    dst = export_peft(adapter, tmp_path / "peft")
    first = (dst / PEFT_WEIGHTS).read_bytes()
    with pytest.raises(ValueError, match="already exists.*force"):
        export_peft(other, dst)
    assert (dst / PEFT_WEIGHTS).read_bytes() == first
    export_peft(other, dst, force=True)  # an earlier PEFT export holding nothing else: replaced
    assert (dst / PEFT_WEIGHTS).read_bytes() != first and names(dst) == [CONFIG, PEFT_WEIGHTS]
    mlxlm = export_mlxlm(adapter, tmp_path / "mlxlm")
    with pytest.raises(ValueError, match="mlx-lm") as e:  # another kind: refused, not replaced
        export_peft(other, mlxlm, force=True)
    assert str(mlxlm) in str(e.value) and names(mlxlm) == [CONFIG, WEIGHTS]
    with pytest.raises(ValueError, match="mlx-gptoss"):  # our own adapter folder is no export
        export_mlxlm(adapter, other, force=True)
    assert names(tmp_path) == ["mlxlm", "other", "peft"]  # nothing left beside them


def test_failed_export_leaves_nothing_behind(adapter, tmp_path, monkeypatch):
    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        export_peft(adapter, tmp_path / "peft")
    assert names(tmp_path) == []


def test_export_to_mlxlm_reads_back_as_the_same_adapter(tiny_model_dir, model, tmp_path):
    src = make_adapter(tiny_model_dir, tmp_path / "ours", ("attention", "router", "experts"), seed=3)
    dst = export_mlxlm(src, tmp_path / "mlxlm")
    cfg = json.loads((dst / CONFIG).read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["lora_parameters"]["scale"] == pytest.approx(2.0)
    spec, flat = read_adapter(dst, model)
    want = load_adapter(model, src)
    assert spec.rank == want.rank and spec.targets == want.targets and spec.scale == pytest.approx(want.scale)
    have = lora_parameters(model)
    assert set(flat) == set(have) and all(mx.array_equal(flat[k], have[k]) for k in have)


# -- lora export ---------------------------------------------------------------------------------


def test_lora_export_cli_writes_peft_and_mlxlm(tiny_model_dir, adapter, model, tmp_path):
    got = run_cli("lora", "export", adapter, tmp_path / "peft", "--format", "peft")
    assert got.returncode == 0, got.stderr
    got = run_cli("lora", "export", adapter, tmp_path / "mlxlm", "--format", "mlx-lm")
    assert got.returncode == 0, got.stderr
    load_adapter(model, adapter)
    want = lora_parameters(model)
    for folder in ("peft", "mlxlm"):
        _, flat = read_adapter(tmp_path / folder, model)
        assert set(flat) == set(want) and all(mx.array_equal(flat[k], want[k]) for k in want), folder
    # a PEFT source has no spec of its own: its shapes are read against the base model (-m)
    line = one_error(run_cli("lora", "export", tmp_path / "peft", tmp_path / "again", "--format", "mlx-lm"))
    assert "-m" in line and str(tmp_path / "peft") in line
    got = run_cli("lora", "export", tmp_path / "peft", tmp_path / "again", "--format", "mlx-lm", "-m", tiny_model_dir)
    assert got.returncode == 0, got.stderr
    _, flat = read_adapter(tmp_path / "again", model)
    assert all(mx.array_equal(flat[k], want[k]) for k in want)


def test_lora_export_cli_refusals_are_one_error_line(tiny_model_dir, adapter, training_folder, tmp_path):
    assert "--force" in one_error(run_cli("lora", "export", adapter, training_folder, "--format", "peft"))
    assert "NOTES.md" in one_error(run_cli("lora", "export", adapter, training_folder, "--format", "peft", "--force"))
    assert "source" in one_error(run_cli("lora", "export", adapter, adapter, "--format", "peft", "--force"))
    wrong = make_adapter(tiny_model_dir, tmp_path / "wrong")
    cfg = json.loads((wrong / CONFIG).read_text())
    cfg["base_model"]["fingerprint"] = "sha256:" + "0" * 64
    (wrong / CONFIG).write_text(json.dumps(cfg))
    assert "another base model" in one_error(run_cli("lora", "export", wrong, tmp_path / "w", "--format", "peft",
                                                     "-m", tiny_model_dir))  # fmt: skip
    assert not (tmp_path / "w").exists()


# -- item 22: an adapter already fused into the model ---------------------------------------------


@pytest.fixture(scope="module")
def fused_dir(tiny_model_dir, adapter, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fused") / "fused"
    fuse(tiny_model_dir, adapter, out, check_tokens=8, verbose=False)
    return out


def test_adapter_is_refused_on_the_model_it_was_fused_into(fused_dir, adapter, peft_adapter, tmp_path):
    fused = mlx_gptoss.load(fused_dir, dtype=mx.float32)
    for src in (adapter, peft_adapter, shutil.copytree(adapter, tmp_path / "copy")):  # by content, whatever its folder
        with pytest.raises(LoRAError, match="already fused") as e:
            load_adapter(fused, src)
        assert str(src) in str(e.value) and str(fused_dir) in str(e.value)
        assert lora_parameters(fused) == {}
    with pytest.raises(LoRAError, match="already fused"):
        mlx_gptoss.load(fused_dir, adapter=adapter)
    assert "adapter_id" in json.loads((fused_dir / FUSE_RECORD).read_text())


def test_another_adapter_still_applies_to_a_fused_model(tiny_model_dir, fused_dir, tmp_path):
    other = make_adapter(tiny_model_dir, tmp_path / "other", seed=11)
    fused = mlx_gptoss.load(fused_dir, dtype=mx.float32)
    assert load_adapter(fused, other).rank == 4


def test_an_adapter_is_not_fused_twice(fused_dir, adapter, tmp_path):
    with pytest.raises(LoRAError, match="already fused"):
        fuse(fused_dir, adapter, tmp_path / "twice", check_tokens=0, verbose=False)
    line = one_error(run_cli("lora", "fuse", "-m", fused_dir, "--adapter", adapter, "-o", tmp_path / "cli", "--check-tokens", 0))
    assert "already fused" in line
    assert names(tmp_path) == []


def test_a_fused_record_lists_every_adapter_fused_into_it(tiny_model_dir, fused_dir, adapter, tmp_path):
    other = make_adapter(tiny_model_dir, tmp_path / "other", seed=12)
    twice = fuse(fused_dir, other, tmp_path / "twice", check_tokens=0, verbose=False, dtype="float32").out
    record = json.loads((twice / FUSE_RECORD).read_text())
    assert len(record["fused_adapters"]) == 2
    with pytest.raises(LoRAError, match="already fused"):  # the first adapter, fused one model earlier
        load_adapter(mlx_gptoss.load(twice, dtype=mx.float32), adapter)


# -- item 23: ambiguity is refused ---------------------------------------------------------------

CONTRADICTIONS = {
    "target_modules": ({"target_modules": ["q_proj"]}, (), "target_modules"),
    "target_modules_router": ({"target_modules": ["router"]}, (), "target_modules"),
    "no_target_modules": ({}, ("target_modules",), "target_modules"),
    "layers_to_transform": ({"layers_to_transform": [0]}, (), "layers_to_transform"),
    "layers_pattern": ({"layers_to_transform": [0, 1, 2, 3], "layers_pattern": "blocks"}, (), "layers_pattern"),
    "exclude_modules": ({"exclude_modules": ["q_proj"]}, (), "exclude_modules"),
    "exclude_regex": ({"exclude_modules": r".*layers\.2\..*"}, (), "exclude_modules"),
    "router_not_targeted": ({"target_parameters": ["mlp.experts.down_proj"]}, (), "target_parameters"),
}


@pytest.mark.parametrize("case", CONTRADICTIONS)
def test_peft_config_contradicting_its_tensors_is_refused(tiny_model_dir, model, tmp_path, case):
    config, remove, field = CONTRADICTIONS[case]
    src = make_adapter(tiny_model_dir, tmp_path / "ours", ("attention", "router"))
    folder = variant(export_peft(src, tmp_path / "peft"), tmp_path / "v", config=config, remove=remove)
    with pytest.raises(LoRAError) as e:
        load_adapter(model, folder)
    msg = str(e.value)
    assert str(folder) in msg and f"'{field}'" in msg and "layers." in msg, msg
    assert lora_parameters(model) == {}


AGREEMENTS = {
    "regex": {"target_modules": r".*\.(q|k|v|o)_proj"},
    "all-linear": {"target_modules": "all-linear"},
    "exclude_other": {"exclude_modules": ["router"]},
    "layers_pattern": {"layers_to_transform": [0, 1, 2, 3], "layers_pattern": "layers"},
    "extra_module": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]},
}


@pytest.mark.parametrize("case", AGREEMENTS)
def test_peft_config_agreeing_with_its_tensors_still_loads(model, peft_adapter, tmp_path, case):
    folder = variant(peft_adapter, tmp_path / "v", config=AGREEMENTS[case])
    assert load_adapter(model, folder).targets == ("attention",)


@pytest.mark.parametrize("config_from", ["ours", "peft"])
def test_folder_with_both_peft_and_our_weights_is_refused(model, adapter, peft_adapter, tmp_path, config_from):
    folder = Path(shutil.copytree(adapter if config_from == "ours" else peft_adapter, tmp_path / "both"))
    shutil.copy(peft_adapter / PEFT_WEIGHTS if config_from == "ours" else adapter / WEIGHTS, folder)
    with pytest.raises(LoRAError) as e:
        load_adapter(model, folder)
    assert WEIGHTS in str(e.value) and PEFT_WEIGHTS in str(e.value) and str(folder) in str(e.value)


# -- item 28: errors that name the file and field, and say what is wrong -------------------------


def test_adapter_with_layers_beyond_the_model_names_its_config_file_and_field(model, adapter, tmp_path):
    folder = variant(adapter, tmp_path / "a99", config={"layers": [99]})
    with pytest.raises(LoRAError) as e:
        load_adapter(model, folder)
    assert str(folder / CONFIG) in str(e.value) and "'layers'" in str(e.value) and "99" in str(e.value)


def test_peft_adapter_missing_lora_b_says_so(model, peft_adapter, tmp_path):
    folder = variant(peft_adapter, tmp_path / "noB", drop=r"layers\.0\.self_attn\.q_proj\.lora_B")
    with pytest.raises(LoRAError) as e:
        load_adapter(model, folder)
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "lora_B is missing" in msg and "lora_B only" not in msg, msg


def test_mlxlm_adapter_missing_lora_b_says_so(model, tmp_path):
    folder = tmp_path / "mlxlm"
    folder.mkdir()
    H = model.config.hidden_size
    (folder / CONFIG).write_text(json.dumps({"fine_tune_type": "lora", "lora_parameters": {"rank": 4, "scale": 2.0}}))
    mx.save_safetensors(str(folder / WEIGHTS), {"model.layers.0.self_attn.q_proj.lora_a": mx.zeros((H, 4))})
    with pytest.raises(LoRAError) as e:
        load_adapter(model, folder)
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "lora_b is missing" in msg and "lora_b only" not in msg, msg


def test_fusing_a_peft_down_proj_adapter_reports_a_real_loss(tiny_model_dir, tmp_path):
    ours = make_adapter(tiny_model_dir, tmp_path / "experts", ("experts",), zero=("gate_up",))
    both = export_peft(ours, tmp_path / "peft_both")
    peft = variant(both, tmp_path / "peft_down", config={"target_parameters": ["mlp.experts.down_proj"]}, drop="base_layer")
    with pytest.raises(FuseError) as e:
        fuse(tiny_model_dir, peft, tmp_path / "fused", check_tokens=0, verbose=False)
    msg = str(e.value)
    assert "nan" not in msg and re.search(r"would lose \d+\.\d% of the update", msg) and "down" in msg, msg


def test_fusing_an_all_zero_expert_adapter_says_the_update_is_zero(tiny_model_dir, tmp_path):
    ours = make_adapter(tiny_model_dir, tmp_path / "zero", ("experts",), zero=("lora_b",))
    with pytest.raises(FuseError, match="zero") as e:
        fuse(tiny_model_dir, ours, tmp_path / "fused", check_tokens=0, verbose=False)
    assert "nan" not in str(e.value)


# -- item 8: absurd sizes are refused before anything is written -------------------------------


def test_fuse_refuses_check_tokens_beyond_the_context_and_leaves_nothing(tiny_model_dir, adapter, tmp_path):
    with pytest.raises(FuseError, match="check_tokens.*4096") as e:  # one past the context: it would run (and crash far past it)
        fuse(tiny_model_dir, adapter, tmp_path / "fused", check_tokens=4097, verbose=False)
    assert "context" in str(e.value)
    # the report's value, in a child process: before the bound it died of SIGSEGV, leaving a partial folder and a lock
    line = one_error(run_cli("lora", "fuse", "-m", tiny_model_dir, "--adapter", adapter, "-o", tmp_path / "fused",
                             "--check-tokens", 100_000_000))  # fmt: skip
    assert "--check-tokens" in line and "4096" in line
    assert names(tmp_path) == []  # no partial folder, no lock


def test_fuse_refuses_a_kl_check_larger_than_memory(tiny_model_dir, adapter, tmp_path, monkeypatch):
    monkeypatch.setattr(fuse_mod, "_memory_limit", lambda: 50 << 20)
    with pytest.raises(FuseError, match=r"check_tokens=2048.* GB") as e:
        fuse(tiny_model_dir, adapter, tmp_path / "fused", check_tokens=2048, verbose=False)
    assert "smaller" in str(e.value)
    assert names(tmp_path) == []
    assert fuse(tiny_model_dir, adapter, tmp_path / "fused", check_tokens=8, verbose=False, dtype="float32").kl_mean is not None


@pytest.mark.parametrize("where", ["_reference", "_kl_check", "_write_shards"])
def test_a_fuse_failing_anywhere_removes_its_partial_folder_and_lock(tiny_model_dir, adapter, tmp_path, monkeypatch, where):
    def boom(*a, **k):
        raise RuntimeError("[malloc] Unable to allocate 400000000000 bytes")

    monkeypatch.setattr(fuse_mod, where, boom)
    with pytest.raises(RuntimeError):
        fuse(tiny_model_dir, adapter, tmp_path / "fused", verbose=False)
    assert names(tmp_path) == []


def test_apply_lora_refuses_a_rank_beyond_the_adapted_matrices(model):
    with pytest.raises(LoRAError, match=r"rank 100000000 .*64") as e:
        apply_lora(model, LoRASpec(rank=100_000_000))
    assert "--rank" not in str(e.value)  # the library speaks of its field
    assert lora_parameters(model) == {}
    apply_lora(model, LoRASpec(rank=64, targets=("attention", "router")))  # the largest useful rank here
    assert lora_parameters(model)["layers.0.self_attn.q_proj.lora_a"].shape == (64, 64)


# -- item 17: numbers reaching the spec and fuse --------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("rank", True), ("rank", 2.0), ("rank", float("nan")), ("alpha", float("nan")), ("alpha", float("inf")),
     ("alpha", True), ("alpha", "16"), ("alpha", 1e300), ("dropout", float("nan")), ("dropout", True), ("dropout", -0.1)],
)  # fmt: skip
def test_spec_refuses_non_numbers_naming_the_field(field, value):
    with pytest.raises(LoRAError, match=f"^{field} must be"):
        LoRASpec(**{field: value})


def test_spec_numbers_are_plain_python_numbers():
    spec = LoRASpec(rank=np.int64(4), alpha=np.float32(8.0))
    assert type(spec.rank) is int and type(spec.alpha) is float
    json.dumps(spec.to_dict())


@pytest.mark.parametrize(
    "option, value, field",
    [("check_tokens", True, "check_tokens"), ("check_tokens", -1, "check_tokens"), ("check_tokens", 8.0, "check_tokens"),
     ("seed", float("nan"), "seed"), ("seed", -5, "seed"), ("experts_bf16", "yes", "experts_bf16"),
     ("allow_loss", 1, "allow_loss"), ("dtype", "float8", "dtype")],
)  # fmt: skip
def test_fuse_refuses_bad_options_naming_them(tiny_model_dir, adapter, tmp_path, option, value, field):
    with pytest.raises(ValueError, match=field):
        fuse(tiny_model_dir, adapter, tmp_path / "fused", verbose=False, **{option: value})
    assert names(tmp_path) == []


# -- 29e: KL is never negative ---------------------------------------------------------------------


def test_kl_of_equal_distributions_rounded_apart_is_not_negative():
    rng = np.random.default_rng(0)
    logits = mx.array(rng.normal(0, 3, (1, 64, 512)).astype(np.float32))
    ref = fuse_mod._log_softmax(logits)
    got = fuse_mod._log_softmax(logits + mx.array(rng.normal(0, 1e-6, logits.shape).astype(np.float32)))
    kl = fuse_mod._kl(ref, got)
    assert mx.min(kl).item() >= 0


def test_fuse_float32_never_reports_a_negative_kl(tiny_model_dir, tmp_path):
    ad = make_adapter(tiny_model_dir, tmp_path / "ad", ("attention", "router"), std=0.1)
    got = run_cli("lora", "fuse", "-m", tiny_model_dir, "--adapter", ad, "-o", tmp_path / "fused", "--dtype", "float32")
    assert got.returncode == 0, got.stderr
    report = json.loads((tmp_path / "fused" / FUSE_RECORD).read_text())["report"]
    assert report["kl_mean"] >= 0 and report["kl_max"] >= 0 and report["kl_adapter_mean"] >= 0, report
    shown = re.search(r"KL\(unfused \|\| fused\) over 64 random tokens: mean (\S+), max (\S+) nats", got.stderr)
    assert shown and not shown.group(1).startswith("-") and not shown.group(2).startswith("-"), got.stderr


# -- 29j: losing most of the update is an error unless allowed -------------------------------------


@pytest.fixture(scope="module")
def small_update(tiny_model_dir, tmp_path_factory) -> Path:
    """An adapter whose update is mostly below bf16's resolution of the weights."""
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("ad") / "small", ("attention", "router"), std=0.003)


def test_fuse_losing_most_of_the_update_is_refused_and_writes_nothing(tiny_model_dir, small_update, tmp_path):
    with pytest.raises(UpdateLostError) as e:
        fuse(tiny_model_dir, small_update, tmp_path / "fused", verbose=False)
    msg = str(e.value)
    assert re.search(r"lose \d+\.\d% of the adapter's update", msg) and "float32" in msg and "allow_loss" in msg, msg
    assert e.value.lost > 0.5 and e.value.worst.startswith("layers.")
    assert names(tmp_path) == []
    line = one_error(run_cli("lora", "fuse", "-m", tiny_model_dir, "--adapter", small_update, "-o", tmp_path / "fused"))
    assert "--dtype float32" in line and "--allow-loss" in line and f"--adapter {small_update}" in line, line
    assert names(tmp_path) == []


def test_fuse_allowed_to_lose_the_update_warns_loudly(tiny_model_dir, small_update, tmp_path):
    got = run_cli("lora", "fuse", "-m", tiny_model_dir, "--adapter", small_update, "-o", tmp_path / "fused", "--allow-loss",
                  "--check-tokens", 8)  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert re.search(r"^warning: .*lost \d+\.\d% of the adapter's update", got.stderr, re.M), got.stderr
    assert (tmp_path / "fused" / FUSE_RECORD).is_file()
    report = fuse(tiny_model_dir, small_update, tmp_path / "f32", dtype="float32", check_tokens=0, verbose=False)
    assert report.update_lost < 1e-6  # float32 keeps it whole: no refusal
