"""The MoE kernels' source, written once, and the two GPU dialects it is rendered into.

Each body below is plain C++ that names only the ``GX_*`` macros, the ``gx_*`` helpers and the
prologue's ``gx_*`` ids; :data:`DIALECTS` gives those for Metal (``mx.fast.metal_kernel``) and
CUDA (``mx.fast.cuda_kernel``). MLX builds the kernel signature itself from the input/output
names and the template arguments; :func:`generated_source` reproduces that wrapping (checked
against the Metal source MLX itself generates) so tests can compile exactly what the GPU would
(Metal as C++ against a shim header and in a thread simulator, CUDA with nvcc).

MXFP4 decode trick (both dialects): a 32-bit word holds 8 E2M1 codes, element 2i in the low
nibble of byte i. Masking nibble pairs (e, e+4) into the two halves of a word and moving the
3 magnitude bits to bits 9..11 and the sign to bit 15 makes an IEEE half pair whose values are
the E2M1 values times 2**-14 (E2M1's 0.5 lands on a half subnormal, which converts exactly).
So one word costs 4 shift+mask pairs and 4 half2->float2 conversions for 8 products.
"""

from __future__ import annotations

from dataclasses import dataclass

# Kernel names; MLX prefixes them with "custom_kernel_".
ROUTE, GATE_UP, DOWN = "gx_route_topk", "gx_mxfp4_gate_up_swiglu", "gx_mxfp4_down_combine"
ROUTE_MATVEC = "gx_route_matvec_topk"

_COMMON_HELPERS = r"""
// "Minus infinity" for the top-k search: the lowest finite float, so no comparison depends on
// infinities (MLX >= 0.32 compiles custom Metal kernels in safe math mode, where inf would work;
// the finite value keeps the source correct under fast math too).
#define GX_NEG_INF (-3.40282347e38f)
// E2M1 pair (elements e, e+4 of a word) -> half2 bit pattern; value = half * 2^14.
#define GX_PAIR(q, l1, l2) ((((q) << (l1)) & 0x0E000E00u) | (((q) << (l2)) & 0x80008000u))
#define GX_PAIR_R(q) ((((q) >> 3) & 0x0E000E00u) | ((q) & 0x80008000u))

// One 32-element slice of the activations in registers: x[8i..8i+3] in v[2i], x[8i+4..8i+7] in v[2i+1].
// Passed by value (the helpers are inlined): Metal wants an address space on every pointer.
struct gx_x8 {
  float4 v[8];
};

// 8 MXFP4 codes of one word times x[0..3] (a) and x[4..7] (b), without the group scale.
GX_INLINE float gx_dot8(uint32_t q, float4 a, float4 b) {
  float2 p0 = gx_h2f2(GX_PAIR(q, 9, 12));   // elements 0, 4
  float2 p1 = gx_h2f2(GX_PAIR(q, 5, 8));    // elements 1, 5
  float2 p2 = gx_h2f2(GX_PAIR(q, 1, 4));    // elements 2, 6
  float2 p3 = gx_h2f2(GX_PAIR_R(q));        // elements 3, 7
  float s = p0.x * a.x;
  s = GX_FMA(p0.y, b.x, s);
  s = GX_FMA(p1.x, a.y, s);
  s = GX_FMA(p1.y, b.y, s);
  s = GX_FMA(p2.x, a.z, s);
  s = GX_FMA(p2.y, b.z, s);
  s = GX_FMA(p3.x, a.w, s);
  s = GX_FMA(p3.y, b.w, s);
  return s;
}

// One 32-element group (4 words) against activations already in registers.
GX_INLINE float gx_dot32(uint4 q, gx_x8 x) {
  float s = gx_dot8(q.x, x.v[0], x.v[1]);
  s += gx_dot8(q.y, x.v[2], x.v[3]);
  s += gx_dot8(q.z, x.v[4], x.v[5]);
  s += gx_dot8(q.w, x.v[6], x.v[7]);
  return s;
}

// Group g of the activations from the transposed shared layout (one read per group, for all rows).
GX_INLINE gx_x8 gx_load_x8(GX_SHARED_PTR const float4* xs, uint32_t g, uint32_t G) {
  gx_x8 x;
  GX_UNROLL for (int i = 0; i < 8; ++i) x.v[i] = xs[i * G + g];
  return x;
}

// E8M0 scale byte -> 2^(s-127), times the 2^14 the half trick leaves out (s = 0 gives 0, as MLX).
GX_INLINE float gx_scale(uint32_t s) { return GX_AS_FLOAT(s << 23) * 16384.0f; }
"""

