"""`mlx-gptoss doctor`: this machine's memory, the model's components, and a budget that fits."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .kernels.selfcheck import report as kernel_checks
from .loader import LoadError, read_config
from .lora.adapters import LoRASpec
from .memory import GB, BudgetError, plan_memory, plan_training, read_tensors

# A Mac keeps this much of the GPU working set (or of RAM, elsewhere) free for the system and apps.
HEADROOM = 0.1


@dataclass
class Machine:
    system: str
    ram: int
    backend: str
    gpu_limit: int | None  # Metal's recommended working set: what the GPU may hold by default

    @property
    def recommended_budget(self) -> int:
        limit = self.gpu_limit if self.gpu_limit else int(self.ram * 0.75)
        return int(limit * (1 - HEADROOM))


def machine() -> Machine:

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpu_limit = None
    if mx.metal.is_available():
        backend = "Metal"
        gpu_limit = int(mx.device_info().get("max_recommended_working_set_size", 0)) or None
    elif mx.cuda.is_available():
        backend = "CUDA"
        gpu_limit = int(mx.device_info().get("total_memory", 0)) or None
    else:
        backend = "CPU (no GPU: MLX uses RAM)"
    return Machine(f"{platform.system()} {platform.machine()}", ram, backend, gpu_limit)


def kernels_report() -> str:
    """`doctor --kernels`: the machine, then each custom GPU kernel against its twin and a short
    benchmark (or why the kernels are not used here); see :mod:`mlx_gptoss.kernels.selfcheck`."""
    m = machine()
    return f"machine: {m.system}, {m.ram / GB:.1f} GB RAM, MLX backend {m.backend}\n" + kernel_checks()


def report(model_dir: Path | None, context: int = 8192, *, train_seq_len: int | None = None, lora_spec=None) -> str:  # noqa: ANN001
    """The machine's memory and, for a converted ``model_dir``, its memory plan and a verdict.

    With ``train_seq_len`` (and a :class:`~mlx_gptoss.lora.adapters.LoRASpec`, default rank 8 on
    attention), the plan of LoRA training on sequences that long instead of inference's.
    Raises ValueError subclasses (naming the file) for a folder that is not a valid converted checkpoint.
    """
    m = machine()
    lines = [f"machine: {m.system}, {m.ram / GB:.1f} GB RAM, MLX backend {m.backend}"]
    if m.gpu_limit:
        lines.append(f"GPU working-set limit (default): {m.gpu_limit / GB:.1f} GB"
                     + ("  (raise it with: sudo sysctl iogpu.wired_limit_mb=N)" if m.backend == "Metal" else ""))  # fmt: skip
    budget = m.recommended_budget
    lines.append(f"recommended memory budget: {budget / GB:.1f} GB (--memory-budget {budget / GB:.1f}GB)")
    if model_dir is None:
        return "\n".join(lines)

    if not (model_dir / "config.json").is_file():
        released = (model_dir / "original" / "config.json").is_file()
        raise LoadError(f"{model_dir}: " + (f"this is a released checkpoint, not a converted one: run mlx-gptoss convert "
                                            f"{model_dir} DST" if released else "not a converted model folder (no config.json)"))  # fmt: skip

    # The loader's checks, so a released checkpoint is refused here too rather than mis-sized.
    config = read_config(model_dir)
    tensors = read_tensors(model_dir)
    if train_seq_len is not None:
        return "\n".join(lines + _training(config, tensors, train_seq_len, lora_spec, budget))
    full = plan_memory(config, tensors, None, context=context)
    lines += ["", f"model {model_dir} ({context}-token context), everything resident:", full.table(), ""]
    quantized = dict(config.quantization)
    if full.mlx_bytes <= budget:
        lines.append("verdict: everything fits; no budget needed.")
        return "\n".join(lines)
    try:
        plan = plan_memory(config, tensors, budget, context=context)
        lines += [f"at the recommended budget of {budget / GB:.1f} GB:", plan.table()]
        if plan.streaming:
            lines.append(
                f"verdict: runs with expert streaming ({plan.expert_slots}/{plan.n_experts} experts per layer resident)."
            )
    except BudgetError as e:
        lines.append(f"verdict: does not fit the recommended budget: {e}")
    if not quantized:
        lines.append("hint: re-convert with `mlx-gptoss convert SRC DST --preset 16gb` (8-bit attention, unembedding, "
                     "embedding) to keep more experts resident.")  # fmt: skip
    return "\n".join(lines)


def _training(config, tensors, seq_len: int, spec, budget: int) -> list[str]:  # noqa: ANN001

    spec = spec if spec is not None else LoRASpec(rank=8, alpha=16.0)
    layers = "all layers" if spec.layers is None else f"layers {','.join(map(str, spec.layers))}"
    what = f"LoRA rank {spec.rank} on {', '.join(spec.targets)} of {layers}, batch 1 x {seq_len} tokens"
    full = plan_training(config, tensors, spec, max_seq_len=seq_len)
    lines = ["", f"training ({what}), everything resident:", full.table(), ""]
    if full.mlx_bytes <= budget:
        return lines + ["verdict: training fits; no budget needed."]
    try:
        plan = plan_training(config, tensors, spec, max_seq_len=seq_len, budget=budget)
        lines += [f"at the recommended budget of {budget / GB:.1f} GB:", plan.table()]
        if plan.streaming:
            lines.append(
                f"verdict: trains with expert streaming ({plan.expert_slots}/{plan.n_experts} experts per layer resident)."
            )
    except BudgetError as e:
        lines.append(f"verdict: does not fit the recommended budget: {e}")
    return lines
