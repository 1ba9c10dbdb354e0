"""Pure-MLX twins of the MoE kernels: the reference signatures, and the path on every backend
that has no custom kernel yet.

Shape legend: N tokens, H hidden, I expert intermediate, E experts, K experts per token.
Expert weights are MXFP4 as released: ``w`` uint32 [E, out, in/8] (8 codes per word, even element
in the low nibble), ``s`` uint8 E8M0 scales [E, out, in/32], ``b`` bias [E, out].
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx

# From this many (token, expert) pairs on, sort the pairs by expert so gather_qmm reads each
# expert's weights once (MLX's sorted path).
SORT_THRESHOLD = 64


def route_topk_softmax(logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """Router logits [N, E] -> (expert ids [N, K] uint32, weights [N, K]): softmax over the top k."""
    # the choice is not differentiable: without stop_gradient, training cannot backprop to logits
    idx = mx.stop_gradient(mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k])
    top = mx.take_along_axis(logits, idx, axis=-1)
    return idx.astype(mx.uint32), mx.softmax(top, axis=-1, precise=True)


def route_matvec_topk(x: mx.array, w: mx.array, b: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """x [N, H], router weight [E, H], bias [E] -> (expert ids [N, K] uint32, weights [N, K] in x's
    dtype): the router's logits in float32, then :func:`route_topk_softmax` (the fused kernel's twin)."""
    f32 = mx.float32
    ids, weights = route_topk_softmax(x.astype(f32) @ w.astype(f32).T + b.astype(f32), k)
    return ids, weights.astype(x.dtype)


def swiglu_clamped(h: mx.array, limit: float, alpha: float) -> mx.array:
    """gpt-oss's activation on interleaved gate/up rows: [..., 2I] -> [..., I]."""
    gate = mx.minimum(h[..., ::2], limit)
    up = mx.clip(h[..., 1::2], -limit, limit)
    return (up + 1) * (gate * mx.sigmoid(alpha * gate))


def _mxfp4(x: mx.array, w: mx.array, s: mx.array, ids: mx.array, sorted_ids: bool) -> mx.array:
    return mx.gather_qmm(x, w, s, rhs_indices=ids, transpose=True, group_size=32, bits=4, mode="mxfp4", sorted_indices=sorted_ids)


class ExpertsDelta(NamedTuple):
    """A low-rank update of every expert (LoRA): expert e's map W_e becomes W_e + scale · B_e A_e.

    gate_up_a [E, r, H], gate_up_b [E, 2I, r] (rows interleaved as gate_up's), down_a [E, r, I],
    down_b [E, H, r]. Applied only to the routed experts, never materialised as [E, out, in].
    """

    gate_up_a: mx.array
    gate_up_b: mx.array
    down_a: mx.array
    down_b: mx.array
    scale: float

    def select(self, experts: mx.array) -> ExpertsDelta:
        """The update of ``experts`` [S] only, in that order (for slot-indexed expert weights)."""
        return ExpertsDelta(*(t[experts] for t in self[:4]), self.scale)


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
    delta: ExpertsDelta | None = None,
) -> mx.array:
    """Each selected expert's output, unweighted: x [N, H], indices [N, K] -> [N, K, H].

    ``delta`` adds a low-rank update to both expert maps (the adapters' path).
    """
    N, K = indices.shape
    gate_up = (gate_up_w, gate_up_s, gate_up_b, None if delta is None else (delta.gate_up_a, delta.gate_up_b, delta.scale))
    down = (down_w, down_s, down_b, None if delta is None else (delta.down_a, delta.down_b, delta.scale))
    if N * K >= SORT_THRESHOLD:
        flat = indices.flatten()
        order = mx.argsort(flat)
        ids = flat[order]
        h = _expert_linear(x[order // K], ids, *gate_up, True)  # [NK, 2I], grouped by expert
        y = _expert_linear(swiglu_clamped(h, limit, alpha), ids, *down, True)
        return y[mx.argsort(order)].reshape(N, K, -1)
    h = _expert_linear(x[:, None, :], indices, *gate_up, False)  # [N, K, 2I]
    return _expert_linear(swiglu_clamped(h, limit, alpha), indices, *down, False)


def _expert_linear(v, ids, w, s, b, lora, sorted_ids: bool) -> mx.array:
    """v [..., in] (broadcast against ids) -> expert ids' map of it (+ bias, + scale · B A v), [..., out].

    Sorted: v [NK, in], ids [NK] ascending. Unsorted: v [N, 1 or K, in], ids [N, K]. The low-rank
    update gathers A and B per pair like the experts (O(NK·r) memory beyond the output).
    """
    v = v[..., None, :]
    y = _mxfp4(v, w, s, ids, sorted_ids)
    if lora is not None:
        a, bb, scale = lora
        u = mx.gather_mm(v.astype(a.dtype), a.swapaxes(-1, -2), rhs_indices=ids, sorted_indices=sorted_ids)  # [..., 1, r]
        d = mx.gather_mm(u, bb.swapaxes(-1, -2), rhs_indices=ids, sorted_indices=sorted_ids)
        y = y + (scale * d).astype(y.dtype)
    return y.squeeze(-2) + b[ids]


def _gate_up(x, indices, w, s, b, limit: float, alpha: float) -> mx.array:
    """Unsorted path: x [N, H] -> each selected expert's SwiGLU activation [N, K, I] (x's dtype)."""
    return swiglu_clamped(_expert_linear(x[:, None, :], indices, w, s, b, None, False), limit, alpha)


def _down(act, indices, w, s, b) -> mx.array:
    """Unsorted path: act [N, K, I] -> each selected expert's output [N, K, H], unweighted."""
    return _expert_linear(act, indices, w, s, b, None, False)


def mxfp4_gate_up_swiglu(
    x: mx.array, indices: mx.array, w: mx.array, s: mx.array, b: mx.array, *, limit: float, alpha: float
) -> mx.array:
    """x [N, H], indices [N, K] -> clamped SwiGLU of each selected expert's gate_up, [N, K, I] float32."""
    return _gate_up(x, indices, w, s, b, limit, alpha).astype(mx.float32)


def mxfp4_down_combine(
    act: mx.array,
    indices: mx.array,
    weights: mx.array,
    w: mx.array,
    s: mx.array,
    b: mx.array,
    residual: mx.array | None = None,
    *,
    out_dtype: mx.Dtype,
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
    delta: ExpertsDelta | None = None,
) -> mx.array:
    """The routed experts: x [N, H], indices/weights [N, K] -> Σ_k weight_k · expert_k(x) [N, H]."""
    y = moe_mxfp4_pairs(
        x, indices, gate_up_w, gate_up_s, gate_up_b, down_w, down_s, down_b, limit=limit, alpha=alpha, delta=delta
    )
    return combine_experts(y, weights)
