"""The examples compile, and the example app's tools produce the schemas and values they claim."""

from __future__ import annotations

import importlib.util
import py_compile
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_compiles(path):
    py_compile.compile(str(path), doraise=True)


def test_example_app_tools(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("app", EXAMPLES[0].parent / "app_with_tools.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    assert app.convert_units(26.2, "mi") == {"value": 42.1648, "unit": "km"}
    (tmp_path / "a.md").write_text("notes about MLX kernels")
    (tmp_path / "b.txt").write_text("nothing here")
    monkeypatch.setattr(app, "NOTES", tmp_path)
    assert app.search_files("mlx") == [str(tmp_path / "a.md")]
    from mlx_gptoss.tools import tool_from_function

    schema = tool_from_function(app.convert_units).parameters
    assert schema["properties"]["unit"]["enum"] == ["mi", "km", "lb", "kg", "F", "C"] and schema["required"] == ["value", "unit"]
