"""The house's own checks: imports flow one way (import-linter contracts in pyproject.toml, no
cycle anywhere), every module is placed in a layer, function-level imports carry their reason,
and ruff's lint and format pass. CI runs them because the test suite does."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"mlx_gptoss": ROOT / "mlx_gptoss", "mlx_gptoss_convert": ROOT / "convert"}

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None


def _lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)} if pythonpath else None
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip


def test_import_contracts_hold():
    r = _lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 kept, 0 broken" in r.stdout


def test_a_climbing_import_breaks_the_contracts(tmp_path):
    """The check can fail: a copy of the packages where the core imports a capability (hidden in a
    function, as the old loader did) and a cycle is made."""
    for name, src in PACKAGES.items():
        shutil.copytree(src, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    loader = tmp_path / "mlx_gptoss" / "loader.py"
    loader.write_text(
        loader.read_text() + "\n\ndef _adapter():\n    from .lora.io import load_adapter\n\n    return load_adapter\n"
    )
    config = tmp_path / "mlx_gptoss" / "config.py"
    config.write_text(config.read_text() + "\n\ndef _cycle():\n    from . import loader\n\n    return loader\n")
    r = _lint_imports(tmp_path, pythonpath=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "never import a capability or a face BROKEN" in out and "mlx_gptoss.loader -> mlx_gptoss.lora.io" in out
    assert "Layers: faces > capabilities" in out and "BROKEN" in out


def _graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES)


def test_no_import_cycle_anywhere():
    """Strongly connected components of the whole import graph (both packages, every import): none."""
    graph = _graph()
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:  # Tarjan, iterative enough for a few hundred modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(edges):
        if m not in index:
            visit(m)
    assert cycles == []


@pytest.mark.skipif(tomllib is None, reason="reading pyproject.toml needs tomllib (Python >= 3.11)")
def test_every_module_is_placed_in_a_layer():
    """A new module cannot slip past the layers contract: each one is inside a listed layer."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in cfg if c["type"] == "layers")["layers"]
    listed = {m.strip().strip("()") for row in layers for m in row.split("|")}
    unplaced = [
        m for m in sorted(_graph().modules)
        if m not in PACKAGES and not any(m == p or m.startswith(p + ".") for p in listed)
    ]  # fmt: skip
    assert unplaced == []


def _function_imports(path: Path) -> list[tuple[int, list[str]]]:
    """Each import inside a function: its line, and the lines of its block (contiguous imports) with the one above."""
    lines = path.read_text().splitlines()
    out = []
    for fn in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                i = node.lineno - 1
                while i > 0 and lines[i - 1].strip().startswith(("import ", "from ")):
                    i -= 1
                out.append((node.lineno, lines[max(i - 1, 0) : node.end_lineno]))
    return out


def test_imports_inside_functions_say_why():
    """Imports inside functions are for start-up time or optional packages only, each with a
    one-line reason (a comment on the import's block, or just above it); the CLI package states
    its reason once, in its docstring."""
    missing = []
    for src in PACKAGES.values():
        for path in sorted(src.rglob("*.py")):
            if "cli" in path.relative_to(src).parts:
                continue
            for line, block in _function_imports(path):
                if not any("#" in b for b in block):
                    missing.append(f"{path.relative_to(ROOT)}:{line}")
    assert missing == []
    assert "one reason for imports inside functions" in (ROOT / "mlx_gptoss" / "cli" / "__init__.py").read_text()


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff(args):
    r = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
