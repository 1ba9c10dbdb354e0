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


def test_finetune_example_trains_saves_and_chats_with_the_adapter(vocab_model_dir, tmp_path):
    import json
    import subprocess
    import sys

    data = tmp_path / "train.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]}) + "\n"
    )
    r = subprocess.run([sys.executable, str(EXAMPLES[0].parent / "finetune.py"), str(vocab_model_dir), str(data), str(tmp_path / "ad")],
                       input="hi\n", capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "completed: 1 steps" in r.stderr and (tmp_path / "ad" / "adapter_config.json").is_file()
