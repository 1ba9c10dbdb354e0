"""The MoE kernels: twins against a naive per-token, per-expert reference; the one kernel source
compiled as CUDA (nvcc) and as Metal (C++ against tests/metal_sim.h), and the Metal rendering run
on the CPU in a thread simulator against the same reference; the dispatcher's choices."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_gptoss import kernels
from mlx_gptoss.kernels import gpu, ops, selfcheck
from mlx_gptoss.kernels import source as S
from mlx_gptoss.testing import dequantize_mxfp4

LIMIT, ALPHA = 7.0, 1.702
HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _fresh_selfcheck(tmp_path, monkeypatch):
    """Self-check verdicts live in a temporary cache and are forgotten after each test."""
    monkeypatch.setenv("MLX_GPTOSS_CACHE", str(tmp_path / "cache"))
    selfcheck.reset()
    yield
    selfcheck.reset()


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
        return np.stack(
            [np.concatenate([[3], rng.choice([e for e in range(E) if e != 3], K - 1, replace=False)]) for _ in range(N)]
        )
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
    monkeypatch.setattr(kernels.backends, "backend", lambda: "cuda")
    monkeypatch.setattr(selfcheck, "failed", lambda dialect: frozenset())
    monkeypatch.setattr(
        gpu, "mxfp4_gate_up_swiglu", lambda *a, dialect, **k: calls.append("gate_up") or ops.mxfp4_gate_up_swiglu(*a, **k)
    )
    monkeypatch.setattr(
        gpu, "mxfp4_down_combine", lambda *a, dialect, **k: calls.append("down") or ops.mxfp4_down_combine(*a, **k)
    )
    rng = np.random.default_rng(5)
    E, K, H, I = 8, 4, 64, 64
    (gw, gs, gb), gdense, gbias = make_experts(rng, E, 2 * I, H)
    (dw, ds, db), ddense, dbias = make_experts(rng, E, H, I)
    for N, expected in [(kernels.DECODE_MAX_TOKENS, ["gate_up", "down"]), (kernels.DECODE_MAX_TOKENS + 1, [])]:
        calls.clear()
        x = rng.normal(0, 1, (N, H)).astype(np.float32)
        ids = choose(rng, "random", N, E, K)
        w = rng.dirichlet(np.ones(K), N).astype(np.float32)
        y = kernels.moe_mxfp4_swiglu(
            mx.array(x), mx.array(ids.astype(np.uint32)), mx.array(w), gw, gs, gb, dw, ds, db, limit=LIMIT, alpha=ALPHA
        )
        ref = ref_down(ref_gate_up(x.astype(np.float64), ids, gdense, gbias), ids, w.astype(np.float64), ddense, dbias)
        assert calls == expected
        assert rel_err(y, ref) < 1e-5


def test_env_var_forces_twin():
    code = "import mlx.core as mx; from mlx_gptoss import kernels; mx.set_default_device(mx.cpu); print(kernels.mode())"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "MLX_GPTOSS_KERNELS": "twin"}, capture_output=True, text=True
    )
    assert out.stdout.strip() == "twin", out.stderr
    bad = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "MLX_GPTOSS_KERNELS": "nope"}, capture_output=True, text=True
    )
    assert bad.returncode != 0 and "MLX_GPTOSS_KERNELS" in bad.stderr


# --- the self-check in front of the GPU kernels ---------------------------------------------

F32 = mx.float32


def fake_gpu(monkeypatch, *, route=None, gate_up=None, down=None, calls=None):
    """A "metal" backend whose kernels are the twins computing in float32 as the kernels do,
    unless replaced (a broken kernel); calls records the launches."""
    calls = [] if calls is None else calls

    def good_route(logits, k, *, dialect):
        calls.append("route")
        ids, w = ops.route_topk_softmax(logits.astype(F32), k)
        return ids, w.astype(logits.dtype)

    def good_route_matvec(x, w, b, k, *, dialect, warps=None):
        calls.append("route_matvec")
        return ops.route_matvec_topk(x, w, b, k)

    def good_gate_up(x, ids, w, s, b, *, limit, alpha, dialect, launch=None):
        calls.append("gate_up")
        return ops.mxfp4_gate_up_swiglu(x.astype(F32), ids, w, s, b.astype(F32), limit=limit, alpha=alpha)

    def good_down(act, ids, wts, w, s, b, residual=None, *, out_dtype, dialect, launch=None):
        calls.append("down")
        r = None if residual is None else residual.astype(F32)
        return ops.mxfp4_down_combine(act, ids, wts.astype(F32), w, s, b.astype(F32), r, out_dtype=out_dtype)

    monkeypatch.setattr(kernels.backends, "backend", lambda: "metal")
    monkeypatch.setattr(gpu, "route_topk_softmax", route or good_route)
    monkeypatch.setattr(gpu, "route_matvec_topk", good_route_matvec)
    monkeypatch.setattr(gpu, "mxfp4_gate_up_swiglu", gate_up or good_gate_up)
    monkeypatch.setattr(gpu, "mxfp4_down_combine", down or good_down)
    return calls


def moe_call(N=1, seed=3):
    rng = np.random.default_rng(seed)
    E, K, H, I = 8, 4, 64, 64
    (gw, gs, gb), gdense, gbias = make_experts(rng, E, 2 * I, H)
    (dw, ds, db), ddense, dbias = make_experts(rng, E, H, I)
    x = rng.normal(0, 1, (N, H)).astype(np.float32)
    ids = choose(rng, "random", N, E, K)
    w = rng.dirichlet(np.ones(K), N).astype(np.float32)
    ref = ref_down(ref_gate_up(x.astype(np.float64), ids, gdense, gbias), ids, w.astype(np.float64), ddense, dbias)
    args = (mx.array(x), mx.array(ids.astype(np.uint32)), mx.array(w), gw, gs, gb, dw, ds, db)
    return (lambda: kernels.moe_mxfp4_swiglu(*args, limit=LIMIT, alpha=ALPHA)), ref


def test_selfcheck_passing_kernels_are_used_and_the_verdict_cached(monkeypatch, recwarn):
    calls = fake_gpu(monkeypatch)
    run, ref = moe_call()
    assert rel_err(run(), ref) < 1e-5
    assert calls[-2:] == ["gate_up", "down"]  # after the self-check's own launches, the MoE's
    assert not [w for w in recwarn if "self-check" in str(w.message)]
    cache = json.loads((Path(os.environ["MLX_GPTOSS_CACHE"]) / selfcheck.CACHE_NAME).read_text())
    (entry,) = cache.values()
    assert {k: v["ok"] for k, v in entry["checks"].items()} == {name: True for name in S.SPECS}
    # a new process (here: forgotten verdicts) reads the cache instead of checking again
    selfcheck.reset()
    monkeypatch.setattr(selfcheck, "run_checks", lambda d: pytest.fail("checked again despite the cache"))
    calls.clear()
    assert rel_err(run(), ref) < 1e-5 and calls == ["gate_up", "down"]


def test_selfcheck_costs_nothing_after_the_first_call(monkeypatch):
    """The dispatcher asks on every MoE call: after the first, no check, hash or device query."""
    fake_gpu(monkeypatch)
    assert selfcheck.failed("metal") == frozenset()
    monkeypatch.setattr(selfcheck, "_key", lambda d: pytest.fail("recomputed the cache key"))
    t = time.perf_counter()
    for _ in range(1000):
        selfcheck.failed("metal")
    assert time.perf_counter() - t < 0.05


def test_doctor_kernels_report_on_a_gpu_backend(monkeypatch):
    """What a Mac or CUDA user pastes: each kernel's verdict, the cached one, kernel timings."""
    fake_gpu(monkeypatch)
    selfcheck.failed("metal")  # the dispatcher's first use writes the cache
    text = selfcheck.report(bench=False)
    for name in S.SPECS:
        assert f"  {name}: ok: max " in text, text
    assert "all kernels in use" in text and "MoE ops run on: metal" in text
    (row,) = selfcheck.benchmark("metal", tokens=(1,), H=64, I=64)
    assert "twins" in row and "kernels" in row and "failed" not in row


