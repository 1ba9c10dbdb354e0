"""Memory budgets: what of a converted checkpoint stays resident, and what is streamed.

The planner reads tensor sizes from the safetensors headers (no data), adds the KV cache for the
context asked for and an estimate of the activations, and decides per component where it lives:
in MLX memory (on a Mac: the GPU's working set), on the host through a memory map (the
embedding: a lookup touches one row per token), or streamed from disk into a fixed number of
expert slots per layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .config import FULL, SLIDING, GptOssConfig
from .converted import read_tensors as read_tensors  # re-exported: the planner's callers read headers with it
from .safetensors_io import DTYPE_SIZE, TensorInfo

GB = 1e9
# MLX's buffer cache and small temporaries (0.25 GB), and the process itself: Python, numpy,
# harmony, MLX's libraries (0.5 GB), so that the process's RSS stays within the budget too.
MLX_CACHE = int(0.25 * GB)
OVERHEAD = MLX_CACHE + int(0.5 * GB)
PREFILL_STEPS = (512, 256, 128, 64, 32, 16)
ACTIVATION_CAP = int(0.5 * GB)  # budgeted runs prefill in chunks whose activations stay under this


class BudgetError(ValueError):
    """The budget cannot be met; the message says by how much and what would fit."""


def parse_size(size: str | int | float) -> int:
    """'9.5GB', '800MB', '10GiB' or a number of bytes."""
    if isinstance(size, (int, float)):
        return int(size)
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]i?b?|b)?\s*", size.lower())
    if not m:
        raise BudgetError(f"cannot read the size {size!r} (e.g. 9.5GB, 800MB)")
    unit = (m.group(2) or "b").rstrip("b") or ""
    mult = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    return int(float(m.group(1)) * mult)


@dataclass
class Component:
    name: str
    nbytes: int
    where: str  # "MLX", "host (memory-mapped file)", "disk (streamed)"


@dataclass
class MemoryPlan:
    """Where each part of the model lives under a budget, and the resulting MLX footprint."""

    budget: int | None
    context: int
    components: list[Component] = field(default_factory=list)
    expert_slots: int = 0  # resident experts per layer
    n_experts: int = 0
    expert_bytes: int = 0  # one expert (gate_up + down: codes, scales, bias)
    prefill_step: int = 512
    embed_on_host: bool = False
    training: bool = False  # a plan of plan_training: ``context`` is the training sequence length

    @property
    def streaming(self) -> bool:
        return self.expert_slots < self.n_experts

    @property
    def mlx_bytes(self) -> int:
        return sum(c.nbytes for c in self.components if c.where == "MLX")

    def table(self) -> str:
        rows = [f"{'component':<34} {'GB':>7}  where"]
        for c in self.components:
            rows.append(f"{c.name:<34} {c.nbytes / GB:>7.2f}  {c.where}")
        rows.append(
            f"{'total in MLX memory':<34} {self.mlx_bytes / GB:>7.2f}"
            + (f"  (budget {self.budget / GB:.2f})" if self.budget else "")
        )
        if self.streaming:
            rows.append(f"experts: {self.expert_slots} of {self.n_experts} per layer resident, the rest read from disk on demand")
        if self.training:
            rows.append(f"training on sequences of up to {self.context} tokens, each block recomputed in the backward")
        else:
            rows.append(f"context {self.context} tokens, prefill in chunks of {self.prefill_step}")
        return "\n".join(rows)


def _category(name: str) -> str:
    if name.startswith("embed_tokens."):
        return "embedding"
    if name.startswith("lm_head."):
        return "unembedding (lm_head)"
    if ".mlp.gate_up." in name or ".mlp.down." in name:
        return "experts"
    if ".mlp.router." in name:
        return "router"
    return "attention and norms"


def _loaded_bytes(info: TensorInfo, float_bytes: int) -> int:
    if info.dtype in ("BF16", "F16", "F32") and not info.name.endswith((".scales", ".biases")):
        return info.nbytes // DTYPE_SIZE[info.dtype] * float_bytes
    return info.nbytes


def kv_cache_bytes(config: GptOssConfig, context: int, dtype_bytes: int = 2) -> int:
    per_pos = 2 * config.num_key_value_heads * config.head_dim * dtype_bytes
    full = sum(1 for t in config.layer_types if t == FULL)
    sliding = sum(1 for t in config.layer_types if t == SLIDING)
    steps = -(-context // 256) * 256  # the full-attention cache grows in steps of 256
    return full * steps * per_pos + sliding * config.sliding_window * per_pos


def activation_bytes(config: GptOssConfig, step: int, context: int) -> int:
    """A generous estimate for one prefill chunk (attention scores materialised in float32)."""
    scores = config.num_attention_heads * step * (context + step) * 4
    hidden = 16 * step * config.hidden_size * 4
    moe = 4 * step * config.num_experts_per_tok * 2 * config.intermediate_size * 4
    logits = config.vocab_size * 4 * 2
    return scores + hidden + moe + logits


def plan_memory(
    config: GptOssConfig,
    tensors: dict[str, TensorInfo],
    budget: int | str | None,
    *,
    context: int = 8192,
    float_bytes: int = 2,
) -> MemoryPlan:
    """Decide what stays resident under ``budget`` (bytes or "9.5GB"); None = everything resident."""
    budget = None if budget is None else parse_size(budget)
    prefill_step = 512
    if budget is not None:
        prefill_step = next(
            (s for s in PREFILL_STEPS if activation_bytes(config, s, context) <= ACTIVATION_CAP), PREFILL_STEPS[-1]
        )
    kv = kv_cache_bytes(config, context, float_bytes)
    extra = [
        Component(f"KV cache ({context} tokens)", kv, "MLX"),
        Component(f"activations (chunks of {prefill_step})", activation_bytes(config, prefill_step, context), "MLX"),
    ]
    why = f"a {context}-token context (KV cache {kv / GB:.2f} GB)"
    plan = _fit(config, tensors, budget, extra, float_bytes, why, "a shorter context")
    plan.context, plan.prefill_step = context, prefill_step
    return plan


def _fit(config: GptOssConfig, tensors: dict[str, TensorInfo], budget: int | None, extra: list[Component],
         float_bytes: int, why: str, smaller: str, *, slot_copies: int = 0) -> MemoryPlan:  # fmt: skip
    """The weights' placement under ``budget`` beside the ``extra`` MLX components (cache, activations...).

    ``slot_copies``: extra copies of one layer's expert slots that exist while streaming (training:
    a block recomputed under the gradient transform keeps the slots its first experts were read
    into for the backward, so reading the rest copies them once).
    """
    sizes: dict[str, int] = {}
    for info in tensors.values():
        cat = _category(info.name)
        sizes[cat] = sizes.get(cat, 0) + _loaded_bytes(info, float_bytes)
    L, E = config.num_hidden_layers, config.num_local_experts
    if not sizes.get("experts"):
        # A released checkpoint's experts have other names: sizing it would claim they take nothing.
        raise BudgetError("no expert tensors (layers.N.mlp.gate_up.*) in this checkpoint: is it a converted one? "
                          "Run mlx-gptoss convert SRC DST first")  # fmt: skip
    expert_bytes = sizes.get("experts", 0) // (L * E)
    plan = MemoryPlan(budget, 0, n_experts=E, expert_bytes=expert_bytes, expert_slots=E)
    on_host = budget is not None
    plan.embed_on_host = on_host
    fixed = sizes.get("attention and norms", 0) + sizes.get("router", 0) + sizes.get("unembedding (lm_head)", 0) + OVERHEAD
    fixed += sum(c.nbytes for c in extra) + (0 if on_host else sizes.get("embedding", 0))
    all_experts = expert_bytes * L * E
    if budget is not None and fixed + all_experts > budget:
        slots = int((budget - fixed) // (expert_bytes * (L + slot_copies))) if expert_bytes else E
        k = config.num_experts_per_tok
        if slots < k:
            need = fixed + k * (L + slot_copies) * expert_bytes
            # the preset quantizes float layers: no use to a checkpoint that already stores some quantized
            preset = "" if config.quantization else ", or a checkpoint converted with --preset 16gb"
            raise BudgetError(
                f"a budget of {budget / GB:.2f} GB cannot hold this model: it needs at least {need / GB:.2f} GB "
                f"({(need - budget) / GB:.2f} GB more) with {k} expert slots per layer and {why}. "
                f"Everything resident needs {(fixed + all_experts) / GB:.2f} GB. "
                f"Use a larger budget{',' if preset else ' or'} {smaller}{preset}."
            )
        plan.expert_slots = min(slots, E)
    comps = [
        Component("embedding", sizes.get("embedding", 0), "host (memory-mapped file)" if on_host else "MLX"),
        Component("attention and norms", sizes.get("attention and norms", 0), "MLX"),
        Component("router", sizes.get("router", 0), "MLX"),
        Component("unembedding (lm_head)", sizes.get("unembedding (lm_head)", 0), "MLX"),
        Component(f"experts ({plan.expert_slots}/{E} per layer)", plan.expert_slots * L * expert_bytes, "MLX"),
    ]
    if plan.streaming:
        comps.append(
            Component(
                f"experts ({E - plan.expert_slots}/{E} per layer)", (E - plan.expert_slots) * L * expert_bytes, "disk (streamed)"
            )
        )
        if slot_copies:
            comps.append(Component("expert slots re-read in a recompute", slot_copies * plan.expert_slots * expert_bytes, "MLX"))
    plan.components = comps + extra + [Component("runtime (MLX cache, Python)", OVERHEAD, "MLX")]
    return plan


def lora_parameter_count(config: GptOssConfig, spec) -> int:  # noqa: ANN001 (a lora.LoRASpec)
    """Trainable parameters of ``spec``'s adapters on a model of ``config`` (see lora/adapters.py)."""
    H, E, I, D, r = config.hidden_size, config.num_local_experts, config.intermediate_size, config.head_dim, spec.rank
    q, kv = config.num_attention_heads * D, config.num_key_value_heads * D
    per_layer = 0
    if "attention" in spec.targets:
        per_layer += r * (H + q) + 2 * r * (H + kv) + r * (q + H)  # q, k, v, o: A [r, in] + B [out, r]
    if "router" in spec.targets:
        per_layer += r * (H + E)
    if "experts" in spec.targets:
        per_layer += E * r * (H + 2 * I) + E * r * (I + H)  # gate_up and down, per expert
    return per_layer * len(spec.layer_ids(config.num_hidden_layers))


