"""Small helpers shared by the converter's and the exporter's tests."""

from __future__ import annotations

from pathlib import Path

from mlx_gptoss.safetensors_io import SafetensorsWriter


def leftovers(parent: Path) -> list[str]:
    """The hidden entries in ``parent``: what a failed or killed write left beside its destination."""
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def fail_write_at(monkeypatch, n: int) -> None:
    """Make the ``n``-th tensor write of any SafetensorsWriter raise ``OSError("disk full")``."""
    calls = {"n": 0}
    real = SafetensorsWriter.write

    def flaky(self, name, data):
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError("disk full")
        return real(self, name, data)

    monkeypatch.setattr(SafetensorsWriter, "write", flaky)