def test_selfcheck_mismatch_falls_back_to_twins_with_one_warning(monkeypatch):
    calls = fake_gpu(monkeypatch)
    good = gpu.mxfp4_gate_up_swiglu
    # a plausible bug: right shape and dtype, values 1 % off
    monkeypatch.setattr(gpu, "mxfp4_gate_up_swiglu", lambda *a, **k: good(*a, **k) * 1.01)
    run, ref = moe_call()
    with pytest.warns(RuntimeWarning, match=S.GATE_UP) as rec:
        y = run()
        run()
        kernels.route_topk_softmax(mx.zeros((2, 8)), 4)
    assert len([w for w in rec if "self-check" in str(w.message)]) == 1
    msg = str(rec[0].message)
    assert "doctor --kernels" in msg and S.ROUTE not in msg and "max relative difference" in msg
    assert rel_err(y, ref) < 1e-5  # the twins' result
    n = len(calls)
    run()
    assert calls[n:] == []  # neither expert kernel runs any more (they work as a pair)
    kernels.route_topk_softmax(mx.zeros((2, 8)), 4)
    assert calls[n:] == ["route"]  # the routing kernel passed and stays in use


def test_selfcheck_compile_error_falls_back(monkeypatch):
    def no_compile(*a, **k):
        raise RuntimeError(
            "[metal::Device] Unable to build metal library from source\nerror: use of undeclared identifier 'gx_x'"
        )

    fake_gpu(monkeypatch, route=no_compile)
    logits = mx.array(np.random.default_rng(0).normal(0, 1, (3, 8)).astype(np.float32))
    with pytest.warns(RuntimeWarning, match=f"{S.ROUTE}.*Unable to build metal library"):
        ids, w = kernels.route_topk_softmax(logits, 4)
    ids_t, w_t = ops.route_topk_softmax(logits, 4)
    assert mx.array_equal(ids, ids_t) and mx.allclose(w, w_t)


