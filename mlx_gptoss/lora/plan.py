"""The memory plan of a training run, made before the model loads, so the budget counts training.

``mlx_gptoss.load(path, memory_budget="9.5GB")`` plans for inference (a KV cache, prefill
chunks); training needs room for the adapters, AdamW's state and one step's activations instead,
so fewer expert slots fit. Load a model for training with the plan this module makes::

    plan = training_plan(path, spec, TrainConfig(out, max_seq_len=1024), memory_budget="9.5GB")
    model = mlx_gptoss.load(path, memory_budget=plan)
"""

from __future__ import annotations

from pathlib import Path

from ..converted import read_tensors
from ..memory import MemoryPlan, plan_training
from ..models import resolve_config


def training_plan(path_or_repo: str | Path, spec, cfg, memory_budget: str | int | None) -> MemoryPlan:  # noqa: ANN001
    """:func:`mlx_gptoss.memory.plan_training` for the converted model at ``path_or_repo``: what stays
    resident while training ``spec``'s adapters with :class:`~.train.TrainConfig` ``cfg`` (its
    batch size, ``max_seq_len``, loss and attention chunks) under ``memory_budget``. Pass it to
    ``mlx_gptoss.load(..., memory_budget=plan)``.

    Raises :class:`~mlx_gptoss.memory.BudgetError` when the budget cannot hold the run.
    """
    path, config = resolve_config(path_or_repo)
    return plan_training(config, read_tensors(path), spec, max_seq_len=cfg.max_seq_len, batch_size=cfg.batch_size,
                         budget=memory_budget, loss_chunk=cfg.loss_chunk, attention_chunk=cfg.attention_chunk)  # fmt: skip
