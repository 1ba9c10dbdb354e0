"""Backend choice for the MoE kernels is made here and nowhere else.

- Apple GPU (Metal) and NVIDIA GPU (CUDA): the custom kernels of :mod:`.gpu` (one source,
  :mod:`.source`) for the routing and, up to :data:`DECODE_MAX_TOKENS` tokens, the experts;
  longer inputs (prefill) go through MLX's sorted ``gather_qmm``, which reads each expert once.
- CPU, or ``MLX_GPTOSS_KERNELS=twin`` (or :func:`set_mode`): the pure-MLX twins of :mod:`.ops`,
  same signatures. On MLX's CPU backend the MXFP4 matmuls run with float32 activations: measured
  on MLX 0.32.4, 1 token x 4 experts of 5760x2880 takes 217 ms with bf16 activations and 23 ms
  with float32 ones (same weights, same result up to bf16 rounding of the activations).
- A custom kernel that fails its self-check (:mod:`.selfcheck`: first use in a process, cached per
  MLX version, device and source) is replaced by the twins, with one warning naming it.
"""

from __future__ import annotations

import mlx.core as mx

from . import backends, gpu, ops, selfcheck
from . import source as _source
from .backends import backend as backend
from .backends import mode as mode
from .backends import set_mode as set_mode

# Up to this many tokens the decode kernels run (they read each selected expert's rows once
# per (token, expert) pair); beyond, sorted gather_qmm reads each expert once. Measured with
# benchmarks/bench_moe.py on an H100 (benchmarks/RESULTS.md): one 20b MoE layer at T = 16 took
# 429 us with the kernels and 786 us with gather_qmm; at T = 128, 3029 us and 2475 us. Linear
# in T between those points they cross near T = 60; 32 keeps a margin.
DECODE_MAX_TOKENS = 32


def _on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def route_topk_softmax(logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """Router logits [N, E] -> (expert ids [N, K] uint32, softmax weights over the top k [N, K])."""
    b = backends.backend()  # looked up here, so a test (or a tool) can stand in for the backend in one place
    if b == "twin" or _source.ROUTE in selfcheck.failed(b):
        return ops.route_topk_softmax(logits, k)
    return gpu.route_topk_softmax(logits, k, dialect=b)


# The router folded into the routing kernel (one launch instead of two per layer). Off until
# measured on a GPU: nothing calls route_matvec_topk by default, and with this False it runs the twin.
FUSED_ROUTER = False


def route_matvec_topk(x: mx.array, w: mx.array, b: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """x [N, H], an unquantized router's weight [E, H] and bias [E] -> (ids [N, K] uint32, weights
    [N, K]); the logits in float32. See :data:`FUSED_ROUTER`."""
    be = backends.backend()
    if be == "twin" or not FUSED_ROUTER or _source.ROUTE_MATVEC in selfcheck.failed(be):
        return ops.route_matvec_topk(x, w, b, k)
    return gpu.route_matvec_topk(x, w, b, k, dialect=be)


def quantized_matmul(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, *, group_size: int, bits: int, mode: str
) -> mx.array:
    """``x @ dequantize(w).T``. On the CPU with float32 activations (measured on MLX 0.32.4, 1 x 2880
    by 5120 x 2880 8-bit: 128 ms with bf16 activations, 16 ms with float32)."""
    if _on_cpu() and x.dtype != mx.float32:
        y = mx.quantized_matmul(
            x.astype(mx.float32), w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode
        )
        return y.astype(x.dtype)
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode)


_EXPERT_KERNELS = frozenset({_source.GATE_UP, _source.DOWN})  # used together: one failing drops both


def moe_mxfp4_swiglu(
    x: mx.array,
    indices: mx.array,
    weights: mx.array,
    *args: mx.array,
    limit: float,
    alpha: float,
    residual: mx.array | None = None,
    delta: ops.ExpertsDelta | None = None,
) -> mx.array:
    """Σ_k weight_k · expert_k(x) (+ residual) for MXFP4 experts; see :func:`.ops.moe_mxfp4_swiglu`.

    With a low-rank ``delta`` (adapters), every backend runs the split path of the twin: the base
    gate_up pre-activation through ``gather_qmm`` plus the update for the routed experts, then the
    SwiGLU, then down likewise. The custom GPU kernels fuse the SwiGLU into the gate_up matmul, so
    they cannot take the update; ``gather_qmm`` is the GPU's prefill path already.
    """
    b = backends.backend()
    if b != "twin" and x.shape[0] <= DECODE_MAX_TOKENS and delta is None and not _EXPERT_KERNELS & selfcheck.failed(b):
        gw, gs, gb, dw, ds, db = args
        act = gpu.mxfp4_gate_up_swiglu(x, indices, gw, gs, gb, limit=limit, alpha=alpha, dialect=b)
        return gpu.mxfp4_down_combine(act, indices, weights, dw, ds, db, residual, out_dtype=x.dtype, dialect=b)
    if _on_cpu() and x.dtype != mx.float32:
        y = ops.moe_mxfp4_swiglu(x.astype(mx.float32), indices, weights, *args, limit=limit, alpha=alpha, delta=delta)
        y = y.astype(x.dtype)
    else:
        y = ops.moe_mxfp4_swiglu(x, indices, weights, *args, limit=limit, alpha=alpha, delta=delta)
    return y if residual is None else residual + y


def moe_mxfp4_pairs(
    x: mx.array, indices: mx.array, *args: mx.array, limit: float, alpha: float, delta: ops.ExpertsDelta | None = None
) -> mx.array:
    """Each selected expert's unweighted output [N, K, H]; see :func:`.ops.moe_mxfp4_pairs`."""
    if _on_cpu() and x.dtype != mx.float32:
        x = x.astype(mx.float32)
    return ops.moe_mxfp4_pairs(x, indices, *args, limit=limit, alpha=alpha, delta=delta)


combine_experts = ops.combine_experts
ExpertsDelta = ops.ExpertsDelta
