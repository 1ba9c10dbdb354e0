"""Converted models in the cache: first use of a repo id (where, how much, the download kept or
dropped), `list`, `rm`, and a repo id wherever a model is named.

No network: the subprocess cases run the real huggingface_hub offline (``HF_HUB_OFFLINE=1``) on
a Hugging Face cache laid out in a temp folder; the in-process cases fake ``snapshot_download``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from mlx_gptoss.config import GptOssConfig
from mlx_gptoss.loader import LoadError
from mlx_gptoss.models import resolve_model
from mlx_gptoss.testing import write_release
from mlx_gptoss_convert import ConversionError

REPO = "someone/gpt-oss-tiny"
CFG = GptOssConfig.tiny(vocab_size=201088, num_hidden_layers=2)  # harmony's token ids, for generate


def hub_cache(hub: Path, repo_id: str, files: Path, commit: str = "0123abcd") -> Path:
    """``files`` as a downloaded revision of ``repo_id`` in a Hugging Face cache at ``hub`` (blobs + links)."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in sorted(files.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return snap


@pytest.fixture(scope="module")
def release(tmp_path_factory, tokenizer_json):
    return write_release(tmp_path_factory.mktemp("rel") / "release", CFG, seed=2, tokenizer=tokenizer_json)


@pytest.fixture
def env(tmp_path, release):
    """A subprocess environment: our cache and a Hugging Face cache (holding REPO) in tmp_path, offline."""
    snap = hub_cache(tmp_path / "hub", REPO, release)
    e = {**os.environ, "MLX_GPTOSS_CACHE": str(tmp_path / "cache"), "HF_HUB_CACHE": str(tmp_path / "hub"),
         "HF_HUB_OFFLINE": "1"}  # fmt: skip
    e.pop("MLX_GPTOSS_KEEP_DOWNLOAD", None)
    return SimpleNamespace(vars=e, snapshot=snap, models=tmp_path / "cache" / "models")


def cli(env, *args, stdin=subprocess.DEVNULL):
    return subprocess.run([sys.executable, "-m", "mlx_gptoss.cli", *args], env=env.vars, capture_output=True, text=True,
                          stdin=stdin, timeout=300)  # fmt: skip


def test_repo_id_everywhere_and_the_first_conversion_says_where_and_how_much(env):
    r = cli(env, "doctor", "-m", REPO)  # doctor names the converted copy, it never starts a download
    assert r.returncode == 1 and f"{REPO}: not converted yet" in r.stderr and "mlx-gptoss convert" in r.stderr
    r = cli(env, "generate", "-m", REPO, "--raw", "hello", "--max-tokens", "2", "--drop-download")
    assert r.returncode == 0, r.stderr
    converted = env.models / "someone--gpt-oss-tiny"
    assert f"converting it once into {converted}" in r.stderr and "dropped the download" in r.stderr
    assert not env.snapshot.exists()  # the revision left the Hugging Face cache
    r = cli(env, "doctor", "-m", REPO)
    assert r.returncode == 0, r.stderr
    r = cli(env, "list")
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()
    assert header.split()[:2] == ["NAME", "SOURCE"] and row.split()[0] == REPO and row.split()[-1] == "1"


def test_convert_a_repo_id_at_a_revision_keeps_the_download_and_says_what_dropping_frees(env, tmp_path):
    r = cli(env, "convert", REPO, str(tmp_path / "out"), "--revision", "main")
    assert r.returncode == 0, r.stderr
    assert f"converting it once into {tmp_path / 'out'}" in r.stderr
    assert f"the download is kept in {env.snapshot}" in r.stderr and f"hf cache rm model/{REPO}" in r.stderr
    assert env.snapshot.exists()
    r = cli(env, "convert", REPO, str(tmp_path / "out"))
    assert r.returncode == 1 and "already exists" in r.stderr and "downloading" not in r.stderr
    r = cli(env, "convert", str(tmp_path / "out"), str(tmp_path / "again"), "--revision", "v2")
    assert r.returncode == 1 and "--revision is for a Hugging Face repo id" in r.stderr


