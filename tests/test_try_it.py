"""The README's try-it path, as a newcomer runs it: a fresh virtual environment with `pip install -e .`
only, then every command of the README's try-it block, each a real subprocess, and its Python
snippet. The commands are read from README.md, so the README cannot drift from what works."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REPLY = "Hello! I am a tiny random model."


def _try_it_block() -> list[str]:
    """The commands of the README's try-it block (continuation lines joined)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- try-it -->\n```bash\n(.*?)```\n<!-- /try-it -->", text, re.S)
    assert block, "README.md has no try-it block"
    return [c.strip() for c in block.group(1).replace("\\\n", " ").splitlines() if c.strip()]


def _python_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("<!-- /try-it -->", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtual environment holding the project installed by `pip install -e .` alone."""
    env_dir = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
    r = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "-e", str(ROOT)], capture_output=True,
                       text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return env_dir


def test_the_readme_try_it_path_in_a_fresh_venv(venv, tmp_path):
    commands = _try_it_block()
    assert commands[0] == "pip install -e ."  # what the fixture did
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv),
           "MLX_GPTOSS_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}  # fmt: skip
    env.pop("PYTHONPATH", None)
    port = _free_port()

    def run(cmd: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, input=stdin, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "Traceback" not in r.stderr, f"{cmd}\n{r.stdout}\n{r.stderr}"
        return r

    server = None
    try:
        for cmd in commands[1:]:
            cmd = cmd.replace("8321", str(port))
            if cmd.endswith("&"):  # the server: started here, stopped by the block's `kill %1`
                server = subprocess.Popen(shlex.split(cmd[:-1]), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True)  # fmt: skip
                _wait_for(f"http://127.0.0.1:{port}/health", server)
            elif cmd == "kill %1":
                server.terminate()
                assert server.wait(30) is not None
                server = None
            elif cmd.startswith("curl"):
                out = run(cmd).stdout if shutil.which("curl") else _post(cmd)
                assert json.loads(out)["choices"][0]["message"]["content"] == REPLY
            elif cmd.startswith("echo") and "| mlx-gptoss chat" in cmd:
                assert REPLY in run(cmd).stdout
            elif " generate " in f" {cmd} ":
                assert run(cmd).stdout.strip() == REPLY
            else:
                run(cmd)
        assert (tmp_path / "tiny-adapter" / "adapters.safetensors").is_file()
        r = subprocess.run([str(venv / "bin" / "python"), "-c", _python_snippet()], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr
        first, second = r.stdout.splitlines()
        assert first == REPLY and "get_weather" in second and "Paris" in second
    finally:
        if server is not None:
            server.kill()


def _wait_for(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer")


def _post(curl: str) -> str:
    """The curl line's request, sent with urllib (for a machine without curl)."""
    args = shlex.split(curl)
    url, body = args[2], args[args.index("-d") + 1]
    req = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read().decode()
