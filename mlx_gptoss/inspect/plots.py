"""Pictures of routing statistics (the optional ``plot`` extra: matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .routing import RoutingStats

INSTALL = "pip install 'mlx-gptoss[plot]' (matplotlib)"


def have_matplotlib() -> bool:
    """Whether the pictures can be drawn (matplotlib importable)."""
    try:
        import matplotlib  # noqa: F401 - the optional `plot` extra: looked for only when pictures are asked for
    except ImportError:
        return False
    return True


def plot_routing(stats: RoutingStats, out_dir: str | Path) -> list[Path]:
    """Draw ``usage.png`` (expert usage per layer, a heat map) and ``entropy.png`` (usage entropy
    per layer against the uniform maximum) into ``out_dir``; returns the files."""
    if not have_matplotlib():
        raise ImportError(f"the routing pictures need matplotlib: {INSTALL}")
    import matplotlib  # the optional `plot` extra (checked just above)

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    usage = stats.usage()
    fig, ax = plt.subplots(figsize=(max(6, stats.experts * 0.25 + 2), max(3, stats.layers * 0.25 + 1.5)))
    im = ax.imshow(usage, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"expert usage per layer ({stats.tokens:,} tokens; uniform = {1 / stats.experts:.3f})")
    fig.colorbar(im, ax=ax, label="share of the layer's routing")
    fig.tight_layout()
    files = [out / "usage.png"]
    fig.savefig(files[0], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    layers = np.arange(stats.layers)
    ax.plot(layers, stats.usage_entropy(), marker="o", label="usage entropy")
    ax.axhline(np.log2(stats.experts), color="gray", linestyle="--", label=f"uniform (log2 {stats.experts})")
    ax.set_xlabel("layer")
    ax.set_ylabel("bits")
    ax.set_title("how evenly each layer uses its experts")
    ax.legend()
    fig.tight_layout()
    files.append(out / "entropy.png")
    fig.savefig(files[1], dpi=120)
    plt.close(fig)
    return files