def test_list_and_rm_only_our_conversions(env, tiny_model_dir):
    env.models.mkdir(parents=True)
    shutil.copytree(tiny_model_dir, env.models / "openai--gpt-oss-mini")
    (env.models / "not--ours").mkdir()
    (env.models / "not--ours" / "config.json").write_text('{"model_type": "gpt_oss"}')
    r = cli(env, "list")
    assert [line.split()[0] for line in r.stdout.splitlines()] == ["NAME", "openai/gpt-oss-mini"]
    r = cli(env, "rm", "not/ours", "--yes")
    assert r.returncode == 1 and "not a model mlx-gptoss converted; not removed" in r.stderr
    r = cli(env, "rm", "openai/gpt-oss-mini")  # no terminal to confirm on
    assert r.returncode == 1 and "confirm with --yes" in r.stderr and (env.models / "openai--gpt-oss-mini").exists()
    r = cli(env, "rm", "nobody/none", "--yes")
    assert r.returncode == 1 and "no such converted model" in r.stderr and "openai/gpt-oss-mini" in r.stderr
    r = cli(env, "rm", "openai/gpt-oss-mini", "--yes")
    assert r.returncode == 0 and "removed" in r.stderr and not (env.models / "openai--gpt-oss-mini").exists()
    assert (env.models / "not--ours").exists()
    assert "no converted models" in cli(env, "list").stderr


