"""Expert pruning: a smaller converted checkpoint that keeps the N most used (or most salient)
experts of each layer, chosen from routing statistics (:class:`~.routing.RoutingStats`).

The router's rows are sliced with the experts, so a token is routed among the kept experts
exactly as the full model routes it when the others are removed (:func:`~.interventions.remove_experts`).
The result is a converted folder like any other (memory planner, streaming, LoRA, export), and its
config.json records what was removed (``mlx_gptoss.pruned``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from mlx_gptoss_convert.rewrite import rewrite, rows

from ..converted import read_config
from ..models import resolve_model
from .routing import RoutingStats

_EXPERT_ROWS = re.compile(r"^layers\.(\d+)\.mlp\.(router|gate_up|down)\.")  # tensors whose first axis is the expert


def kept_experts(stats: RoutingStats, keep: int, by: str = "usage") -> dict[int, list[int]]:
    """Per layer, the ``keep`` experts ranked first by ``by`` ("usage" or "saliency"), in id order."""
    if isinstance(keep, bool) or not isinstance(keep, int) or not stats.k <= keep < stats.experts:
        raise ValueError(f"--keep must be an integer in {stats.k}..{stats.experts - 1} (at least the {stats.k} experts "
                         f"each token is routed to, fewer than the {stats.experts} there are); got {keep!r}")  # fmt: skip
    ranking = stats.ranking(by)
    return {i: sorted(int(e) for e in ranking[i, :keep]) for i in range(stats.layers)}


def prune_experts(model: str | Path, dst: str | Path, *, keep: int, stats: RoutingStats | str | Path, by: str = "usage") -> Path:
    """Write ``model`` (a converted folder or repo id) with ``keep`` experts per layer to ``dst``.

    ``stats`` (statistics collected on this same model, or their file) rank the experts; a file
    from another model is refused. Returns ``dst``, written whole or not at all."""
    src = resolve_model(model, convert=False)
    config = read_config(src)
    stats = stats if isinstance(stats, RoutingStats) else RoutingStats.load(stats)
    if (stats.layers, stats.experts) != (config.num_hidden_layers, config.num_local_experts):
        raise ValueError(f"the statistics are for {stats.layers} layers x {stats.experts} experts; {src} has "
                         f"{config.num_hidden_layers} x {config.num_local_experts}")  # fmt: skip
    stats.check_model(src, "the routing statistics")
    kept = kept_experts(stats, keep, by)

    def replace(info: Any) -> Any:
        m = _EXPERT_ROWS.match(info.name)
        return rows(info, kept[int(m.group(1))]) if m else info

    def edit(cfg: dict) -> dict:
        cfg["num_local_experts"] = keep
        block = cfg["mlx_gptoss"]
        block["source"] = f"{block.get('source', src)}, pruned to {keep} of {config.num_local_experts} experts per layer"
        removed = {str(i): [e for e in range(config.num_local_experts) if e not in k] for i, k in kept.items()}
        block["pruned"] = {"from": str(src), "experts_before": config.num_local_experts, "kept_by": by,
                           "stats_tokens": stats.tokens, "kept": {str(i): k for i, k in kept.items()}, "removed": removed}  # fmt: skip
        return cfg

    return rewrite(src, dst, replace=replace, edit_config=edit, what="pruning")


def pruned_bytes(tensors: dict[str, Any], n_experts: int, keep: int) -> tuple[int, int]:
    """(bytes now, bytes after pruning to ``keep`` of ``n_experts``) of a checkpoint's tensors (from headers)."""
    before = sum(t.nbytes for t in tensors.values())
    expert = sum(t.nbytes for n, t in tensors.items() if _EXPERT_ROWS.match(n))
    return before, before - int(np.round(expert * (n_experts - keep) / n_experts))