# Top K of E logits held by one SIMD group (lane l holds v[i] = logit of expert l + 32 i), then the
# softmax over them: K rounds of a SIMD max with the lowest expert id winning ties. Shared by the
# routing kernels; writes indices/weights of token n.
_TOPK = r"""
  float top[K];
  uint32_t ids[K];
  GX_UNROLL for (int r = 0; r < K; ++r) {
    float best = GX_NEG_INF;
    uint32_t arg = 0xFFFFFFFFu;
    GX_UNROLL for (int i = 0; i < PER; ++i) {
      uint32_t e = gx_lane + 32 * i;
      if (e < (uint32_t)E && (v[i] > best || arg == 0xFFFFFFFFu)) { best = v[i]; arg = e; }
    }
    float m = gx_simd_max(best);
    uint32_t win = gx_simd_min_u(best == m ? arg : 0xFFFFFFFFu);
    top[r] = m;
    ids[r] = win;
    GX_UNROLL for (int i = 0; i < PER; ++i) {
      if (gx_lane + 32 * i == win) v[i] = GX_NEG_INF;
    }
  }
  if (gx_lane == 0) {
    float z = 0.0f;
    GX_UNROLL for (int r = 0; r < K; ++r) z += GX_EXP(top[r] - top[0]);
    GX_UNROLL for (int r = 0; r < K; ++r) {
      indices[n * K + r] = ids[r];
      weights[n * K + r] = OutT(GX_EXP(top[r] - top[0]) / z);
    }
  }
"""

# Router logits [N, E] -> top-K ids (descending) and softmax weights over them. One SIMD group
# (32 threads) per token; each lane holds E/32 logits.
_ROUTE_BODY = (
    r"""
  GX_PROLOGUE
  constexpr int PER = (E + 31) / 32;
  const uint32_t n = gx_bx;
  float v[PER];
  GX_UNROLL for (int i = 0; i < PER; ++i) {
    uint32_t e = gx_lane + 32 * i;
    v[i] = e < (uint32_t)E ? float(logits[n * E + e]) : GX_NEG_INF;
  }
"""
    + _TOPK
)

# The router folded in: x [N, H], router weight rw [E, H] and bias rb [E] -> the same top-K ids and
# weights, logits computed in float32 (not rounded to x's dtype as the unfused router's are). One
# threadgroup of WARPS SIMD groups per token: SIMD group w computes the logits of experts w,
# w + WARPS, ... (lanes stride over H, a SIMD sum), into threadgroup memory; SIMD group 0 then
# runs the top K. Saves the router's launch and its logits' round trip through memory.
_ROUTE_MATVEC_BODY = (
    r"""
  GX_PROLOGUE
  constexpr int PER = (E + 31) / 32;
  GX_SHARED float lg[E];
  static_assert(sizeof(lg) <= 32768, "threadgroup memory over Metal's 32 KB");
  const uint32_t n = gx_bx;
  const auto xn = x + n * H;
  for (uint32_t e = gx_warp; e < (uint32_t)E; e += WARPS) {
    const auto we = rw + e * H;
    float acc = 0.0f;
    for (uint32_t h = gx_lane; h < (uint32_t)H; h += 32) acc = GX_FMA(float(xn[h]), float(we[h]), acc);
    acc = gx_simd_sum(acc);
    if (gx_lane == 0) lg[e] = acc + float(rb[e]);
  }
  GX_BARRIER;
  if (gx_warp != 0) return;
  float v[PER];
  GX_UNROLL for (int i = 0; i < PER; ++i) {
    uint32_t e = gx_lane + 32 * i;
    v[i] = e < (uint32_t)E ? lg[e] : GX_NEG_INF;
  }
"""
    + _TOPK
)

