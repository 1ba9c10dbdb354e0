"""The CLI's answers to misuse: one ``Error:`` line, no traceback, for a number or a seed it cannot
take, a flag that would be ignored, a conversation file it cannot read, an output it cannot write;
and the terminal chat's ``/save``, ``/load`` and banner.

The CLI cases run the real command in a subprocess. Most are refused while the options are parsed,
before the model loads, so they take about a second each.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import mlx_gptoss
from mlx_gptoss.chat import ChatSession
from mlx_gptoss.repl import Repl

CLI = [sys.executable, "-m", "mlx_gptoss.cli"]
DOCS = Path(__file__).resolve().parents[1] / "docs"
DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's JSON decoder can recurse


def cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)


def one_error(proc: subprocess.CompletedProcess) -> str:
    """The command failed with exactly one ``Error:`` line and no traceback: that line."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert proc.returncode != 0, (proc.returncode, proc.stderr[-2000:])
    return lines[0]


@pytest.fixture(scope="module")
def model(vocab_model_dir):
    return mlx_gptoss.load(vocab_model_dir)


# -- seeds (item 9) -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", ["-5", str(10**24), "2", "1.5"])
def test_generate_seed_outside_0_to_2_64_is_one_error_line(vocab_model_dir, seed):
    if seed == "2":
        seed = str(2**64)  # one past the largest seed MLX takes
    line = one_error(cli("generate", "-m", vocab_model_dir, "--max-tokens", "2", "--seed", seed, "hi"))
    assert "--seed" in line and "-1" in line, line


def test_chat_seed_minus_one_is_a_random_seed(vocab_model_dir):
    proc = cli("chat", "-m", vocab_model_dir, "--seed", "-1")  # stdin at EOF: the chat starts and leaves
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "chat with" in proc.stderr
    line = one_error(cli("chat", "-m", vocab_model_dir, "--seed", "-7"))
    assert "--seed" in line, line


def test_generate_seed_minus_one_samples_and_a_seed_reproduces(vocab_model_dir):
    base = ["generate", "-m", vocab_model_dir, "--raw", "--max-tokens", "4", "--json", "--temp", "1.5", "The fox"]
    a, b = cli(*base, "--seed", "7"), cli(*base, "--seed", "7")
    rnd = cli(*base, "--seed", "-1")
    assert a.returncode == b.returncode == rnd.returncode == 0, (a.stderr + rnd.stderr)[-2000:]
    assert json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"] and json.loads(rnd.stdout)["tokens"]


# -- numeric options (item 17) --------------------------------------------------------------------

ABSURD = "99999999999"  # beyond any count MLX's int32 indices hold


@pytest.mark.parametrize(
    "command, flag, value",
    [
        ("generate", "--temp", "nan"),
        ("generate", "--temp", "inf"),
        ("generate", "--top-p", "nan"),
        ("generate", "--min-p", "nan"),
        ("generate", "--top-k", ABSURD),
        ("generate", "--max-tokens", ABSURD),
        ("generate", "--prefill-step", ABSURD),
        ("generate", "--context", ABSURD),
        ("chat", "--temp", "nan"),
        ("chat", "--max-tokens", ABSURD),
        ("chat", "--top-k", "-3"),
        ("serve", "--context", ABSURD),
        ("doctor", "--context", ABSURD),
        ("doctor", "--train-seq-len", ABSURD),
        ("doctor", "--lora-rank", "nan"),
        ("serve", "--port", "99999"),
        ("serve", "--max-queue", "0"),
        ("serve", "--max-tokens", ABSURD),
        ("lora fuse", "--check-tokens", "nan"),
        ("testing tiny-model", "--layers", "0"),
    ],
)
def test_a_number_an_option_cannot_take_is_one_error_line_naming_it(vocab_model_dir, command, flag, value):
    extra = ["--memory-budget", "1GB"] if flag == "--context" and command != "doctor" else []
    extra += ["--train-seq-len", "64"] if flag == "--lora-rank" else []
    where = ["/tmp/never-written"] if command == "testing tiny-model" else ["-m", vocab_model_dir]
    where += ["--adapter", "x", "-o", "y"] if command == "lora fuse" else []
    args = [*command.split(), *where, *extra, flag, value] + (["hi"] if command == "generate" else [])
    line = one_error(cli(*args))
    assert line.startswith(f"Error: {flag} must be"), line


def test_tiny_model_vocab_beyond_a_tiny_model_is_one_error_line(tmp_path):
    # 99999999999 tokens would have it allocate hundreds of GB before anything is said
    line = one_error(cli("testing", "tiny-model", tmp_path / "t", "--vocab", ABSURD, timeout=30))
    assert line.startswith("Error: --vocab must be") and not (tmp_path / "t").exists(), line


