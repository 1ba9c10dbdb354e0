"""The MoE kernels on Apple GPUs (``mx.fast.metal_kernel``) and NVIDIA GPUs (``mx.fast.cuda_kernel``).

Same signatures as the twins in :mod:`.ops`; the source is :mod:`.source`, rendered per dialect.
Kernels are built once per (dialect, SwiGLU constants) and cached.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import NamedTuple

import mlx.core as mx

from . import source as S

# Launch shapes per dialect, as (WARPS, JW): SIMD groups per threadgroup and output columns
# (gate_up) / rows (down) per SIMD group. Every launch's grid is a whole number of threadgroups.
# CUDA: chosen by benchmarks/bench_moe.py --sweep on an H100 (2026-11-27, benchmarks/results/): at
# T = 1 gate_up took 26.9-29.0 us for every shape but (4, 8) (72.8 us), down 21.4 us at (4, 4)
# against 26.6-37.2 us for the others.
# Metal: not measured yet (no Mac here); chosen to fit 64 32-bit registers per thread, where Apple
# GPUs start trading occupancy for registers. nvcc is the proxy: capped at 64 registers
# (-maxrregcount=64, sm_90a) gate_up and down compile without spills up to JW = 4 and need 80-96
# registers at JW = 8 (before x was loaded once per group and offsets were 32-bit, gate_up at
# JW = 4 took 127, at Apple's ceiling). gate_up takes JW = 4 with 8 SIMD groups: each threadgroup
# fills x (H floats) into threadgroup memory, so fewer, wider groups refill it less often. down
# keeps JW = 2: at one token it has only H / (WARPS * JW) threadgroups (180 for the 20b), and
# halving that would leave a large M-series GPU with about two per core.
# Re-measure with `bench_moe.py --sweep` on a Mac before trusting these.
LAUNCH = {
    "cuda": {"gate_up": (4, 4), "down": (4, 4)},
    "metal": {"gate_up": (8, 4), "down": (8, 2)},
}


def launch_shape(dialect: str, kernel: str) -> tuple[int, int]:
    """The default (WARPS, JW) of ``kernel`` ("gate_up" or "down") for ``dialect``."""
    return LAUNCH[dialect][kernel]


@cache
def _kernel(dialect: str, name: str, limit: float = 7.0, alpha: float = 1.702):
    spec = S.SPECS[name]
    make = mx.fast.metal_kernel if dialect == "metal" else mx.fast.cuda_kernel
    return make(
        name=name,
        input_names=list(spec.inputs),
        output_names=list(spec.outputs),
        source=S.body(dialect, name),
        header=S.header(dialect, limit, alpha),
    )


def route_topk_softmax(logits: mx.array, k: int, *, dialect: str) -> tuple[mx.array, mx.array]:
    """Router logits [N, E] -> (expert ids [N, K] uint32, weights [N, K]); ties go to the lower id."""
    N, E = logits.shape
    out = _kernel(dialect, S.ROUTE)(
        inputs=[logits],
        template=[("E", E), ("K", k), ("OutT", logits.dtype)],
        grid=(32 * N, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(N, k), (N, k)],
        output_dtypes=[mx.uint32, logits.dtype],
    )
    return out[0], out[1]


ROUTE_MATVEC_WARPS = 4  # SIMD groups per token in the fused router; not tuned (off by default)


def route_matvec_topk(
    x: mx.array, w: mx.array, b: mx.array, k: int, *, dialect: str, warps: int | None = None
) -> tuple[mx.array, mx.array]:
    """x [N, H], router weight [E, H] and bias [E] -> (expert ids [N, K] uint32, weights [N, K] in x's dtype)."""
    N, H = x.shape
    E = w.shape[0]
    warps = warps or ROUTE_MATVEC_WARPS
    out = _kernel(dialect, S.ROUTE_MATVEC)(
        inputs=[x, w, b],
        template=[("E", E), ("K", k), ("H", H), ("WARPS", warps), ("OutT", x.dtype)],
        grid=(32 * warps * N, 1, 1),
        threadgroup=(32 * warps, 1, 1),
        output_shapes=[(N, k), (N, k)],
        output_dtypes=[mx.uint32, x.dtype],
    )
    return out[0], out[1]


def mxfp4_gate_up_swiglu(x, indices, w, s, b, *, limit: float, alpha: float, dialect: str, launch=None) -> mx.array:
    """x [N, H], indices [N, K] -> clamped SwiGLU of each selected expert's gate_up, [N, K, I] float32."""
    N, H = x.shape
    K = indices.shape[1]
    I = w.shape[1] // 2
    warps, jw = launch or launch_shape(dialect, "gate_up")
    per_group = warps * jw
    return _kernel(dialect, S.GATE_UP, float(limit), float(alpha))(
        inputs=[x, indices, w, s, b],
        template=[("H", H), ("I", I), ("K", K), ("JW", jw), ("WARPS", warps)],
        grid=(32 * warps * ((I + per_group - 1) // per_group), N * K, 1),
        threadgroup=(32 * warps, 1, 1),
        output_shapes=[(N, K, I)],
        output_dtypes=[mx.float32],
    )[0]


def mxfp4_down_combine(act, indices, weights, w, s, b, residual=None, *, out_dtype, dialect: str, launch=None) -> mx.array:
    """act [N, K, I], indices/weights [N, K] -> Σ_k weight_k (down_k act_k + bias_k) (+ residual), [N, H]."""
    N, K, I = act.shape
    H = w.shape[1]
    warps, jw = launch or launch_shape(dialect, "down")
    per_group = warps * jw
    return _kernel(dialect, S.DOWN)(
        inputs=[act, indices, weights, w, s, b, residual if residual is not None else b],  # b: a placeholder, unread
        template=[
            ("H", H),
            ("I", I),
            ("K", K),
            ("JW", jw),
            ("WARPS", warps),
            ("HAS_RES", residual is not None),
            ("OutT", out_dtype),
        ],
        grid=(32 * warps * ((H + per_group - 1) // per_group), N, 1),
        threadgroup=(32 * warps, 1, 1),
        output_shapes=[(N, H)],
        output_dtypes=[out_dtype],
    )[0]


class Launch(NamedTuple):
    """One custom-kernel launch as MLX builds it: instance name, full source, grid and threadgroup
    (in threads, as MLX passes them to the GPU)."""

    name: str
    source: str
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]


def metal_launches(fn: Callable[..., object], *arrays: mx.array) -> list[Launch]:
    """The Metal launches ``fn(*arrays)`` makes, with the exact source MLX generates for them.

    Traced with ``mx.export_function`` (nothing runs), so this works without a GPU: on any MLX
    build where ``mx.fast.metal_kernel`` can be constructed (macOS, and Linux CPU builds).
    """
    found: list[Launch] = []

    def visit(node: dict) -> None:
        if node.get("type") == "primitive" and node.get("name") == "CustomKernel":
            a = node["arguments"]
            found.append(Launch(a[0], a[1], tuple(a[2:5]), tuple(a[5:8])))

    mx.export_function(visit, fn, *arrays)
    return found