# x [N, H], indices [N, K] -> act [N, K, I] (float32): for pair p = n*K+k, expert e = indices[p],
# act[p, j] = swiglu(gate_j + bg, up_j + bu) with gate/up rows 2j, 2j+1 of e's gate_up.
# Grid: y = pair, x = blocks of WARPS warps, each warp JW output columns (2*JW weight rows).
# x lives in shared memory transposed by groups so lanes (one group each) read it conflict-free;
# each lane reads its group of x once and applies it to all 2*JW rows. The 64-bit part of each
# address (which expert, which first row) is folded into base pointers once; the hot loop adds
# 32-bit offsets (64-bit integer math is slow on Apple GPUs).
_GATE_UP_BODY = r"""
  GX_PROLOGUE
  static_assert(H % 32 == 0, "H must be a multiple of the MXFP4 group (32): uint4 loads stay 16-byte aligned");
  constexpr int G = H / 32;
  GX_SHARED float4 xs[8 * G];
  static_assert(sizeof(xs) <= 32768, "threadgroup memory over Metal's 32 KB");
  const uint32_t p = gx_by;
  const uint32_t n = p / K;
  for (uint32_t i = gx_tid; i < 8 * G; i += 32 * WARPS) {
    uint32_t base = n * H + 4 * i;
    xs[(i % 8) * G + i / 8] = GX_F4(float(x[base]), float(x[base + 1]), float(x[base + 2]), float(x[base + 3]));
  }
  GX_BARRIER;
  const uint32_t e = indices[p];
  const uint32_t j0 = (gx_bx * WARPS + gx_warp) * JW;
  const uint64_t row0 = (uint64_t)e * (2 * I) + 2 * j0;
  const GX_DEVICE_PTR uint4* wq = (const GX_DEVICE_PTR uint4*)(w) + row0 * G;
  const auto sq = s + row0 * G;
  const auto bq = bias + row0;
  float acc[2 * JW];
  GX_UNROLL for (int r = 0; r < 2 * JW; ++r) acc[r] = 0.0f;
  for (uint32_t g = gx_lane; g < (uint32_t)G; g += 32) {
    const gx_x8 xv = gx_load_x8(xs, g, G);
    GX_UNROLL for (int r = 0; r < 2 * JW; ++r) {
      const bool ok = j0 + r / 2 < (uint32_t)I;
      const uint32_t o = (uint32_t)r * G + g;
      const uint4 q = ok ? wq[o] : GX_U4(0u, 0u, 0u, 0u);
      const uint32_t sc = ok ? (uint32_t)sq[o] : 0u;
      acc[r] = GX_FMA(gx_dot32(q, xv), gx_scale(sc), acc[r]);
    }
  }
  GX_UNROLL for (int r = 0; r < 2 * JW; ++r) acc[r] = gx_simd_sum(acc[r]);
  if (gx_lane == 0) {
    GX_UNROLL for (int c = 0; c < JW; ++c) {
      const uint32_t j = j0 + c;
      if (j < (uint32_t)I) {
        float gate = acc[2 * c] + float(bq[2 * c]);
        float up = acc[2 * c + 1] + float(bq[2 * c + 1]);
        gate = GX_MIN(gate, GX_LIMIT);
        up = GX_MAX(GX_MIN(up, GX_LIMIT), -GX_LIMIT);
        // exponent capped at 80 so exp stays finite whatever the math mode (the product is ~1e-33 there)
        act[p * I + j] = (up + 1.0f) * (gate / (1.0f + GX_EXP(GX_MIN(-GX_ALPHA * gate, 80.0f))));
      }
    }
  }
"""

