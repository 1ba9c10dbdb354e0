"""For researchers: look inside gpt-oss and change it. Hooks, capture, interventions, routing
statistics, expert pruning.

    from mlx_gptoss import inspect
    logits, cache = inspect.run_with_cache(model, ids, names="blocks.*.resid.post")
    with inspect.trace(model, "blocks.*.router.topk") as t, inspect.remove_experts(model, [3], layers=[0]):
        model.chat().send("...")

The package uses the core through one seam: ``model.hooks`` (None by default: the forward pass is
then the plain one, the same code, kernels and compiled decode as without this package). While a
hook or an intervention is active the registry of :mod:`.hooks` sits there and the model calls it
at its named points. The package is a capability: nothing below it imports it.

Contract between the modules (each owns its part):

``hooks.py`` — the points and the registry: ``hook_names(model)``, ``select(model, globs)``
(unknown names list the valid ones), ``hooked(model, {glob: fn})`` (a context manager; ``fn(value,
point) -> value | None``), ``held(model)`` (the eager path without a hook, for parameter edits).

``capture.py`` — ``trace(model, names, last=None, stats=False) -> Trace`` (``trace[name]``,
``.names``, ``.save(path)``), ``run_with_cache(model, ids, names, interventions=()) -> (logits, Trace)``.

``interventions.py`` — context managers: ``remove_experts``, ``force_experts``, ``bias_router``,
``steer``, ``patch``, ``zero_heads``, ``scale_sinks``, and ``intervene(model, {glob: fn})``.

``routing.py`` — ``record_routing(model) -> RoutingRecorder`` (ids/weights per position and layer;
``.save`` as .jsonl or .npz), ``token_kinds``, ``RoutingStats`` (counts, usage, entropy,
co-activation, per kind of token; JSON), ``routing_stats(model, conversations, generate=...)``.

``prune.py`` — ``prune_experts(model, dst, keep=N, stats=..., by="usage"|"saliency")``: a smaller
converted checkpoint. ``plots.py`` — ``plot_routing(stats, dir)`` (the optional ``plot`` extra).
"""

from __future__ import annotations

from .capture import Trace, run_with_cache, trace
from .hooks import BLOCK_POINTS, MODEL_POINTS, Point, hook_names, hooked, select
from .interventions import bias_router, force_experts, intervene, patch, remove_experts, scale_sinks, steer, zero_heads
from .prune import kept_experts, prune_experts
from .routing import RoutingRecorder, RoutingStats, record_routing, routing_stats, token_kinds

__all__ = [
    "BLOCK_POINTS", "MODEL_POINTS", "Point", "RoutingRecorder", "RoutingStats", "Trace", "bias_router", "force_experts",
    "hook_names", "hooked", "intervene", "kept_experts", "patch", "prune_experts", "record_routing", "remove_experts",
    "routing_stats", "run_with_cache", "scale_sinks", "select", "steer", "token_kinds", "trace", "zero_heads",
]  # fmt: skip
