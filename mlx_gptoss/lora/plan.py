"""The memory plan of a training run, made before the model loads, so the budget counts training.

``mlx_gptoss.load(path, memory_budget="9.5GB")`` plans for inference (a KV cache, prefill
chunks); training needs room for the adapters, AdamW's state and one step's activations instead,
so fewer expert slots fit. Load a model for training with the plan this module makes::

    plan = training_plan(path, spec, TrainConfig(out, max_seq_len=1024), memory_budget="9.5GB")
    model = mlx_gptoss.load(path, memory_budget=plan)

:func:`check_adapter_memory` refuses, before anything is allocated, adapters whose parameters,
gradients and AdamW state alone exceed the budget or the machine (an absurd ``--rank``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import GptOssConfig
from ..converted import read_tensors
from ..memory import GB, BudgetError, MemoryPlan, lora_parameter_count, parse_size, plan_training
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


# What each trained parameter costs at the peak of a step, as plan_training counts it (float32):
# the adapter itself, its gradient, AdamW's two moments, and the update's new copies of all four.
BYTES_PER_TRAINED_PARAM = 32


def machine_memory() -> int | None:
    """The machine's physical memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        return None


def check_adapter_memory(config: GptOssConfig, spec, memory_budget: str | int | None = None, *, rank_name: str = "rank") -> None:  # noqa: ANN001
    """Refuse, before anything is allocated, adapters that cannot fit: ``spec``'s parameter count
    (:func:`~mlx_gptoss.memory.lora_parameter_count`) with its gradients and AdamW state
    (:data:`BYTES_PER_TRAINED_PARAM` each) against ``memory_budget``, else the machine's memory.
    An absurd rank otherwise ends in an allocation MLX cannot make (on the CPU: a segfault).

    Raises :class:`~mlx_gptoss.memory.BudgetError` naming ``rank_name`` (``--rank`` on the command line).
    """
    n = lora_parameter_count(config, spec)
    _refuse_beyond(f"{rank_name} {spec.rank}", n, BYTES_PER_TRAINED_PARAM * n, memory_budget)


def check_trainable_memory(n_params: int, memory_budget: str | int | None = None) -> None:
    """:func:`check_adapter_memory` for parameters already allocated (what :func:`~.train.train` is
    given): the gradients and AdamW state still to come must fit."""
    need = (BYTES_PER_TRAINED_PARAM - 4) * n_params
    _refuse_beyond("the model's adapters", n_params, need, memory_budget)


def _refuse_beyond(subject: str, n: int, need: int, memory_budget: str | int | None) -> None:
    if memory_budget is not None:
        limit, where = parse_size(memory_budget), "the memory budget"
    else:
        limit, where = machine_memory(), "this machine's memory"
    if limit is not None and need > limit:
        raise BudgetError(f"{subject}: {n:,} trainable parameters need {need / GB:,.1f} GB with their gradients and "
                          f"AdamW state, more than {where} ({limit / GB:.1f} GB); choose a smaller rank (or fewer "
                          "targets or layers)")  # fmt: skip