# Measured on MLX 0.32.4 (CPU) with the real widths (benchmarks/bench_lora_memory.py): the backward of
# attention with sinks holds ~4.3-5.2 float32 copies of the scores [B, Hq, T, T] (T = 1024 and 256);
# a loss chunk (lora/train.py's cross-entropy with its own gradient) holds ~4 float32-sized copies
# of its logits [c, V] at its peak (the logits, their float32 softmax, the gradient and its cast).
ATTENTION_COPIES = 4.5
# Attention in query chunks of c (training's default 256): the backward holds ~8 float32 copies of
# one chunk's scores [B, Hq, c, T] (measured 6.4 / 8.1 / 7.9 at T = 512 / 1024 / 2048, the real
# widths): more than one chunk's recomputation is alive at a time.
ATTENTION_CHUNK_COPIES = 8
# A block's [B, T, H]-sized float32 temporaries (norms, residuals, q/k/v, their gradients), sized so
# the whole step matches the measured peak at T = 512 (bench_lora_memory.py: 0.985 GB measured).
BLOCK_TEMPORARIES = 24
LOSS_CHUNK_COPIES = 4


def training_activation_bytes(config: GptOssConfig, seq_len: int, *, batch_size: int = 1, loss_chunk: int = 32,
                              attention_chunk: int | None = 256, float_bytes: int = 2) -> dict[str, int]:  # fmt: skip
    """Peak activations of one training step with per-block checkpointing (lora/train.py), by part.

    - saved block inputs: each block's input [B, T, H] (and the final one) stays for the backward;
    - one block recomputed: its forward and backward together, the only block live at a time:
      attention scores, probabilities and their gradients (:data:`ATTENTION_COPIES` x [B, Hq, T, T]
      float32, or in query chunks :data:`ATTENTION_CHUNK_COPIES` x [B, Hq, c, T], c = ``attention_chunk``); the MoE's N·K (token, expert) pairs in float32 (the CPU path) — each pair's input,
      gate_up pre-activation, SwiGLU output and down output [NK, 2H + 3I], twice (values and
      gradients); and the block's :data:`BLOCK_TEMPORARIES` [B, T, H]-sized temporaries;
    - the loss chunk: ``loss_chunk`` rows of logits, :data:`LOSS_CHUNK_COPIES` x [c, V] float32.
    """
    B, T, H, I, V = batch_size, seq_len, config.hidden_size, config.intermediate_size, config.vocab_size
    NK = B * T * config.num_experts_per_tok
    c = min(attention_chunk or T, T)
    attention = int((ATTENTION_COPIES if c == T else ATTENTION_CHUNK_COPIES) * B * config.num_attention_heads * c * T * 4)
    moe = 2 * NK * (2 * H + 3 * I) * 4
    temporaries = BLOCK_TEMPORARIES * B * T * max(H, config.qkv_dim) * 4
    chunk = min(loss_chunk, B * T)
    return {
        "saved block inputs": (config.num_hidden_layers + 1) * B * T * H * float_bytes,
        "one block recomputed": attention + moe + temporaries,
        "loss chunk": LOSS_CHUNK_COPIES * chunk * V * 4,
    }


