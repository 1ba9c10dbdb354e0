"""The MoE kernels: twins against a naive per-token, per-expert reference; the one kernel source
compiled as CUDA (nvcc) and as Metal (C++ against tests/metal_sim.h), and the Metal rendering run
on the CPU in a thread simulator against the same reference; the dispatcher's choices."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_gptoss import kernels
from mlx_gptoss.kernels import gpu, ops
from mlx_gptoss.kernels import source as S
from mlx_gptoss_convert.synthetic import dequantize_mxfp4

LIMIT, ALPHA = 7.0, 1.702
HERE = Path(__file__).parent


def make_experts(rng, E, d_out, d_in):
    """Random released-layout MXFP4 experts: codes [E, out, in/8] u32, scales u8, bias f32, and
    the dequantized float64 weights [E, out, in] for the reference."""
    blocks = rng.integers(0, 256, (E, d_out, d_in // 32, 16), dtype=np.uint8)
    scales = rng.integers(119, 128, (E, d_out, d_in // 32), dtype=np.uint8)
    bias = rng.normal(0, 0.5, (E, d_out)).astype(np.float32)
    dense = dequantize_mxfp4(blocks, scales).astype(np.float64)
    w = blocks.reshape(E, d_out, -1).view(np.uint32)
    return (mx.array(w), mx.array(scales), mx.array(bias)), dense, bias.astype(np.float64)


def ref_route(logits, k):
    ids = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    top = np.take_along_axis(logits, ids, axis=-1)
    w = np.exp(top - top[:, :1])
    return ids, w / w.sum(-1, keepdims=True)


def ref_swiglu(h):
    gate, up = np.minimum(h[..., ::2], LIMIT), np.clip(h[..., 1::2], -LIMIT, LIMIT)
    with np.errstate(over="ignore"):  # exp -> inf for very negative gates: the product is -0, as it should be
        return (up + 1) * gate / (1 + np.exp(-ALPHA * gate))


def ref_gate_up(x, ids, dense, bias):
    N, K = ids.shape
    out = np.zeros((N, K, dense.shape[1] // 2))
    for n in range(N):
        for k in range(K):
            e = ids[n, k]
            out[n, k] = ref_swiglu(dense[e] @ x[n] + bias[e])
    return out


def ref_down(act, ids, weights, dense, bias):
    N, K = ids.shape
    y = np.zeros((N, dense.shape[1]))
    for n in range(N):
        for k in range(K):
            e = ids[n, k]
            y[n] += weights[n, k] * (dense[e] @ act[n, k] + bias[e])
    return y


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / (np.abs(b).max() + 1e-30))


# (name, N, E, K, H, I, how the experts are chosen)
CASES = [
    ("one token", 1, 8, 4, 64, 96, "random"),
    ("three tokens", 3, 8, 4, 96, 64, "random"),
    ("many tokens, sorted path", 40, 8, 4, 64, 64, "random"),
    ("every expert chosen", 8, 8, 4, 64, 64, "all"),
    ("one expert chosen by all", 5, 8, 4, 64, 64, "same"),
]


def choose(rng, how, N, E, K):
    if how == "all":
        return np.stack([np.roll(np.arange(E), -n)[:K] for n in range(N)])
    if how == "same":
        return np.stack([np.concatenate([[3], rng.choice([e for e in range(E) if e != 3], K - 1, replace=False)]) for _ in range(N)])
    return np.stack([rng.choice(E, K, replace=False) for _ in range(N)])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_twins_match_naive_reference(case):
    _, N, E, K, H, I, how = case
    rng = np.random.default_rng(N)
    (gw, gs, gb), gdense, gbias = make_experts(rng, E, 2 * I, H)
    (dw, ds, db), ddense, dbias = make_experts(rng, E, H, I)
    x = rng.normal(0, 1, (N, H)).astype(np.float32)
    ids = choose(rng, how, N, E, K)
    w = rng.dirichlet(np.ones(K), N).astype(np.float32)
    act_ref = ref_gate_up(x.astype(np.float64), ids, gdense, gbias)
    y_ref = ref_down(act_ref, ids, w.astype(np.float64), ddense, dbias)

    xi, ii, wi = mx.array(x), mx.array(ids.astype(np.uint32)), mx.array(w)
    act = ops.mxfp4_gate_up_swiglu(xi, ii, gw, gs, gb, limit=LIMIT, alpha=ALPHA)
    assert act.shape == (N, K, I) and act.dtype == mx.float32
    assert rel_err(act, act_ref) < 1e-5
    y = ops.mxfp4_down_combine(act, ii, wi, dw, ds, db, out_dtype=mx.float32)
    assert rel_err(y, y_ref) < 1e-5
    resid = rng.normal(0, 1, (N, H)).astype(np.float32)
    y = ops.mxfp4_down_combine(act, ii, wi, dw, ds, db, mx.array(resid), out_dtype=mx.float32)
    assert rel_err(y, y_ref + resid) < 1e-5
    # the whole MoE (sorted gather_qmm from ops.SORT_THRESHOLD pairs on) and the dispatcher
    full = ops.moe_mxfp4_swiglu(xi, ii, wi, gw, gs, gb, dw, ds, db, limit=LIMIT, alpha=ALPHA)
    assert rel_err(full, y_ref) < 1e-5
    via = kernels.moe_mxfp4_swiglu(xi, ii, wi, gw, gs, gb, dw, ds, db, limit=LIMIT, alpha=ALPHA)
    assert rel_err(via, y_ref) < 1e-5
    via = kernels.moe_mxfp4_swiglu(xi, ii, wi, gw, gs, gb, dw, ds, db, limit=LIMIT, alpha=ALPHA, residual=mx.array(resid))
    assert rel_err(via, y_ref + resid) < 1e-5


def test_route_twin_matches_reference():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (37, 32)).astype(np.float32)
    ids, w = ops.route_topk_softmax(mx.array(logits), 4)
    rid, rw = ref_route(logits, 4)
    # the twin's order within the top k is unspecified: compare as (id -> weight) maps
    for n in range(37):
        got = dict(zip(np.array(ids[n]).tolist(), np.array(w[n]).tolist()))
        want = dict(zip(rid[n].tolist(), rw[n].tolist()))
        assert got.keys() == want.keys()
        assert all(abs(got[e] - want[e]) < 1e-6 for e in want)


def test_dispatcher_modes(monkeypatch):
    assert kernels.backend() == "twin"  # CPU
    kernels.set_mode("twin")
    assert kernels.backend() == "twin"
    kernels.set_mode("auto")
    with pytest.raises(ValueError, match="mode"):
        kernels.set_mode("fast")


def test_dispatcher_routes_by_token_count(monkeypatch):
    """With a GPU backend the decode kernels take N <= DECODE_MAX_TOKENS and sorted gather_qmm the
    rest. The GPU kernels are replaced by their twins here (same signatures), so the result must
    still match the reference on both sides of the threshold."""
    calls = []
    monkeypatch.setattr(kernels, "backend", lambda: "cuda")
    monkeypatch.setattr(gpu, "mxfp4_gate_up_swiglu", lambda *a, dialect, **k: calls.append("gate_up") or ops.mxfp4_gate_up_swiglu(*a, **k))
    monkeypatch.setattr(gpu, "mxfp4_down_combine", lambda *a, dialect, **k: calls.append("down") or ops.mxfp4_down_combine(*a, **k))
    rng = np.random.default_rng(5)
    E, K, H, I = 8, 4, 64, 64
    (gw, gs, gb), gdense, gbias = make_experts(rng, E, 2 * I, H)
    (dw, ds, db), ddense, dbias = make_experts(rng, E, H, I)
    for N, expected in [(kernels.DECODE_MAX_TOKENS, ["gate_up", "down"]), (kernels.DECODE_MAX_TOKENS + 1, [])]:
        calls.clear()
        x = rng.normal(0, 1, (N, H)).astype(np.float32)
        ids = choose(rng, "random", N, E, K)
        w = rng.dirichlet(np.ones(K), N).astype(np.float32)
        y = kernels.moe_mxfp4_swiglu(mx.array(x), mx.array(ids.astype(np.uint32)), mx.array(w), gw, gs, gb, dw, ds, db, limit=LIMIT, alpha=ALPHA)
        ref = ref_down(ref_gate_up(x.astype(np.float64), ids, gdense, gbias), ids, w.astype(np.float64), ddense, dbias)
        assert calls == expected
        assert rel_err(y, ref) < 1e-5


def test_env_var_forces_twin():
    code = "import mlx.core as mx; from mlx_gptoss import kernels; mx.set_default_device(mx.cpu); print(kernels._mode)"
    import os
    import sys

    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MLX_GPTOSS_KERNELS": "twin"}, capture_output=True, text=True)
    assert out.stdout.strip() == "twin", out.stderr
    bad = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MLX_GPTOSS_KERNELS": "nope"}, capture_output=True, text=True)
    assert bad.returncode != 0 and "MLX_GPTOSS_KERNELS" in bad.stderr


# --- the kernel source, as MLX will wrap it -------------------------------------------------

REAL = {  # gpt-oss-20b sizes and the launch shapes the dispatcher uses
    S.ROUTE: (["bfloat16"], ["uint32", "bfloat16"], {"E": 32, "K": 4, "OutT": "bfloat16"}),
    S.GATE_UP: (["bfloat16", "uint32", "uint32", "uint8", "bfloat16"], ["float32"], {"H": 2880, "I": 2880, "K": 4, "JW": gpu.GATE_UP_LAUNCH[1], "WARPS": gpu.GATE_UP_LAUNCH[0]}),
    S.DOWN: (["float32", "uint32", "bfloat16", "uint32", "uint8", "bfloat16", "bfloat16"], ["bfloat16"],
             {"H": 2880, "I": 2880, "K": 4, "JW": gpu.DOWN_LAUNCH[1], "WARPS": gpu.DOWN_LAUNCH[0], "HAS_RES": True, "OutT": "bfloat16"}),
}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("name", list(REAL))
def test_cuda_source_compiles(name, tmp_path):
    ins, outs, tmpl = REAL[name]
    # MLX's default header includes its device utils and cooperative_groups; these stand in.
    src = "#include <cstdint>\n#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n#include <cooperative_groups.h>\n"
    (tmp_path / "k.cu").write_text(src + S.generated_source("cuda", name, ins, outs, tmpl))
    r = subprocess.run(["nvcc", "-arch=sm_90a", "-Werror", "all-warnings", "-c", "k.cu", "-o", "k.o", "-Xptxas", "-v"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "0 bytes spill stores" in r.stderr, r.stderr  # register spills would cost bandwidth


def _gxx(tmp_path, name, code, run=False):
    (tmp_path / f"{name}.cpp").write_text(code)
    cmd = ["g++", "-std=c++20", "-O1", "-Wall", "-Wno-attributes", "-Wno-unused-variable", "-Werror", f"-I{HERE}", "-pthread", f"{name}.cpp"]
    r = subprocess.run(cmd + (["-o", name] if run else ["-fsyntax-only"]), cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")


@needs_gxx
@pytest.mark.parametrize("name", list(REAL))
def test_metal_source_compiles_against_shim(name, tmp_path):
    ins, outs, tmpl = REAL[name]
    _gxx(tmp_path, "k", '#include "metal_sim.h"\n' + S.generated_source("metal", name, ins, outs, tmpl))


_NP = {"float32": np.float32, "uint32": np.uint32, "uint8": np.uint8}
_ELT = {"float32": "float", "uint32": "uint32_t", "uint8": "uint8_t", "bfloat16": "bfloat16_t"}


def run_metal_sim(tmp_path, name, arrays, outs, tmpl, grid, tg):
    """Compile the Metal rendering with the simulator and run it; arrays: list of (np array,
    mlx dtype name); outs: list of (shape, dtype name). Returns the outputs as float64 arrays."""
    ins = [t for _, t in arrays]
    src = S.generated_source("metal", name, ins, [t for _, t in outs], tmpl)
    src = src.replace("#define GX_SHARED threadgroup", "#define GX_SHARED static")  # group-shared in the simulator
    lines = ['#include "metal_sim.h"', src, "int main() {"]
    args = []
    for i, (a, t) in enumerate(arrays):
        if t == "bfloat16":
            bits = (np.asarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)  # exact: inputs are bf16 values
            bits.tofile(tmp_path / f"in{i}.bin")
        else:
            np.ascontiguousarray(a, _NP[t]).tofile(tmp_path / f"in{i}.bin")
        lines.append(f'  auto in{i} = sim::read<{_ELT[t]}>("in{i}.bin", {a.size});')
        args.append(f"in{i}.data()")
    for i, (shape, t) in enumerate(outs):
        lines.append(f"  std::vector<{_ELT[t]}> out{i}({int(np.prod(shape))});")
        args.append(f"out{i}.data()")
    attrs = [a for a in S._METAL_ATTRS if a in S.body("metal", name)]
    args += [f"SIM_ATTR_{a}" for a in attrs]
    fn = f"custom_kernel_{name}"
    inst = ", ".join(_ELT[v] if isinstance(v, str) else str(int(v)) if isinstance(v, bool) else str(v) for v in tmpl.values())
    lines.append(f"  sim::launch({grid[0]}, {grid[1]}, {tg}, [&] {{ {fn}<{inst}>({', '.join(args)}); }});")
    lines += [f'  sim::write("out{i}.bin", out{i});' for i in range(len(outs))] + ["}"]
    _gxx(tmp_path, "sim", "\n".join(lines), run=True)
    r = subprocess.run(["./sim"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = []
    for i, (shape, t) in enumerate(outs):
        raw = np.fromfile(tmp_path / f"out{i}.bin", np.uint16 if t == "bfloat16" else _NP[t])
        if t == "bfloat16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        res.append(raw.reshape(shape).astype(np.float64))
    return res


def bf16(a):
    return np.array(mx.array(a).astype(mx.bfloat16).astype(mx.float32))


@needs_gxx
@pytest.mark.parametrize(
    "N,E,K,H,I,launch,how,x_scale",
    [
        (1, 8, 4, 64, 96, (2, 4), "random", 1.0),  # one token; a partial tile (96 columns, 8 per group)
        (3, 8, 4, 1280, 64, (1, 2), "random", 1.0),  # three tokens; 40 groups per row: lanes loop twice
        (4, 8, 4, 64, 64, (2, 1), "all", 1.0),  # every expert chosen
        (2, 8, 4, 64, 64, (1, 4), "same", 1.0),  # one expert chosen by both
        (2, 8, 4, 64, 64, (2, 2), "random", 60.0),  # gates far past the clamps, both signs
    ],
)
def test_metal_kernels_run_in_simulator(N, E, K, H, I, launch, how, x_scale, tmp_path):
    rng = np.random.default_rng(H + I + N)
    (gw, gs, gb), gdense, _ = make_experts(rng, E, 2 * I, H)
    (dw, ds, db), ddense, _ = make_experts(rng, E, H, I)
    gbias, dbias = bf16(np.array(gb)), bf16(np.array(db))
    x = bf16(x_scale * rng.normal(0, 1, (N, H)))
    ids = choose(rng, how, N, E, K).astype(np.uint32)
    warps, jw = launch
    tmpl = {"H": H, "I": I, "K": K, "JW": jw, "WARPS": warps}
    grid = ((I + warps * jw - 1) // (warps * jw), N * K)
    (act,) = run_metal_sim(
        tmp_path, S.GATE_UP,
        [(x, "bfloat16"), (ids, "uint32"), (np.array(gw), "uint32"), (np.array(gs), "uint8"), (gbias, "bfloat16")],
        [((N, K, I), "float32")], tmpl, grid, 32 * warps,
    )  # fmt: skip
    act_ref = ref_gate_up(x.astype(np.float64), ids, gdense, gbias.astype(np.float64))
    assert rel_err(act, act_ref) < 1e-5

    w = bf16(rng.dirichlet(np.ones(K), N))
    has_res = how == "random"  # the residual add fused into the down kernel, or not
    resid = bf16(rng.normal(0, 1, (N, H)))
    tmpl = {"H": H, "I": I, "K": K, "JW": jw, "WARPS": warps, "HAS_RES": has_res, "OutT": "float32"}
    grid = ((H + warps * jw - 1) // (warps * jw), N)
    (y,) = run_metal_sim(
        tmp_path, S.DOWN,
        [(act.astype(np.float32), "float32"), (ids, "uint32"), (w, "bfloat16"), (np.array(dw), "uint32"), (np.array(ds), "uint8"),
         (dbias, "bfloat16"), (resid if has_res else dbias, "bfloat16")],
        [((N, H), "float32")], tmpl, grid, 32 * warps,
    )  # fmt: skip
    y_ref = ref_down(act_ref, ids, w.astype(np.float64), ddense, dbias.astype(np.float64)) + (resid if has_res else 0)
    assert rel_err(y, y_ref) < 1e-5


@needs_gxx
@pytest.mark.parametrize("E", [32, 128])
def test_metal_route_runs_in_simulator(E, tmp_path):
    rng = np.random.default_rng(E)
    N, K = 5, 4
    logits = bf16(rng.normal(0, 2, (N, E)))
    logits[2, :] = logits[2, 0]  # all equal: ties go to the lowest ids
    ids, w = run_metal_sim(
        tmp_path, S.ROUTE, [(logits, "bfloat16")], [((N, K), "uint32"), ((N, K), "float32")],
        {"E": E, "K": K, "OutT": "float32"}, (N, 1), 32,
    )  # fmt: skip
    rid, rw = ref_route(logits.astype(np.float64), K)
    assert (ids == rid).all()
    assert np.abs(w - rw).max() < 1e-6
