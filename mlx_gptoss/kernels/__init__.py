"""Backend choice for the MoE kernels is made here and nowhere else.

Today every backend runs the pure-MLX twins in :mod:`.ops`. On MLX's CPU backend the MXFP4
matmuls run with float32 activations: measured on MLX 0.32.4, 1 token x 4 experts of 5760x2880
takes 217 ms with bf16 activations and 23 ms with float32 ones (same weights, same result up to
bf16 rounding of the activations).
"""

from __future__ import annotations

import mlx.core as mx

from . import ops

route_topk_softmax = ops.route_topk_softmax
combine_experts = ops.combine_experts


def _on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def quantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, *, group_size: int, bits: int, mode: str) -> mx.array:
    """``x @ dequantize(w).T``. On the CPU with float32 activations (measured on MLX 0.32.4, 1 x 2880
    by 5120 x 2880 8-bit: 128 ms with bf16 activations, 16 ms with float32)."""
    if _on_cpu() and x.dtype != mx.float32:
        y = mx.quantized_matmul(x.astype(mx.float32), w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode)
        return y.astype(x.dtype)
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode)


def moe_mxfp4_swiglu(x: mx.array, indices: mx.array, weights: mx.array, *args: mx.array, limit: float, alpha: float) -> mx.array:
    """Σ_k weight_k · expert_k(x) for MXFP4 experts; see :func:`.ops.moe_mxfp4_swiglu`."""
    if _on_cpu() and x.dtype != mx.float32:
        y = ops.moe_mxfp4_swiglu(x.astype(mx.float32), indices, weights, *args, limit=limit, alpha=alpha)
        return y.astype(x.dtype)
    return ops.moe_mxfp4_swiglu(x, indices, weights, *args, limit=limit, alpha=alpha)


def moe_mxfp4_pairs(x: mx.array, indices: mx.array, *args: mx.array, limit: float, alpha: float) -> mx.array:
    """Each selected expert's unweighted output [N, K, H]; see :func:`.ops.moe_mxfp4_pairs`."""
    if _on_cpu() and x.dtype != mx.float32:
        return ops.moe_mxfp4_pairs(x.astype(mx.float32), indices, *args, limit=limit, alpha=alpha)
    return ops.moe_mxfp4_pairs(x, indices, *args, limit=limit, alpha=alpha)