def test_number_type_keeps_what_valid_values_do():
    from mlx_gptoss.cli.common import INT_MAX, Number

    @click.command()
    @click.option("--temp", type=Number(min=0), default=0.0)
    @click.option("--top-k", type=Number(integer=True, min=0, max=INT_MAX), default=0)
    def cmd(temp, top_k):
        click.echo(f"{temp!r} {top_k!r}")

    runner = CliRunner()
    assert runner.invoke(cmd, []).output == "0.0 0\n"
    assert runner.invoke(cmd, ["--temp", "0.7", "--top-k", "40"]).output == "0.7 40\n"
    assert runner.invoke(cmd, ["--temp", "2", "--top-k", str(INT_MAX)]).output == f"2.0 {INT_MAX}\n"
    bad = runner.invoke(cmd, ["--top-k", "4.5"])
    assert bad.exit_code == 2 and "Error: --top-k must be an integer" in bad.output and "'4.5'" in bad.output


# -- flags that would be ignored (item 25) ---------------------------------------------------------


@pytest.mark.parametrize(
    "args, said",
    [
        (["generate", "--context", "64", "hi"], "--context needs --memory-budget"),
        (["generate", "--show-plan", "hi"], "--show-plan needs --memory-budget"),
        (["chat", "--context", "64"], "--context needs --memory-budget"),
        (["serve", "--context", "64"], "--context needs --memory-budget"),
        (["generate", "--raw", "--system", "Be brief.", "hi"], "--system has no effect with --raw"),
        (["generate", "--raw", "--reasoning-effort", "high", "hi"], "--reasoning-effort has no effect with --raw"),
        (["generate", "--raw", "--show-reasoning", "hi"], "--show-reasoning has no effect with --raw"),
        (["doctor", "--lora-rank", "64"], "--lora-rank needs --train-seq-len"),
        (["doctor", "--lora-targets", "experts"], "--lora-targets needs --train-seq-len"),
        (["doctor", "--lora-layers", "last:1"], "--lora-layers needs --train-seq-len"),
    ],
)
def test_a_flag_that_would_be_ignored_is_one_error_line(vocab_model_dir, args, said):
    line = one_error(cli(args[0], "-m", vocab_model_dir, *args[1:]))
    assert said in line, line


def test_doctor_sizing_options_need_a_model():
    for args, flag in ((["--train-seq-len", "64"], "--train-seq-len"), (["--context", "4096"], "--context")):
        line = one_error(cli("doctor", *args))
        assert f"{flag} needs -m/--model" in line, line


def test_export_mlx_lm_with_dequantize_is_one_error_line(vocab_model_dir, tmp_path):
    line = one_error(cli("export", vocab_model_dir, tmp_path / "out", "--format", "mlx-lm", "--dequantize"))
    assert "--dequantize" in line and "--format hf" in line, line
    assert not (tmp_path / "out").exists()


def test_budget_flags_and_lora_sizing_still_work_together(vocab_model_dir):
    proc = cli("doctor", "-m", vocab_model_dir, "--train-seq-len", "64", "--lora-rank", "4", "--lora-layers", "last:1")
    assert proc.returncode == 0 and "LoRA rank 4" in proc.stdout, proc.stderr[-2000:]


def test_docs_name_show_plan_only_where_it_exists():
    claims_chat = "and `chat`, `--show-plan`" in (DOCS / "memory.md").read_text()
    if claims_chat:  # the page says chat takes --show-plan: it must
        assert "--show-plan" in cli("chat", "--help").stdout
    assert "--show-plan" in cli("generate", "--help").stdout


# -- a conversation file too deep to read (item 11) -----------------------------------------------


def test_chat_load_of_deeply_nested_json_is_one_error_line(vocab_model_dir, tmp_path):
    path = tmp_path / "deep.json"
    path.write_text('{"messages": ' + DEEP + "}")
    line = one_error(cli("chat", "-m", vocab_model_dir, "--load", path))
    assert str(path) in line and "nested too deeply" in line, line


def test_repl_load_of_deeply_nested_json_keeps_the_chat(model, tmp_path):
    path = tmp_path / "deep.json"
    path.write_text('{"messages": ' + DEEP + "}")
    session = ChatSession(model)
    err = io.StringIO()
    repl = Repl(session, read=_answers([]), out=io.StringIO(), err=err)
    repl.command(f"/load {path}")
    assert f"cannot load {path}" in err.getvalue() and "nested too deeply" in err.getvalue()
    assert repl.session is session


# -- standard output that cannot be written (item 12b) ---------------------------------------------


def _with_stdout_closed(*args: str) -> subprocess.CompletedProcess:
    """The CLI run as ``mlx-gptoss ARGS >&-`` (file descriptor 1 closed)."""
    cmd = ["bash", "-c", 'exec "$@" >&-', "bash", *CLI, *map(str, args)]
    return subprocess.run(cmd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, timeout=120)


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_generate_with_stdout_closed_is_one_error_line(vocab_model_dir, extra):
    line = one_error(_with_stdout_closed("generate", "-m", vocab_model_dir, "--max-tokens", "3", *extra, "hi"))
    assert "standard output" in line, line