def plan_training(
    config: GptOssConfig,
    tensors: dict[str, TensorInfo],
    spec,  # noqa: ANN001 (a lora.LoRASpec)
    *,
    max_seq_len: int,
    batch_size: int = 1,
    budget: int | str | None = None,
    loss_chunk: int = 32,
    attention_chunk: int | None = 256,
    float_bytes: int = 2,
) -> MemoryPlan:
    """The memory plan of LoRA training: the weights (placed as :func:`plan_memory` places them),
    the adapters, their gradients and AdamW's two moments (float32) and its update's new copies of
    them, and the activations of one
    step on ``batch_size`` sequences of ``max_seq_len`` tokens (:func:`training_activation_bytes`).
    No KV cache: training runs whole sequences. Raises :class:`BudgetError` when ``budget`` cannot
    hold it with ``num_experts_per_tok`` expert slots per layer.
    """
    budget = None if budget is None else parse_size(budget)
    P = lora_parameter_count(config, spec)
    acts = training_activation_bytes(config, max_seq_len, batch_size=batch_size, loss_chunk=loss_chunk,
                                     attention_chunk=attention_chunk, float_bytes=float_bytes)  # fmt: skip
    extra = [
        Component(f"adapters ({P / 1e6:.1f}M params, float32)", 4 * P, "MLX"),
        Component("adapter gradients", 4 * P, "MLX"),
        Component("AdamW state (2 moments)", 8 * P, "MLX"),
        # the update makes new moments and adapters (and a temporary) before the old ones are freed
        Component("AdamW update (new copies)", 16 * P, "MLX"),
    ] + [Component(f"{name} (T={max_seq_len}, B={batch_size})", n, "MLX") for name, n in acts.items()]
    why = f"training on {batch_size} x {max_seq_len} tokens (adapters, optimizer and activations {sum(c.nbytes for c in extra) / GB:.2f} GB)"
    plan = _fit(config, tensors, budget, extra, float_bytes, why, "a shorter --max-seq-len or a smaller rank", slot_copies=1)
    plan.context, plan.prefill_step, plan.training = max_seq_len, max_seq_len, True
    return plan


def budget_for_slots(
    config: GptOssConfig, tensors: dict[str, TensorInfo], slots: int, *, context: int = 8192, float_bytes: int = 2
) -> int:
    """The smallest budget that keeps ``slots`` experts per layer resident."""
    unbounded = plan_memory(config, tensors, 10**15, context=context, float_bytes=float_bytes)
    experts = unbounded.expert_slots * config.num_hidden_layers * unbounded.expert_bytes
    return unbounded.mlx_bytes - experts + slots * config.num_hidden_layers * unbounded.expert_bytes