# act [N, K, I] (float32), indices/weights [N, K] -> y [N, H] = sum_k weight_k (down_e act_k + b_e),
# plus resid [N, H] when HAS_RES (the block's residual add, saving a launch; else resid is unused).
# Grid: y = token, x = blocks of WARPS warps, each warp JW output rows for all K experts; act of
# one expert at a time sits in shared memory (I floats; Metal allows 32 KB of it). Addressing as
# in gate_up: per-expert base pointers, 32-bit offsets in the hot loop.
_DOWN_BODY = r"""
  GX_PROLOGUE
  static_assert(I % 32 == 0, "I must be a multiple of the MXFP4 group (32): uint4 loads stay 16-byte aligned");
  constexpr int G = I / 32;
  GX_SHARED float4 xs[8 * G];
  static_assert(sizeof(xs) <= 32768, "threadgroup memory over Metal's 32 KB");
  const uint32_t n = gx_by;
  const uint32_t h0 = (gx_bx * WARPS + gx_warp) * JW;
  float acc[JW];
  GX_UNROLL for (int r = 0; r < JW; ++r) acc[r] = 0.0f;
  for (int k = 0; k < K; ++k) {
    GX_BARRIER;
    for (uint32_t i = gx_tid; i < 8 * G; i += 32 * WARPS) {
      uint32_t base = (n * K + k) * I + 4 * i;
      xs[(i % 8) * G + i / 8] = GX_F4(act[base], act[base + 1], act[base + 2], act[base + 3]);
    }
    GX_BARRIER;
    const uint32_t e = indices[n * K + k];
    const float wk = float(weights[n * K + k]);
    const uint64_t row0 = (uint64_t)e * H + h0;
    const GX_DEVICE_PTR uint4* wq = (const GX_DEVICE_PTR uint4*)(w) + row0 * G;
    const auto sq = s + row0 * G;
    const auto bq = bias + row0;
    float part[JW];
    GX_UNROLL for (int r = 0; r < JW; ++r) part[r] = 0.0f;
    for (uint32_t g = gx_lane; g < (uint32_t)G; g += 32) {
      const gx_x8 xv = gx_load_x8(xs, g, G);
      GX_UNROLL for (int r = 0; r < JW; ++r) {
        const bool ok = h0 + r < (uint32_t)H;
        const uint32_t o = (uint32_t)r * G + g;
        const uint4 q = ok ? wq[o] : GX_U4(0u, 0u, 0u, 0u);
        const uint32_t sc = ok ? (uint32_t)sq[o] : 0u;
        part[r] = GX_FMA(gx_dot32(q, xv), gx_scale(sc), part[r]);
      }
    }
    GX_UNROLL for (int r = 0; r < JW; ++r) {
      float bb = (gx_lane == 0 && h0 + r < (uint32_t)H) ? float(bq[r]) : 0.0f;
      acc[r] = GX_FMA(wk, part[r] + bb, acc[r]);
    }
  }
  GX_UNROLL for (int r = 0; r < JW; ++r) acc[r] = gx_simd_sum(acc[r]);
  if (gx_lane == 0) {
    GX_UNROLL for (int r = 0; r < JW; ++r) {
      if (h0 + r < (uint32_t)H) y[n * H + h0 + r] = OutT(HAS_RES ? acc[r] + float(resid[n * H + h0 + r]) : acc[r]);
    }
  }
"""


@dataclass(frozen=True)
class Dialect:
    """What differs between the GPU languages: helpers/macros (header) and the id prologue."""

    name: str
    header: str
    prologue: str


_METAL_HEADER = r"""
#define GX_INLINE inline
#define GX_UNROLL _Pragma("unroll")
#define GX_SHARED threadgroup
#define GX_SHARED_PTR threadgroup
#define GX_DEVICE_PTR device
#define GX_BARRIER threadgroup_barrier(mem_flags::mem_threadgroup)
#define GX_AS_FLOAT(u) as_type<float>(u)
#define GX_F4(a, b, c, d) float4(a, b, c, d)
#define GX_U4(a, b, c, d) uint4(a, b, c, d)
#define GX_FMA(a, b, c) fma(a, b, c)
#define GX_MIN(a, b) min(a, b)
#define GX_MAX(a, b) max(a, b)
#define GX_EXP(v) metal::exp(v)
GX_INLINE float2 gx_h2f2(uint32_t u) { return float2(as_type<half2>(u)); }
GX_INLINE float gx_simd_sum(float v) { return simd_sum(v); }
GX_INLINE float gx_simd_max(float v) { return simd_max(v); }
GX_INLINE uint32_t gx_simd_min_u(uint32_t v) { return simd_min(v); }
"""