def test_chat_with_stdout_closed_is_one_error_line(vocab_model_dir):
    line = one_error(_with_stdout_closed("chat", "-m", vocab_model_dir))
    assert "standard output" in line, line


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_generate_into_a_broken_pipe_is_one_error_line(vocab_model_dir, extra):
    read, write = os.pipe()
    os.close(read)  # nobody reads: every write fails with EPIPE
    try:
        proc = subprocess.run([*CLI, "generate", "-m", str(vocab_model_dir), "--raw", "--max-tokens", "3", *extra, "hi"],
                              stdout=write, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, timeout=120)  # fmt: skip
    finally:
        os.close(write)
    line = one_error(proc)
    assert "standard output" in line and "Exception ignored" not in proc.stderr, proc.stderr[-2000:]


# -- the terminal chat: /save, the banner (items 5, 29g) --------------------------------------------


def _answers(answers: list[str]):
    """A ``read`` for Repl that answers its questions from ``answers`` (then "n"), recording them."""

    def read(prompt: str) -> str:
        read.asked.append(prompt)
        return answers.pop(0) if answers else "n"

    read.asked = []
    return read


def _repl(model, answers: list[str]) -> tuple[Repl, io.StringIO]:
    err = io.StringIO()
    return Repl(ChatSession(model, instructions="Be brief."), read=_answers(answers), out=io.StringIO(), err=err), err


def test_save_asks_before_overwriting_and_no_keeps_the_file(model, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("precious")
    repl, err = _repl(model, ["n"])
    repl.command(f"/save {target}")
    assert target.read_text() == "precious", err.getvalue()
    assert repl.read.asked and str(target) in repl.read.asked[0] and "not saved" in err.getvalue()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_save_overwrites_when_confirmed_or_with_a_bang(model, tmp_path):
    target = tmp_path / "conv.json"
    target.write_text("old")
    repl, err = _repl(model, ["y"])
    repl.command(f"/save {target}")
    assert ChatSession.from_json(model, target.read_text()).messages == repl.session.messages, err.getvalue()
    target.write_text("old")
    repl, err = _repl(model, [])
    repl.command(f"/save! {target}")
    assert target.read_text() != "old" and not repl.read.asked, err.getvalue()


def test_save_of_a_new_file_asks_nothing(model, tmp_path):
    repl, err = _repl(model, [])
    repl.command(f"/save {tmp_path / 'new.json'}")
    assert (tmp_path / "new.json").is_file() and not repl.read.asked and "(saved to" in err.getvalue()


def test_failed_save_leaves_no_temporary_file(model, tmp_path, monkeypatch):
    (tmp_path / "adir").mkdir()
    repl, err = _repl(model, ["y", "y"])
    repl.command(f"/save {tmp_path / 'adir'}")
    assert "cannot save" in err.getvalue() and "folder" in err.getvalue(), err.getvalue()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"] and not list((tmp_path / "adir").iterdir())
    # a rename that fails (the folder changed meanwhile, a full disk) leaves nothing either
    repl, err = _repl(model, [])

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    repl.command(f"/save {tmp_path / 'full.json'}")
    monkeypatch.undo()
    assert "cannot save" in err.getvalue() and sorted(p.name for p in tmp_path.iterdir()) == ["adir"], err.getvalue()


@pytest.fixture(scope="module")
def adapter_dir(vocab_model_dir, tmp_path_factory) -> Path:
    """A saved LoRA adapter for the vocab model (its B is zero: it changes nothing, it only has to load)."""
    from mlx_gptoss.lora.adapters import LoRASpec, apply_lora
    from mlx_gptoss.lora.io import base_fingerprint, save_adapter

    m = mlx_gptoss.load(vocab_model_dir)
    spec = LoRASpec(rank=2, alpha=4.0)
    apply_lora(m, spec)
    return save_adapter(m, spec, tmp_path_factory.mktemp("adapter") / "ad", base_fingerprint=base_fingerprint(m))


def test_chat_banner_names_the_adapter_and_the_loaded_file(model, vocab_model_dir, adapter_dir, tmp_path):
    saved = tmp_path / "saved-conversation.json"
    saved.write_text(ChatSession(model, instructions="Be brief.").to_json())
    proc = cli("chat", "-m", vocab_model_dir, "--adapter", adapter_dir, "--load", saved)
    assert proc.returncode == 0, proc.stderr[-2000:]
    banner = next(line for line in proc.stderr.splitlines() if line.startswith("chat with"))
    assert str(vocab_model_dir) in banner and f"adapter {adapter_dir}" in banner and str(saved) in banner, banner
