"""The loss curve of a training run, drawn from its metrics (JSON lines) with matplotlib when installed."""

from __future__ import annotations

import json
from pathlib import Path

INSTALL_HINT = "--plot needs matplotlib: pip install matplotlib"


def require_matplotlib() -> None:
    """Raise ``ValueError`` with the install command when matplotlib is missing (checked before training)."""
    try:
        import matplotlib  # noqa: F401 - the optional `plot` extra: looked for only when a plot is asked for
    except ImportError:
        raise ValueError(INSTALL_HINT) from None


def plot_metrics(metrics: str | Path, png: str | Path) -> Path:
    """Draw training loss (per step) and validation loss (per evaluation) from ``metrics`` into ``png``."""
    require_matplotlib()
    import matplotlib  # the optional `plot` extra (checked just above)

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train" and r.get("loss") is not None]
    valid = [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "eval" and r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return Path(png)