@pytest.fixture
def fake_hub(tmp_path, release, monkeypatch):
    """snapshot_download and model_info faked: calls recorded, the release served from a temp HF cache."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls = []

    def snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        listed = ["config.json", "model-00000-of-00001.safetensors", "original/model.safetensors", "metal/model.bin"]
        kept = list(filter_repo_objects(listed, allow_patterns=kw["allow_patterns"], ignore_patterns=kw["ignore_patterns"]))
        assert kept == ["config.json", "model-00000-of-00001.safetensors"]  # not the release's second copy
        snap = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "0123abcd"
        return str(snap if snap.exists() else hub_cache(tmp_path / "hub", repo_id, release))

    sizes = {}

    def model_info(self, repo_id, **kw):
        if not sizes:
            raise huggingface_hub.errors.OfflineModeIsEnabled("offline")
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=k, size=v) for k, v in sizes.items()])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setenv("MLX_GPTOSS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLX_GPTOSS_KEEP_DOWNLOAD", raising=False)
    return SimpleNamespace(
        calls=calls, sizes=sizes, snapshot=tmp_path / "hub" / "models--someone--gpt-oss-tiny" / "snapshots" / "0123abcd"
    )


def test_token_and_revision_reach_the_hub_and_a_repo_id_converts_once(fake_hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    path = resolve_model(REPO, revision="v1", progress=False)
    assert path.name == "someone--gpt-oss-tiny@v1" and (path / "config.json").is_file()
    ((repo_id, kw),) = fake_hub.calls
    assert repo_id == REPO and kw["token"] == "hf_secret" and kw["revision"] == "v1"
    err = capsys.readouterr().err
    assert f"converting it once into {path} (about twice the download)" in err and "the download is kept" in err
    assert resolve_model(REPO, revision="v1") == path and len(fake_hub.calls) == 1
    assert fake_hub.snapshot.exists()


def test_free_space_is_checked_before_the_download(fake_hub, monkeypatch, capsys):
    import mlx_gptoss_convert.destination as destination

    fake_hub.sizes.update({"model-00000-of-00001.safetensors": 30 << 30, "original/model.safetensors": 30 << 30})
    monkeypatch.setattr(destination.shutil, "disk_usage", lambda p: SimpleNamespace(free=10 << 30))
    with pytest.raises(ConversionError, match=r"not enough free space: the conversion needs 32\.48 GB, 10\.74 GB is free"):
        resolve_model(REPO)
    assert (
        fake_hub.calls == [] and "about 32.21 GB for the download and as much for the converted copy" in capsys.readouterr().err
    )


def test_drop_download_setting(fake_hub, monkeypatch):
    monkeypatch.setenv("MLX_GPTOSS_KEEP_DOWNLOAD", "maybe")
    with pytest.raises(ValueError, match=r"MLX_GPTOSS_KEEP_DOWNLOAD='maybe': expected 1 or 0"):
        resolve_model(REPO)
    assert fake_hub.calls == []
    monkeypatch.setenv("MLX_GPTOSS_KEEP_DOWNLOAD", "0")
    path = resolve_model(REPO, progress=False)
    assert not fake_hub.snapshot.exists() and (path / "config.json").is_file()


def test_not_a_repo_id(tmp_path):
    with pytest.raises(LoadError, match="no such folder, and not a Hugging Face repo id"):
        resolve_model(str(tmp_path / "missing" / "deeper" / "x"))


# -- rm follows convert --force's rule; list and rm see the same folders (issue 22, items 3, 4, 10) ----


def _one_error(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert r.returncode != 0 and len(lines) == 1, r.stderr[-2000:]
    return lines[0]


def test_rm_keeps_a_conversion_holding_your_files_as_convert_force_does(env, tiny_model_dir, releases):
    env.models.mkdir(parents=True)
    dst = env.models / "me--mine"
    shutil.copytree(tiny_model_dir, dst)
    (dst / "NOTES.txt").write_text("my notes")
    (dst / "adapter").mkdir()
    (dst / "adapter" / "adapters.safetensors").write_bytes(b"\0" * 1000)
    force = _one_error(cli(env, "convert", releases["hf"], dst, "--force"))
    rm = _one_error(cli(env, "rm", "me/mine", "--yes"))
    for line in (force, rm):  # one rule, one answer: both name what a conversion does not write
        assert "NOTES.txt, adapter, which a conversion does not write" in line, line
    assert "rm would delete them" in rm and (dst / "NOTES.txt").is_file() and (dst / "adapter" / "adapters.safetensors").is_file()
    r = cli(env, "rm", "me/mine")  # refused before asking, not after a "yes"
    assert "NOTES.txt" in _one_error(r) and "confirm with --yes" not in r.stderr


def test_rm_refuses_a_subfolder_and_counts_what_it_frees(env, tiny_model_dir):
    from mlx_gptoss.models import folder_bytes

    env.models.mkdir(parents=True)
    dst = env.models / "me--big"
    shutil.copytree(tiny_model_dir, dst)
    (dst / "sub").mkdir()
    with open(dst / "sub" / "blob.bin", "wb") as f:  # sparse: 200 MB apparent size, no disk used
        f.truncate(200_000_000)
    assert "sub" in _one_error(cli(env, "rm", "me/big", "--yes")) and (dst / "sub" / "blob.bin").is_file()
    assert folder_bytes(dst) == sum(p.stat().st_size for p in dst.rglob("*") if p.is_file()) > 200_000_000
    shutil.rmtree(dst / "sub")
    size = folder_bytes(dst)
    r = cli(env, "rm", "me/big", "--yes")
    assert r.returncode == 0 and f"({size / 1e9:.2f} GB freed)" in r.stderr and not dst.exists(), r.stderr


@pytest.mark.parametrize("folder", [".hidden", ".me--mine.partial-abcd1234", "."])
def test_rm_never_reaches_a_folder_list_does_not_show(env, tiny_model_dir, folder):
    env.models.mkdir(parents=True)
    if folder != ".":
        shutil.copytree(tiny_model_dir, env.models / folder)
    assert folder not in cli(env, "list").stdout
    line = _one_error(cli(env, "rm", folder, "--yes"))
    assert "no such converted model" in line, line
    assert (env.models / folder / "config.json").is_file() or folder == "."
    assert env.models.is_dir()


def test_an_empty_cache_variable_is_unset_not_the_current_directory(tmp_path, tiny_model_dir):
    work, home = tmp_path / "work", tmp_path / "home"
    home.mkdir()
    shutil.copytree(tiny_model_dir, work / "models" / "mywork")  # a project folder that happens to hold models/
    e = {**os.environ, "MLX_GPTOSS_CACHE": "", "HOME": str(home)}
    r = subprocess.run([sys.executable, "-m", "mlx_gptoss.cli", "rm", "mywork", "--yes"], env=e, cwd=work,
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)  # fmt: skip
    assert (work / "models" / "mywork" / "config.json").is_file(), r.stderr
    assert f"no such converted model in {home / '.cache' / 'mlx-gptoss' / 'models'}" in _one_error(r)


def test_cache_root_is_absolute_and_empty_means_the_default(tmp_path, monkeypatch):
    from mlx_gptoss.paths import cache_root

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    for empty in ("", "  "):
        monkeypatch.setenv("MLX_GPTOSS_CACHE", empty)
        assert cache_root() == tmp_path / "home" / ".cache" / "mlx-gptoss"
    monkeypatch.setenv("MLX_GPTOSS_CACHE", "relative/cache")  # taken from the current directory, as a path argument is
    assert cache_root() == tmp_path / "relative" / "cache"
    monkeypatch.setenv("MLX_GPTOSS_CACHE", "~/c")
    assert cache_root() == tmp_path / "home" / "c"


@pytest.mark.parametrize("odd", [["x"], "8bit", 7, {"attention": 8}])
def test_list_shows_every_model_when_one_config_is_odd(env, tiny_model_dir, odd):
    env.models.mkdir(parents=True)
    shutil.copytree(tiny_model_dir, env.models / "good--model")
    shutil.copytree(tiny_model_dir, env.models / "odd--model")
    cfg = json.loads((env.models / "odd--model" / "config.json").read_text())
    cfg["quantization"] = odd
    (env.models / "odd--model" / "config.json").write_text(json.dumps(cfg))
    r = cli(env, "list")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
    assert set(rows) == {"good/model", "odd/model"} and rows["odd/model"][4] == "?", r.stdout
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "odd--model" in warnings[0] and '"quantization"' in warnings[0], r.stderr