def test_selfcheck_of_the_real_metal_launchers_on_this_machine(monkeypatch):
    """Without a Metal device every real launch fails: all three kernels are reported, in one
    warning, and the dispatcher still answers correctly through the twins."""
    if mx.metal.is_available():
        pytest.skip("a Metal device: the launches would run")
    monkeypatch.setattr(kernels.backends, "backend", lambda: "metal")
    run, ref = moe_call(N=2)
    with pytest.warns(RuntimeWarning) as rec:
        y = run()
    (w,) = [w for w in rec if "self-check" in str(w.message)]
    assert all(n in str(w.message) for n in S.SPECS)
    assert rel_err(y, ref) < 1e-5


def test_doctor_kernels_says_why_kernels_are_not_used_here(tmp_path):
    env = {**os.environ, "MLX_GPTOSS_CACHE": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-m", "mlx_gptoss.cli", "doctor", "--kernels"], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert f"mlx {mx.__version__}" in r.stdout
    assert "custom kernels: not used here: MLX's default device is the CPU" in r.stdout
    assert "micro-benchmark" in r.stdout and "T=1: twins" in r.stdout
    r = subprocess.run([sys.executable, "-m", "mlx_gptoss.cli", "doctor", "--kernels"], capture_output=True, text=True, timeout=300,
                       env={**env, "MLX_GPTOSS_KERNELS": "twin"})  # fmt: skip
    assert "MLX_GPTOSS_KERNELS=twin" in r.stdout, r.stderr


# --- the kernel source, as MLX wraps it -----------------------------------------------------


def slow(fn):
    """The slow lane: marked ``slow`` and skipped unless MLX_GPTOSS_SLOW=1."""
    return pytest.mark.slow(
        pytest.mark.skipif(os.environ.get("MLX_GPTOSS_SLOW") != "1", reason="slow lane: set MLX_GPTOSS_SLOW=1")(fn)
    )


needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
_NP = {"float32": np.float32, "uint32": np.uint32, "uint8": np.uint8}
_MX = {"float32": mx.float32, "uint32": mx.uint32, "uint8": mx.uint8, "bfloat16": mx.bfloat16}
_ELT = {"float32": "float", "uint32": "uint32_t", "uint8": "uint8_t", "bfloat16": "bfloat16_t"}


def launchers(name, **kw):
    """The dispatcher's launcher for kernel ``name`` as a function of its input arrays only."""
    if name == S.ROUTE:
        return lambda logits: gpu.route_topk_softmax(logits, kw["k"], dialect=kw.get("dialect", "metal"))
    if name == S.ROUTE_MATVEC:
        return lambda x, w, b: gpu.route_matvec_topk(x, w, b, kw["k"], dialect=kw.get("dialect", "metal"), warps=kw.get("warps"))
    if name == S.GATE_UP:
        return lambda *a: gpu.mxfp4_gate_up_swiglu(
            *a, limit=LIMIT, alpha=ALPHA, dialect=kw.get("dialect", "metal"), launch=kw.get("launch")
        )
    return lambda *a: gpu.mxfp4_down_combine(*a[:6], a[6] if kw.get("has_res") else None, out_dtype=kw["out_dtype"],
                                             dialect=kw.get("dialect", "metal"), launch=kw.get("launch"))  # fmt: skip


def capture(name, arrays, **kw):
    """MLX's own Metal launch (source, grid, threadgroup) of gpu.py's call on these inputs."""
    xs = [mx.array(np.asarray(a, np.float32 if t == "bfloat16" else _NP[t])).astype(_MX[t]) for a, t in arrays]
    if name == S.DOWN and not kw.get("has_res"):
        xs = xs[:6]
    (launch,) = gpu.metal_launches(launchers(name, **kw), *xs)
    return launch


def real_inputs(name, N, E=2, K=4, H=2880, I=2880):
    """Zero inputs at gpt-oss-20b sizes (fewer experts: the launch does not depend on E)."""
    z = np.zeros
    if name == S.ROUTE:
        return [(z((N, 32)), "bfloat16")]
    if name == S.ROUTE_MATVEC:
        return [(z((N, H)), "bfloat16"), (z((32, H)), "bfloat16"), (z((32,)), "bfloat16")]
    if name == S.GATE_UP:
        return [(z((N, H)), "bfloat16"), (z((N, K)), "uint32"), (z((E, 2 * I, H // 8)), "uint32"), (z((E, 2 * I, H // 32)), "uint8"),
                (z((E, 2 * I)), "bfloat16")]  # fmt: skip
    return [(z((N, K, I)), "float32"), (z((N, K)), "uint32"), (z((N, K)), "bfloat16"), (z((E, H, I // 8)), "uint32"),
            (z((E, H, I // 32)), "uint8"), (z((E, H)), "bfloat16"), (z((N, H)), "bfloat16")]  # fmt: skip


REAL_KW = {S.ROUTE: {"k": 4}, S.ROUTE_MATVEC: {"k": 4}, S.GATE_UP: {}, S.DOWN: {"has_res": True, "out_dtype": mx.bfloat16}}
REAL_TEMPLATE = {  # gpt-oss-20b sizes, the template gpu.py passes (for the CUDA rendering, which MLX only builds on CUDA)
    S.ROUTE: (["bfloat16"], ["uint32", "bfloat16"], {"E": 32, "K": 4, "OutT": "bfloat16"}),
    S.ROUTE_MATVEC: (
        ["bfloat16"] * 3,
        ["uint32", "bfloat16"],
        {"E": 32, "K": 4, "H": 2880, "WARPS": gpu.ROUTE_MATVEC_WARPS, "OutT": "bfloat16"},
    ),
    S.GATE_UP: (["bfloat16", "uint32", "uint32", "uint8", "bfloat16"], ["float32"], {"H": 2880, "I": 2880, "K": 4}),
    S.DOWN: (
        ["float32", "uint32", "bfloat16", "uint32", "uint8", "bfloat16", "bfloat16"],
        ["bfloat16"],
        {"H": 2880, "I": 2880, "K": 4},
    ),
}


def cuda_template(name, launch):
    ins, outs, tmpl = REAL_TEMPLATE[name]
    if name in (S.ROUTE, S.ROUTE_MATVEC):
        return ins, outs, tmpl
    tmpl = {**tmpl, "JW": launch[1], "WARPS": launch[0]}
    return ins, outs, tmpl if name == S.GATE_UP else {**tmpl, "HAS_RES": True, "OutT": "bfloat16"}


@pytest.mark.parametrize("N", [1, 3], ids=["one token: constant", "three tokens: device"])
@pytest.mark.parametrize("name", list(REAL_KW))
def test_generated_source_is_mlx_source(name, N):
    """generated_source() reproduces MLX's Metal wrapper byte for byte, including the `constant`
    pointers of inputs under 8 elements (indices, weights at one token) and the attribute order."""
    arrays = real_inputs(name, N, H=64, I=64)
    launch = capture(name, arrays, **REAL_KW[name])
    tmpl = re.search(r"decltype\(\w+<(.*)>\)", launch.source).group(1).split(", ")
    names = (
        list(REAL_TEMPLATE[name][2])
        + (["JW", "WARPS"] if name in (S.GATE_UP, S.DOWN) else [])
        + (["HAS_RES", "OutT"] if name == S.DOWN else [])
    )
    values = {k: ("bfloat16" if v == "bfloat16_t" else int(v)) for k, v in zip(names, tmpl)}
    if name == S.DOWN:
        values["HAS_RES"] = bool(values["HAS_RES"])
    out_types = {
        S.ROUTE: ["uint32", "bfloat16"],
        S.ROUTE_MATVEC: ["uint32", "bfloat16"],
        S.GATE_UP: ["float32"],
        S.DOWN: ["bfloat16"],
    }[name]
    mine = S.generated_source("metal", name, [t for _, t in arrays], out_types, values, in_sizes=[a.size for a, _ in arrays])
    assert mine == launch.source
    small = [n for n, (a, _) in zip(S.SPECS[name].inputs, arrays) if a.size < S.METAL_CONSTANT_BELOW]
    for n in S.SPECS[name].inputs:
        assert ("const constant " in re.search(rf".*\* {n} \[\[", launch.source).group(0)) == (n in small)
    # a `constant` pointer cannot become a `device` one: the kernels cast only weights that way
    cast = set(re.findall(r"\(const GX_DEVICE_PTR \w+\*\)\((\w+)\)", launch.source))
    assert cast == ({"w"} if name in (S.GATE_UP, S.DOWN) else set()) and not cast & set(small)


@needs_gxx
def test_real_launches_are_whole_threadgroups_and_compile(tmp_path):
    """gpu.py's own launches at the 20b's sizes: whole threadgroups of whole SIMD groups (Metal
    runs partial threadgroups, the kernels assume none), at most 1024 threads, and MLX's source
    compiles against the shim (its static_asserts: H, I multiples of 32 for aligned uint4 loads,
    threadgroup memory <= 32 KB)."""
    compiled = set()
    for N in (1, 3, 32):  # one token: `constant` routing buffers; more: `device`
        for name in REAL_KW:
            launch = capture(name, real_inputs(name, N), **REAL_KW[name])
            assert all(g % t == 0 for g, t in zip(launch.grid, launch.threadgroup)), (name, N, launch[2:])
            assert launch.threadgroup[0] % 32 == 0 and np.prod(launch.threadgroup) <= 1024
            if launch.source not in compiled:  # the source does not depend on N beyond 1 vs many
                _gxx(tmp_path, "k", '#include "metal_sim.h"\n' + launch.source)
                compiled.add(launch.source)
    assert len(compiled) == len(REAL_KW) + 2  # gate_up and down change at one token; the routers' inputs never have < 8 elements


@needs_gxx
def test_threadgroup_memory_over_32kb_is_refused(tmp_path):
    ins, outs, tmpl = cuda_template(S.GATE_UP, (4, 2))
    src = S.generated_source("metal", S.GATE_UP, ins, outs, {**tmpl, "H": 8192})  # x of 8192 floats: 32 KB + 0
    _gxx(tmp_path, "ok", '#include "metal_sim.h"\n' + src)
    src = S.generated_source("metal", S.GATE_UP, ins, outs, {**tmpl, "H": 8224})
    err = _gxx(tmp_path, "big", '#include "metal_sim.h"\n' + src, expect_ok=False)
    assert "threadgroup memory over Metal's 32 KB" in err


def _ptxas(tmp_path, name, launch, *flags):
    ins, outs, tmpl = cuda_template(name, launch)
    # MLX's default header includes its device utils and cooperative_groups; these stand in.
    src = "#include <cstdint>\n#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n#include <cooperative_groups.h>\n"
    (tmp_path / "k.cu").write_text(src + S.generated_source("cuda", name, ins, outs, tmpl))
    # with a register cap ptxas warns "Too big maxrregcount value ... ignored" and applies it all the same
    werror = [] if flags else ["-Werror", "all-warnings"]
    r = subprocess.run(
        ["nvcc", "-arch=sm_90a", *werror, "-c", "k.cu", "-o", "k.o", "-Xptxas", "-v", *flags],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return r.stderr


@needs_nvcc
@pytest.mark.parametrize(
    "name,launch",
    [(S.ROUTE, None), (S.ROUTE_MATVEC, None)] + [(n, sh) for n in (S.GATE_UP, S.DOWN) for sh in [(4, 4), (4, 8), (8, 2), (8, 4)]],
)
def test_cuda_source_compiles_without_stack(name, launch, tmp_path):
    """nvcc compiles the CUDA rendering with no stack frame at all: local arrays (accumulators,
    the codes of a row, the activations of a group) stay in registers, spills or not."""
    out = _ptxas(tmp_path, name, launch)
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", out)
    assert frames and all(f == ("0", "0", "0") for f in frames), out


def test_launch_shapes_per_dialect():
    for dialect in ("metal", "cuda"):
        for k in ("gate_up", "down"):
            warps, jw = gpu.launch_shape(dialect, k)
            assert 1 <= warps <= 32 and jw >= 1


@needs_nvcc
@pytest.mark.parametrize("name,kernel", [(S.GATE_UP, "gate_up"), (S.DOWN, "down")])
def test_metal_launch_shapes_fit_64_registers(name, kernel, tmp_path):
    """The Metal defaults, compiled by nvcc capped at 64 registers (the proxy gpu.LAUNCH's comment
    argues from: Apple's compiler is not available here), need no stack and no spills."""
    out = _ptxas(tmp_path, name, gpu.launch_shape("metal", kernel), "-maxrregcount=64")
    assert re.search(r"with\s+64 of maxrregcount", out)  # the cap was applied
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores", out)
    assert frames and all(f == ("0", "0") for f in frames), out


def _gxx(tmp_path, name, code, run=False, expect_ok=True, flags=()):
    (tmp_path / f"{name}.cpp").write_text(code)
    cmd = ["g++", "-std=c++20", "-O1", "-Wall", "-Wno-attributes", "-Wno-unknown-pragmas", "-Wno-unused-variable", "-Werror",
           f"-I{HERE}", "-pthread", *flags, f"{name}.cpp"]  # fmt: skip
    r = subprocess.run(cmd + (["-o", name] if run else ["-fsyntax-only"]), cwd=tmp_path, capture_output=True, text=True)
    if expect_ok:
        assert r.returncode == 0, r.stderr[-4000:]
    else:
        assert r.returncode != 0, "compiled, but should not have"
    return r.stderr


def sim_program(launch, arrays, outs, offsets=None, grid=None):
    """A C++ program that runs MLX's Metal source of ``launch`` in the simulator on the inputs
    in0.bin.. and writes out0.bin..; ``offsets`` places input i that many elements into its buffer."""
    src = launch.source.replace("#define GX_SHARED threadgroup", "#define GX_SHARED static")  # group-shared in the simulator
    fn, inst = re.search(r"decltype\((\w+)<(.*)>\)", src).groups()
    attrs = re.findall(r"^\s+\w+ (\w+) \[\[(\w+)\]\]", src, re.M)
    lines = ['#include "metal_sim.h"', src, "int main() {"]
    args = []
    for i, (a, t) in enumerate(arrays):
        off = (offsets or {}).get(i, 0)
        lines.append(f'  auto in{i} = sim::read<{_ELT[t]}>("in{i}.bin", {a.size}, {off});')
        args.append(f"in{i}.data()")
    for i, (shape, t) in enumerate(outs):
        lines.append(f"  std::vector<{_ELT[t]}> out{i}({int(np.prod(shape))});")
        args.append(f"out{i}.data()")
    args += [f"SIM_ATTR_{a}" for name_, a in attrs if name_ == a]
    g, t = grid or launch.grid, launch.threadgroup
    lines.append(f"  sim::launch({g[0]}, {g[1]}, {g[2]}, {t[0]}, {t[1]}, {t[2]}, [&] {{ {fn}<{inst}>({', '.join(args)}); }});")
    lines += [f'  sim::write("out{i}.bin", out{i});' for i in range(len(outs))] + ["}"]
    return "\n".join(lines)


def run_metal_sim(tmp_path, name, arrays, outs, offsets=None, flags=(), env=None, grid=None, edit=None, **kw):
    """Capture MLX's Metal launch of gpu.py's call, compile it with the simulator and run it on
    ``arrays`` (list of (np array, mlx dtype name)); outs: (shape, dtype name) each. Returns the
    completed process and the outputs as float64 arrays."""
    launch = capture(name, arrays, **kw)
    if edit is not None:  # a deliberately broken kernel, to show a check can fail
        launch = launch._replace(source=edit(launch.source))
    if name == S.DOWN and not kw.get("has_res"):
        arrays = arrays[:6] + arrays[5:6]  # gpu.py passes the bias as the unread residual
    for i, (a, t) in enumerate(arrays):
        if t == "bfloat16":
            (np.asarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16).tofile(
                tmp_path / f"in{i}.bin"
            )  # exact: bf16 values
        else:
            np.ascontiguousarray(a, _NP[t]).tofile(tmp_path / f"in{i}.bin")
    _gxx(tmp_path, "sim", sim_program(launch, arrays, outs, offsets, grid), run=True, flags=flags)
    r = subprocess.run(["./sim"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        return r, None
    res = []
    for i, (shape, t) in enumerate(outs):
        raw = np.fromfile(tmp_path / f"out{i}.bin", np.uint16 if t == "bfloat16" else _NP[t])
        if t == "bfloat16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        res.append(raw.reshape(shape).astype(np.float64))
    return r, res


def bf16(a):
    return np.array(mx.array(a).astype(mx.bfloat16).astype(mx.float32))


def moe_case(N, E, K, H, I, how, x_scale=1.0):
    rng = np.random.default_rng(H + I + N)
    (gw, gs, gb), gdense, _ = make_experts(rng, E, 2 * I, H)
    (dw, ds, db), ddense, _ = make_experts(rng, E, H, I)
    gbias, dbias = bf16(np.array(gb)), bf16(np.array(db))
    x = bf16(x_scale * rng.normal(0, 1, (N, H)))
    ids = choose(rng, how, N, E, K).astype(np.uint32)
    w = bf16(rng.dirichlet(np.ones(K), N))
    resid = bf16(rng.normal(0, 1, (N, H)))
    gate_up_in = [(x, "bfloat16"), (ids, "uint32"), (np.array(gw), "uint32"), (np.array(gs), "uint8"), (gbias, "bfloat16")]
    act_ref = ref_gate_up(x.astype(np.float64), ids, gdense, gbias.astype(np.float64))
    down_ref = ref_down(act_ref, ids, w.astype(np.float64), ddense, dbias.astype(np.float64))
    down_in = lambda act: [(act.astype(np.float32), "float32"), (ids, "uint32"), (w, "bfloat16"), (np.array(dw), "uint32"),  # noqa: E731
                           (np.array(ds), "uint8"), (dbias, "bfloat16"), (resid, "bfloat16")]  # fmt: skip
    return gate_up_in, act_ref, down_in, down_ref, resid


@needs_gxx
@pytest.mark.parametrize(
    "N,E,K,H,I,launch,how,x_scale",
    [
        (
            1,
            8,
            4,
            64,
            96,
            (2, 4),
            "random",
            1.0,
        ),  # one token (constant indices/weights); a partial tile (96 columns, 8 per group)
        (3, 8, 4, 1280, 64, (1, 2), "random", 1.0),  # three tokens; 40 groups per row: lanes loop twice
        (4, 8, 4, 64, 64, (2, 1), "all", 1.0),  # every expert chosen
        (2, 8, 4, 64, 64, (1, 4), "same", 1.0),  # one expert chosen by both
        (2, 8, 4, 64, 64, (2, 2), "random", 60.0),  # gates far past the clamps, both signs
        (1, 4, 4, 64, 64, None, "random", 1.0),  # the Metal default launch shapes
    ],
)
def test_metal_kernels_run_in_simulator(N, E, K, H, I, launch, how, x_scale, tmp_path):
    """MLX's generated Metal source, launched with gpu.py's own grid and threadgroup, in the
    simulator against float64 numpy."""
    gate_up_in, act_ref, down_in, down_ref, resid = moe_case(N, E, K, H, I, how, x_scale)
    r, res = run_metal_sim(tmp_path, S.GATE_UP, gate_up_in, [((N, K, I), "float32")], launch=launch)
    assert res is not None, r.stderr
    act = res[0]
    assert rel_err(act, act_ref) < 1e-5
    has_res = how == "random"  # the residual add fused into the down kernel, or not
    r, res = run_metal_sim(
        tmp_path, S.DOWN, down_in(act), [((N, H), "float32")], launch=launch, has_res=has_res, out_dtype=mx.float32
    )
    assert res is not None, r.stderr
    assert rel_err(res[0], down_ref + (resid if has_res else 0)) < 1e-5


@needs_gxx
@pytest.mark.parametrize("E", [32, 128])
def test_metal_route_runs_in_simulator(E, tmp_path):
    rng = np.random.default_rng(E)
    N, K = 5, 4
    logits = bf16(rng.normal(0, 2, (N, E)))
    logits[2, :] = logits[2, 0]  # all equal: ties go to the lowest ids
    r, res = run_metal_sim(tmp_path, S.ROUTE, [(logits, "bfloat16")], [((N, K), "uint32"), ((N, K), "bfloat16")], k=K)
    assert res is not None, r.stderr
    ids, w = res
    rid, rw = ref_route(logits.astype(np.float64), K)
    assert (ids == rid).all()
    assert np.abs(w - rw).max() < 1e-2  # bf16 weights


@needs_gxx
def test_simulator_catches_misaligned_uint4_loads(tmp_path):
    """The codes read as uint4 must start 16-byte aligned: the same launch with the codes buffer
    4 bytes off fails under -fsanitize=alignment (and runs with it aligned)."""
    gate_up_in, act_ref, *_ = moe_case(1, 4, 4, 64, 64, "random")
    flags = ("-fsanitize=alignment", "-fno-sanitize-recover=alignment")
    r, res = run_metal_sim(tmp_path, S.GATE_UP, gate_up_in, [((1, 4, 64), "float32")], flags=flags)
    assert res is not None and rel_err(res[0], act_ref) < 1e-5, r.stderr
    r, res = run_metal_sim(tmp_path, S.GATE_UP, gate_up_in, [((1, 4, 64), "float32")], offsets={2: 1}, flags=flags)
    assert res is None and "misaligned" in r.stderr and "uint4" in r.stderr, r.stderr


@needs_gxx
def test_simulator_refuses_partial_threadgroups(tmp_path):
    gate_up_in, *_ = moe_case(1, 4, 4, 64, 64, "random")
    launch = capture(S.GATE_UP, gate_up_in)
    bad = (launch.grid[0] - 32, launch.grid[1], launch.grid[2])
    r, res = run_metal_sim(tmp_path, S.GATE_UP, gate_up_in, [((1, 4, 64), "float32")], grid=bad)
    assert res is None and r.returncode == 3 and "not whole threadgroups" in r.stderr


_TOY = """
template <typename T>
[[kernel]] void toy(device float* y [[buffer(0)]], uint thread_index_in_simdgroup [[thread_index_in_simdgroup]]) {
  %s
}
int main() { std::vector<float> y(32); sim::launch(32, 1, 1, 32, 1, 1, [&] { toy<float>(y.data(), sim::ids.lane); }); }
"""


@needs_gxx
@pytest.mark.parametrize(
    "body,message",
    [
        ("y[0] = simd_sum(1.0);", "simd_sum: the kernels sum floats"),
        ("y[0] = fma(1.0f, 2.0, 3.0f);", "fma: the kernels' fma is float x float + float"),
        ("y[0] = min(1.0f, 2);", "min: the kernels' min is on two floats"),
        ("y[0] = metal::exp(1.0);", "metal::exp: the kernels' exp is on a float"),
        ("y[0] = simd_min(3);", "simd_min: the kernels take the min of 32-bit unsigned ints"),
        ("float4 v = float4(1.0f, 2.0f, 3.0f, 4.0); y[0] = v.w;", "float4(...): give floats"),
    ],
)
def test_simulator_rejects_wrong_types(body, message, tmp_path):
    """A double or an int where Metal's built-in takes a float (or a uint) is a compile error
    naming the call, not a silent conversion."""
    err = _gxx(tmp_path, "toy", '#include "metal_sim.h"\n' + _TOY % body, run=True, expect_ok=False)
    assert message in err


@needs_gxx
def test_divergent_simd_call_is_an_error_not_a_hang(tmp_path):
    _gxx(
        tmp_path,
        "toy",
        '#include "metal_sim.h"\n' + _TOY % "if (thread_index_in_simdgroup < 16) y[0] = simd_sum(1.0f);",
        run=True,
    )
    r = subprocess.run(
        ["./toy"], cwd=tmp_path, capture_output=True, text=True, timeout=60, env={**os.environ, "SIM_BARRIER_MS": "300"}
    )
    assert r.returncode == 4 and "only 16 of 32 threads reached a SIMD-group function" in r.stderr, r.stderr


@slow
@needs_gxx
def test_simulator_under_thread_sanitizer(tmp_path):
    """The kernels in the simulator under ThreadSanitizer: no data race between the threads of a
    group (shared x written before the barrier, read after; SIMD reductions)."""
    flags = ("-fsanitize=thread", "-g")
    N, K, H, I = 2, 4, 64, 64
    gate_up_in, act_ref, down_in, down_ref, resid = moe_case(N, 8, K, H, I, "random")
    env = {"SIM_BARRIER_MS": "600000", "TSAN_OPTIONS": "halt_on_error=1"}
    r, res = run_metal_sim(tmp_path, S.GATE_UP, gate_up_in, [((N, K, I), "float32")], launch=(2, 2), flags=flags, env=env)
    assert res is not None and "ThreadSanitizer" not in r.stderr, r.stderr[-4000:]
    r, res = run_metal_sim(
        tmp_path,
        S.DOWN,
        down_in(res[0]),
        [((N, H), "float32")],
        launch=(2, 2),
        has_res=True,
        out_dtype=mx.float32,
        flags=flags,
        env=env,
    )
    assert res is not None and "ThreadSanitizer" not in r.stderr, r.stderr[-4000:]
    assert rel_err(res[0], down_ref + resid) < 1e-5
    # without the barrier between filling shared x and reading it, ThreadSanitizer must object
    no_barrier = lambda src: src.replace("GX_BARRIER;", "", 1)  # noqa: E731
    r, res = run_metal_sim(
        tmp_path, S.GATE_UP, gate_up_in, [((N, K, I), "float32")], launch=(2, 2), flags=flags, env=env, edit=no_barrier
    )
    assert res is None and "data race" in r.stderr, r.stderr[-4000:]
    logits = bf16(np.random.default_rng(0).normal(0, 2, (3, 32)))
    r, res = run_metal_sim(
        tmp_path, S.ROUTE, [(logits, "bfloat16")], [((3, K), "uint32"), ((3, K), "bfloat16")], k=K, flags=flags, env=env
    )
    assert res is not None and "ThreadSanitizer" not in r.stderr, r.stderr[-4000:]


# --- the GPU session script and the launch-shape sweep ---------------------------------------

ROOT = HERE.parent


def test_gpu_run_script_needs_no_gnu_timeout(tmp_path):
    """Stock macOS has no `timeout`: the script's own run_for limits a command (exit 124, like GNU
    timeout) and passes a finished command's exit status through."""
    script = ROOT / "benchmarks" / "gpu_run.sh"
    assert not re.search(r"^\s*(env \S+ )?timeout ", script.read_text(), re.M)
    code = f'GX_SOURCE_ONLY=1; . "{script}"; run_for 1 sleep 30; echo "a=$?"; run_for 30 sh -c "exit 3"; echo "b=$?"'
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no coreutils `timeout` needed, none used
    t = time.perf_counter()
    r = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=60, env=bare)
    assert "a=124" in r.stdout and "b=3" in r.stdout, (r.stdout, r.stderr)
    assert time.perf_counter() - t < 20


def test_launch_sweep_covers_both_dialects_and_their_defaults():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_moe import SWEEP
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for dialect in ("metal", "cuda"):
        assert gpu.launch_shape(dialect, "gate_up") in SWEEP[dialect] and gpu.launch_shape(dialect, "down") in SWEEP[dialect]
        assert all(32 * w <= 1024 for w, _ in SWEEP[dialect])


# --- the router folded into the routing kernel (off by default: kernels.FUSED_ROUTER) ---------


def ref_route_matvec(x, w, b, k):
    return ref_route(x.astype(np.float64) @ w.astype(np.float64).T + b.astype(np.float64), k)


def test_route_matvec_twin_matches_reference():
    rng = np.random.default_rng(2)
    x, w, b = bf16(rng.normal(0, 1, (9, 64))), bf16(rng.normal(0, 1, (32, 64))), bf16(rng.normal(0, 1, (32,)))
    ids, wt = ops.route_matvec_topk(
        mx.array(x).astype(mx.bfloat16), mx.array(w).astype(mx.bfloat16), mx.array(b).astype(mx.bfloat16), 4
    )
    rid, rw = ref_route_matvec(x, w, b, 4)
    order = np.argsort(np.array(ids), 1)
    assert (np.sort(np.array(ids), 1) == np.sort(rid, 1)).all()
    got = np.take_along_axis(np.array(wt.astype(mx.float32)), order, 1)
    assert np.abs(got - np.take_along_axis(rw, np.argsort(rid, 1), 1)).max() < 4e-3  # bf16 weights


def test_route_matvec_dispatch_is_off_until_enabled(monkeypatch):
    calls = fake_gpu(monkeypatch)
    rng = np.random.default_rng(4)
    x, w, b = (mx.array(rng.normal(0, 1, s).astype(np.float32)) for s in ((2, 64), (32, 64), (32,)))
    want = ops.route_matvec_topk(x, w, b, 4)
    got = kernels.route_matvec_topk(x, w, b, 4)
    assert "route_matvec" not in calls and mx.array_equal(got[0], want[0])
    monkeypatch.setattr(kernels, "FUSED_ROUTER", True)
    got = kernels.route_matvec_topk(x, w, b, 4)
    assert calls[-1] == "route_matvec" and mx.array_equal(got[0], want[0])


@needs_gxx
@pytest.mark.parametrize("N,E,H,warps", [(1, 32, 64, None), (3, 32, 2880, 3), (2, 128, 96, 8)])
def test_metal_route_matvec_runs_in_simulator(N, E, H, warps, tmp_path):
    """MLX's Metal source of the fused router, gpu.py's launch, in the simulator against float64."""
    rng = np.random.default_rng(E + H)
    x, w, b = bf16(rng.normal(0, 1, (N, H))), bf16(rng.normal(0, 1, (E, H))), bf16(rng.normal(0, 1, (E,)))
    r, res = run_metal_sim(tmp_path, S.ROUTE_MATVEC, [(x, "bfloat16"), (w, "bfloat16"), (b, "bfloat16")],
                           [((N, 4), "uint32"), ((N, 4), "bfloat16")], k=4, warps=warps)  # fmt: skip
    assert res is not None, r.stderr
    rid, rw = ref_route_matvec(x, w, b, 4)
    assert (res[0] == rid).all()
    assert np.abs(res[1] - rw).max() < 4e-3