_METAL_PROLOGUE = """\
  const uint32_t gx_tid = thread_position_in_threadgroup.x;
  const uint32_t gx_bx = threadgroup_position_in_grid.x;
  const uint32_t gx_by = threadgroup_position_in_grid.y;
  const uint32_t gx_lane = thread_index_in_simdgroup;
  const uint32_t gx_warp = simdgroup_index_in_threadgroup;
  (void)gx_tid; (void)gx_bx; (void)gx_by; (void)gx_lane; (void)gx_warp;"""

_CUDA_HEADER = r"""
#define GX_INLINE __device__ __forceinline__
#define GX_UNROLL _Pragma("unroll")
#define GX_SHARED __shared__
#define GX_SHARED_PTR
#define GX_DEVICE_PTR
#define GX_BARRIER __syncthreads()
#define GX_AS_FLOAT(u) __uint_as_float(u)
#define GX_F4(a, b, c, d) make_float4(a, b, c, d)
#define GX_U4(a, b, c, d) make_uint4(a, b, c, d)
#define GX_FMA(a, b, c) fmaf(a, b, c)
#define GX_MIN(a, b) fminf(a, b)
#define GX_MAX(a, b) fmaxf(a, b)
#define GX_EXP(v) expf(v)
GX_INLINE float2 gx_h2f2(uint32_t u) { return __half22float2(*reinterpret_cast<const __half2*>(&u)); }
GX_INLINE float gx_simd_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
GX_INLINE float gx_simd_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
GX_INLINE uint32_t gx_simd_min_u(uint32_t v) {
  for (int o = 16; o > 0; o >>= 1) {
    uint32_t u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u < v ? u : v;
  }
  return v;
}
"""

_CUDA_PROLOGUE = """\
  const uint32_t gx_tid = threadIdx.x;
  const uint32_t gx_bx = blockIdx.x;
  const uint32_t gx_by = blockIdx.y;
  const uint32_t gx_lane = threadIdx.x & 31u;
  const uint32_t gx_warp = threadIdx.x >> 5;
  (void)gx_tid; (void)gx_bx; (void)gx_by; (void)gx_lane; (void)gx_warp;"""

DIALECTS = {
    "metal": Dialect("metal", _METAL_HEADER, _METAL_PROLOGUE),
    "cuda": Dialect("cuda", _CUDA_HEADER, _CUDA_PROLOGUE),
}


@dataclass(frozen=True)
class KernelSpec:
    """One kernel: its name, argument names (in call order) and body."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    body: str


SPECS = {
    ROUTE: KernelSpec(ROUTE, ("logits",), ("indices", "weights"), _ROUTE_BODY),
    ROUTE_MATVEC: KernelSpec(ROUTE_MATVEC, ("x", "rw", "rb"), ("indices", "weights"), _ROUTE_MATVEC_BODY),
    GATE_UP: KernelSpec(GATE_UP, ("x", "indices", "w", "s", "bias"), ("act",), _GATE_UP_BODY),
    DOWN: KernelSpec(DOWN, ("act", "indices", "weights", "w", "s", "bias", "resid"), ("y",), _DOWN_BODY),
}


def _float_literal(v: float) -> str:
    return f"{float(v):.9g}f" if "." in f"{float(v):.9g}" or "e" in f"{float(v):.9g}" else f"{float(v):.1f}f"


def header(dialect: str, limit: float = 7.0, alpha: float = 1.702) -> str:
    """The helper header for ``dialect``; the SwiGLU constants are baked in (one kernel per model)."""
    d = DIALECTS[dialect]
    consts = f"#define GX_LIMIT {_float_literal(limit)}\n#define GX_ALPHA {_float_literal(alpha)}\n"
    return d.header + consts + _COMMON_HELPERS


def body(dialect: str, name: str) -> str:
    """The kernel body for ``dialect``: the shared source with the dialect's id prologue."""
    return SPECS[name].body.replace("GX_PROLOGUE", DIALECTS[dialect].prologue)


