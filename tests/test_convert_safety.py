"""The converter never destroys data: no source/destination overlap, --force replaces only an
earlier conversion, one conversion per destination, signals and full or read-only disks leave
nothing behind, the tokenizer is checked before any weight is written. CLI cases run the real
command in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY

from mlx_gptoss.testing import write_release
from mlx_gptoss_convert import ConversionError, convert

# Runs the CLI with SafetensorsWriter.write held at its first call until GATE/go exists (GATE/started
# says it got there), so a test can act on a conversion that is midway.
SLOW_CLI = """
import sys, time, pathlib
from mlx_gptoss.safetensors_io import SafetensorsWriter
gate, real = pathlib.Path(sys.argv[1]), SafetensorsWriter.write
def write(self, name, data):
    (gate / "started").touch()
    while not (gate / "go").exists():
        time.sleep(0.01)
    return real(self, name, data)
SafetensorsWriter.write = write
from mlx_gptoss.cli import main
main(sys.argv[2:], prog_name="mlx-gptoss")
"""
# Runs the CLI with the disk reporting only 1000 bytes free.
FULL_DISK_CLI = """
import shutil, sys
shutil.disk_usage = lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000)
from mlx_gptoss.cli import main
main(sys.argv[1:], prog_name="mlx-gptoss")
"""
# Runs the CLI with every tensor write failing as on a full disk.
ENOSPC_CLI = """
import errno, os, sys
from mlx_gptoss.safetensors_io import SafetensorsWriter
def write(self, name, data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
SafetensorsWriter.write = write
from mlx_gptoss.cli import main
main(sys.argv[1:], prog_name="mlx-gptoss")
"""


def cli(*args: str, code: str | None = None, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    head = [sys.executable, "-c", code] if code else [sys.executable, "-m", "mlx_gptoss.cli"]
    env = {**os.environ, **(env or {})}
    return subprocess.run([*head, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def clean_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """The one-line error of a failed command, checked for each needle."""
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert len(err) == 1, r.stderr
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def start_slow(gate: Path, *args: str) -> subprocess.Popen:
    gate.mkdir()
    p = subprocess.Popen([sys.executable, "-c", SLOW_CLI, str(gate), *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not (gate / "started").exists():
        assert p.poll() is None, p.communicate()[1]
        assert time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.02)
    return p


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def hf(releases, tmp_path) -> Path:
    """A private copy of the tiny HF release (tests may try to destroy it)."""
    return Path(shutil.copytree(releases["hf"], tmp_path / "hf-release"))


@pytest.fixture
def original_only(releases, tmp_path) -> Path:
    """A release folder holding nothing but original/."""
    return Path(shutil.copytree(releases["original"], tmp_path / "orig-release"))


# -- 1. source and destination never overlap; --force replaces only a conversion ---------------


def test_force_onto_an_original_only_source_is_refused(original_only):
    before = files(original_only)
    with pytest.raises(ConversionError, match="destroy the source"):
        convert(original_only, original_only, force=True)
    assert files(original_only) == before


def test_force_with_layout_original_onto_a_full_download_is_refused(releases, tmp_path):
    src = Path(shutil.copytree(releases["hf"], tmp_path / "full"))
    shutil.copytree(releases["original"] / "original", src / "original")
    before = files(src)
    with pytest.raises(ConversionError, match="destroy the source"):
        convert(src, src, layout="original", force=True)
    assert files(src) == before


def test_destination_holding_the_source_is_refused(releases, tmp_path):
    models = tmp_path / "models"
    src = Path(shutil.copytree(releases["hf"], models / "release"))
    before = files(models)
    with pytest.raises(ConversionError, match="contains the source"):
        convert(src, models, force=True)
    with pytest.raises(ConversionError, match="contains the source"):
        convert(src, src / ".." / ".." / "models", force=True)  # the same folder, spelled with ..
    assert files(models) == before


def test_destination_through_a_symlink_into_the_source_is_refused(hf, tmp_path):
    (tmp_path / "link").symlink_to(hf)
    with pytest.raises(ConversionError, match="inside the source"):
        convert(hf, tmp_path / "link" / "out")
    assert not (hf / "out").exists()


def test_force_keeps_a_folder_that_is_not_a_conversion(hf, tmp_path):
    models = tmp_path / "models"
    (models / "llama").mkdir(parents=True)
    (models / "llama" / "config.json").write_text("{}")
    before = files(models)
    with pytest.raises(ConversionError, match="not an mlx-gptoss conversion"):
        convert(hf, models, force=True)
    assert files(models) == before and hidden(tmp_path) == []


def test_force_keeps_a_conversion_holding_other_files(hf, tmp_path):
    dst = convert(hf, tmp_path / "out")
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match="notes.txt"):
        convert(hf, dst, force=True)
    assert (dst / "notes.txt").read_text() == "mine"


def test_force_and_rm_share_one_rule_for_a_conversion_you_added_to(hf, tmp_path):
    from mlx_gptoss_convert.convert import is_output
    from mlx_gptoss_convert.destination import check_only_outputs

    dst = convert(hf, tmp_path / "out")
    check_only_outputs(dst, is_output, "rm")  # a pristine conversion: nothing of yours to lose
    (dst / "adapter").mkdir()  # a subfolder, a link, a file of another name: yours
    (dst / "link.safetensors").symlink_to(dst / "config.json")
    for action in ("--force", "rm"):
        with pytest.raises(
            ConversionError,
            match=f"holds adapter, link.safetensors, which a conversion does not write; {action} would delete them",
        ):
            check_only_outputs(dst, is_output, action)
    with pytest.raises(ConversionError, match="holds adapter, link.safetensors"):
        convert(hf, dst, force=True)
    assert (dst / "adapter").is_dir() and (dst / "link.safetensors").is_symlink()


def test_force_replaces_an_earlier_conversion(hf, tmp_path):
    dst = convert(hf, tmp_path / "out")
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "marker": 1}))
    convert(hf, dst, force=True)
    assert "marker" not in json.loads((dst / "config.json").read_text())
    assert hidden(tmp_path) == []


def test_cli_refuses_overlap_with_one_clean_line(original_only):
    before = files(original_only)
    clean_error(cli("convert", original_only, original_only, "--force"), "destroy the source")
    clean_error(cli("convert", ".", ".", "--force", cwd=original_only), "destroy the source")
    assert files(original_only) == before


def test_cli_refuses_a_folder_of_other_models(hf, tmp_path):
    (tmp_path / "models" / "other").mkdir(parents=True)
    (tmp_path / "models" / "other" / "weights.bin").write_bytes(b"x")
    clean_error(cli("convert", hf, tmp_path / "models", "--force"), "not an mlx-gptoss conversion")
    assert (tmp_path / "models" / "other" / "weights.bin").read_bytes() == b"x"


# -- 2. one conversion at a time per destination -----------------------------------------------


def test_second_conversion_into_the_same_destination_fails_at_once(hf, tmp_path):
    dst = tmp_path / "out"
    first = start_slow(tmp_path / "gate", "convert", hf, dst)
    try:
        second = cli("convert", hf, dst, "--force")
        clean_error(second, "another conversion", f"pid {first.pid}", ".out.lock")
        assert any(n.startswith(".out.partial-") for n in hidden(tmp_path))  # the first one's work is untouched
    finally:
        (tmp_path / "gate" / "go").touch()
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert "converted" in err and (dst / "config.json").is_file()
    assert hidden(tmp_path) == []


# -- 3. signals: SIGTERM/SIGHUP clean up, a SIGKILL'ed partial is removed by the next run -----------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_leave_nothing(hf, tmp_path, sig):
    p = start_slow(tmp_path / "gate", "convert", hf, tmp_path / "out")
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "Traceback" not in err, err
    assert sig.name in err
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


def test_sigkill_leaves_a_partial_that_the_next_run_removes(hf, tmp_path, capsys):
    p = start_slow(tmp_path / "gate", "convert", hf, tmp_path / "out")
    p.kill()
    p.wait(timeout=60)
    partial = [n for n in hidden(tmp_path) if n.startswith(".out.partial-")]
    assert len(partial) == 1
    convert(hf, tmp_path / "out")
    assert "removed" in capsys.readouterr().err
    assert (tmp_path / "out" / "config.json").is_file() and hidden(tmp_path) == []


def test_an_earlier_conversion_moved_aside_is_restored_after_a_kill(hf, tmp_path):
    # killed between moving the old conversion aside and moving the new one in: DST is missing
    convert(hf, tmp_path / "first")
    aside = tmp_path / ".out.old-abcd1234"
    aside.mkdir()
    os.replace(tmp_path / "first", aside / "out")
    (tmp_path / ".out.partial-efgh5678").mkdir()
    r = cli("convert", hf, tmp_path / "out")  # no --force: the restored conversion must be kept
    assert r.returncode != 0 and "already exists" in r.stderr
    assert (tmp_path / "out" / "config.json").is_file() and hidden(tmp_path) == []


def test_partials_of_other_destinations_are_kept(hf, tmp_path):
    other = tmp_path / ".out2.partial-abcd1234"
    other.mkdir()
    convert(hf, tmp_path / "out")
    assert other.is_dir()


# -- 4. full disk, read-only folder, DST "." --------------------------------------------------


def test_not_enough_free_space_is_refused_before_writing(hf, tmp_path):
    r = cli("convert", hf, tmp_path / "out", code=FULL_DISK_CLI)
    clean_error(r, "not enough free space", "needs", "free")
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


def test_disk_full_while_writing_is_a_clean_error(hf, tmp_path):
    r = cli("convert", hf, tmp_path / "out", code=ENOSPC_CLI)
    clean_error(r, str(tmp_path / "out"), "No space left on device")
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


def test_read_only_destination_is_a_clean_error(hf):
    ro = Path("/sys")  # read-only even for root, unlike a chmod'ed folder
    try:
        (ro / ".mlx-gptoss-probe").touch()
    except OSError:
        pass
    else:  # pragma: no cover - a system where /sys is writable
        (ro / ".mlx-gptoss-probe").unlink()
        pytest.skip("/sys is writable here")
    clean_error(cli("convert", hf, ro / "mlx-gptoss-out"), "/sys", "cannot write")
    clean_error(cli("convert", hf, ro / "no-such" / "out"), "/sys")  # /sys reports no free space


def test_dot_as_destination_is_a_clean_error(hf, tmp_path):
    here = tmp_path / "here"
    here.mkdir()
    clean_error(cli("convert", hf, ".", "--force", cwd=here), "current directory")
    assert list(here.iterdir()) == []


# -- 5. the tokenizer: checked first, taken from the parent folder only for original/ ---------


def small_tokenizer(path: Path) -> Path:
    path.write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": []}))
    return path


@pytest.mark.parametrize("text", ["{not json", '{"model": {}}'])
def test_a_corrupt_tokenizer_fails_before_any_weight_is_written(hf, tmp_path, monkeypatch, text):
    import importlib

    conv = importlib.import_module("mlx_gptoss_convert.convert")
    (hf / "tokenizer.json").write_text(text)
    opened = []
    monkeypatch.setattr(conv, "SafetensorsWriter", lambda *a, **k: opened.append(a) or pytest.fail("wrote weights"))
    with pytest.raises(ConversionError, match="tokenizer.json: not a valid tokenizer.json"):
        convert(hf, tmp_path / "out")
    assert opened == [] and hidden(tmp_path) == []


def test_hf_layout_ignores_a_tokenizer_in_the_parent_folder(tmp_path):
    small_tokenizer(tmp_path / "tokenizer.json")
    src = write_release(tmp_path / "release", TINY)
    dst = convert(src, tmp_path / "out")
    assert not (dst / "tokenizer.json").exists()


def test_original_layout_takes_the_tokenizer_beside_original(original_only, tmp_path):
    small_tokenizer(original_only / "tokenizer.json")
    dst = convert(original_only, tmp_path / "out")
    assert (dst / "tokenizer.json").read_text() == (original_only / "tokenizer.json").read_text()


# -- 6. offline with a repo id --------------------------------------------------------------


def test_offline_repo_id_says_how_to_convert_and_use_model(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "MLX_GPTOSS_CACHE": str(tmp_path / "cache")}
    r = cli("generate", "-m", "someone/gpt-oss-nowhere", "hi", env=env)
    clean_error(r, "no network", "mlx-gptoss convert SRC DST", "--model DST")
    r = cli("convert", "someone/gpt-oss-nowhere", tmp_path / "out", env=env)
    clean_error(r, "no network", "as SRC")
