"""Pure-MLX twins of the MoE kernels: the reference signatures, and the path on every backend
that has no custom kernel yet.

Shape legend: N tokens, H hidden, I expert intermediate, E experts, K experts per token.
Expert weights are MXFP4 as released: ``w`` uint32 [E, out, in/8] (8 codes per word, even element
in the low nibble), ``s`` uint8 E8M0 scales [E, out, in/32], ``b`` bias [E, out].
"""

from __future__ import annotations

import mlx.core as mx

# From this many (token, expert) pairs on, sort the pairs by expert so gather_qmm reads each
# expert's weights once (MLX's sorted path).
SORT_THRESHOLD = 64


def route_topk_softmax(logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """Router logits [N, E] -> (expert ids [N, K] uint32, weights [N, K]): softmax over the top k."""
    idx = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
    top = mx.take_along_axis(logits, idx, axis=-1)
    return idx.astype(mx.uint32), mx.softmax(top, axis=-1, precise=True)


def swiglu_clamped(h: mx.array, limit: float, alpha: float) -> mx.array:
    """gpt-oss's activation on interleaved gate/up rows: [..., 2I] -> [..., I]."""
    gate = mx.minimum(h[..., ::2], limit)
    up = mx.clip(h[..., 1::2], -limit, limit)
    return (up + 1) * (gate * mx.sigmoid(alpha * gate))


def _mxfp4(x: mx.array, w: mx.array, s: mx.array, ids: mx.array, sorted_ids: bool) -> mx.array:
    return mx.gather_qmm(
        x, w, s, rhs_indices=ids, transpose=True, group_size=32, bits=4, mode="mxfp4", sorted_indices=sorted_ids
    )


def moe_mxfp4_pairs(
    x: mx.array,
    indices: mx.array,
    gate_up_w: mx.array,
    gate_up_s: mx.array,
    gate_up_b: mx.array,
    down_w: mx.array,
    down_s: mx.array,
    down_b: mx.array,
    *,
    limit: float,
    alpha: float,
) -> mx.array:
    """Each selected expert's output, unweighted: x [N, H], indices [N, K] -> [N, K, H]."""
    N, K = indices.shape
    if N * K >= SORT_THRESHOLD:
        flat = indices.flatten()
        order = mx.argsort(flat)
        ids = flat[order]
        xs = x[order // K][:, None, :]  # [NK, 1, H], grouped by expert
        h = _mxfp4(xs, gate_up_w, gate_up_s, ids, True) + gate_up_b[ids][:, None, :]
        y = _mxfp4(swiglu_clamped(h, limit, alpha), down_w, down_s, ids, True) + down_b[ids][:, None, :]
        return y[mx.argsort(order)].reshape(N, K, -1)
    act = _gate_up(x, indices, gate_up_w, gate_up_s, gate_up_b, limit, alpha)
    return _down(act, indices, down_w, down_s, down_b)


def _gate_up(x, indices, w, s, b, limit: float, alpha: float) -> mx.array:
    """Unsorted path: x [N, H] -> each selected expert's SwiGLU activation [N, K, I] (x's dtype)."""
    h = _mxfp4(x[:, None, None, :], w, s, indices, False).squeeze(2) + b[indices]  # [N, K, 2I]
    return swiglu_clamped(h, limit, alpha)


def _down(act, indices, w, s, b) -> mx.array:
    """Unsorted path: act [N, K, I] -> each selected expert's output [N, K, H], unweighted."""
    return _mxfp4(act[:, :, None, :], w, s, indices, False).squeeze(2) + b[indices]


def mxfp4_gate_up_swiglu(
    x: mx.array, indices: mx.array, w: mx.array, s: mx.array, b: mx.array, *, limit: float, alpha: float
) -> mx.array:
    """x [N, H], indices [N, K] -> clamped SwiGLU of each selected expert's gate_up, [N, K, I] float32."""
    return _gate_up(x, indices, w, s, b, limit, alpha).astype(mx.float32)


def mxfp4_down_combine(
    act: mx.array, indices: mx.array, weights: mx.array, w: mx.array, s: mx.array, b: mx.array,
    residual: mx.array | None = None, *, out_dtype: mx.Dtype,
) -> mx.array:
    """act [N, K, I], indices/weights [N, K] -> Σ_k weight_k (down_k act_k + bias_k) (+ residual), [N, H]."""
    y = combine_experts(_down(act, indices, w, s, b), weights.astype(mx.float32))
    return (y if residual is None else y + residual.astype(mx.float32)).astype(out_dtype)


def combine_experts(y: mx.array, weights: mx.array) -> mx.array:
    """Σ_k weight_k · y_k: [N, K, H], [N, K] -> [N, H]."""
    return (y * weights[..., None].astype(y.dtype)).sum(axis=1)


def moe_mxfp4_swiglu(
    x: mx.array,
    indices: mx.array,
    weights: mx.array,
    gate_up_w: mx.array,
    gate_up_s: mx.array,
    gate_up_b: mx.array,
    down_w: mx.array,
    down_s: mx.array,
    down_b: mx.array,
    *,
    limit: float,
    alpha: float,
) -> mx.array:
    """The routed experts: x [N, H], indices/weights [N, K] -> Σ_k weight_k · expert_k(x) [N, H]."""
    y = moe_mxfp4_pairs(x, indices, gate_up_w, gate_up_s, gate_up_b, down_w, down_s, down_b, limit=limit, alpha=alpha)
    return combine_experts(y, weights)