# MLX's type names per dialect, for generated_source().
_TYPES = {
    "metal": {"float32": "float", "float16": "float16_t", "bfloat16": "bfloat16_t", "uint32": "uint32_t", "uint8": "uint8_t"},
    "cuda": {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16", "uint32": "uint32_t", "uint8": "uint8_t"},
}
# The thread-id attributes MLX knows and their types; it declares those the source names, in this
# (alphabetical) order, after the buffers.
_METAL_ATTRS = {
    "simdgroup_index_in_threadgroup": "uint",
    "thread_index_in_simdgroup": "uint",
    "thread_position_in_threadgroup": "uint3",
    "threadgroup_position_in_grid": "uint3",
}
# MLX passes an input with fewer elements than this in Metal's `constant` address space.
METAL_CONSTANT_BELOW = 8


def _targ(v: int | bool | str, types: dict[str, str]) -> str:
    # MLX writes bool template values as 1/0 when it instantiates a Metal kernel
    return types[v] if isinstance(v, str) else str(int(v)) if isinstance(v, bool) else str(v)


def generated_source(
    dialect: str, name: str, in_types: list[str], out_types: list[str], template: dict[str, int | str],
    limit: float = 7.0, alpha: float = 1.702, *, in_sizes: list[int] | None = None,
) -> str:  # fmt: skip
    """The whole translation unit MLX would build (signature included) for a compile check.

    ``in_types``/``out_types`` are MLX dtype names ("bfloat16", "uint32", ...); ``template`` maps
    template names to ints or dtype names; ``in_sizes`` are the inputs' element counts (Metal
    declares inputs under :data:`METAL_CONSTANT_BELOW` elements ``constant``; None: all large).
    Follows MLX 0.32's metal_kernel/cuda_kernel wrappers; tests check the Metal rendering against
    the source MLX itself generates (captured by :func:`mlx_gptoss.kernels.gpu.metal_launches`).
    """
    spec, types = SPECS[name], _TYPES[dialect]
    src = body(dialect, name)
    hdr = header(dialect, limit, alpha)
    if dialect == "cuda":
        params = [f"    const {types[t]}* {n}" for n, t in zip(spec.inputs, in_types)]
        params += [f"    {types[t]}* {n}" for n, t in zip(spec.outputs, out_types)]
        consts = "".join(
            f"  using {k} = {types[v]};\n"
            if isinstance(v, str)
            else f"  constexpr bool {k} = {str(v).lower()};\n"
            if isinstance(v, bool)
            else f"  constexpr int {k} = {v};\n"
            for k, v in template.items()
        )
        return (
            hdr + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n" + f"__global__ void custom_kernel_{name}(\n"
            + ",\n".join(params) + ") {\n" + consts + "\n" + src + "\n}\n\n} // namespace mlx::core::cu\n"
        )  # fmt: skip
    sizes = in_sizes if in_sizes is not None else [METAL_CONSTANT_BELOW] * len(spec.inputs)
    space = ["constant" if n < METAL_CONSTANT_BELOW else "device" for n in sizes]
    params = [f"  const {sp} {types[t]}* {n} [[buffer({i})]]" for i, (n, t, sp) in enumerate(zip(spec.inputs, in_types, space))]
    params += [
        f"  device {types[t]}* {n} [[buffer({len(spec.inputs) + i})]]" for i, (n, t) in enumerate(zip(spec.outputs, out_types))
    ]
    params += [f"  {ty} {a} [[{a}]]" for a, ty in _METAL_ATTRS.items() if a in src]
    # MLX names the instance after the template values and the argument types ("c": constant)
    fn = f"custom_kernel_{name}" + ("_" if template else "") + "".join(f"_{_targ(v, types)}" for v in template.values())
    fn += "".join(f"_{types[t]}" + ("c" if sp == "constant" else "") for t, sp in zip(in_types, space))
    fn += "".join(f"_{types[t]}" for t in out_types)
    targs = ", ".join(
        ("typename " if isinstance(v, str) else "bool " if isinstance(v, bool) else "int ") + k for k, v in template.items()
    )
    inst = ", ".join(_targ(v, types) for v in template.values())
    return (
        hdr + f"template <{targs}>\n[[kernel]] void {fn}(\n" + ",\n".join(params) + ") {\n" + src + "\n}\n\n"
        + f'template [[host_name("{fn}")]] [[kernel]] decltype({fn}<{inst}>) {fn}<{inst}>;\n'
    )  # fmt: skip
