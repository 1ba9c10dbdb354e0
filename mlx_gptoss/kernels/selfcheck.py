"""The custom GPU kernels check themselves before the dispatcher trusts them.

On first use in a process, each kernel of :mod:`.gpu` runs once on small inputs (one token, where
MLX passes the routing as ``constant`` pointers, and three, where it passes ``device`` ones) and is
compared with its twin of :mod:`.ops`. A kernel that fails to compile, raises or disagrees is
replaced by the twins, with one warning naming it. The verdict is cached per MLX version, device
and kernel source in ``<cache root>/kernel-selfcheck.json`` (see :func:`mlx_gptoss.paths.cache_root`),
so later processes skip the check. ``mlx-gptoss doctor --kernels`` runs it afresh (:func:`report`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..paths import cache_root
from . import backends, gpu, ops
from . import source as S

# float32 twins against kernels fed the same bf16 values: a correct kernel differs by summation
# order only (< 2e-5 measured on an H100); a wrong row, scale or expert is off by O(1). The routing
# weights come out in bf16 (half an ulp below 1 is 2e-3).
TOLERANCE = {S.ROUTE: 4e-3, S.ROUTE_MATVEC: 4e-3, S.GATE_UP: 1e-3, S.DOWN: 1e-3}
LIMIT, ALPHA = 7.0, 1.702
CACHE_NAME = "kernel-selfcheck.json"


@dataclass(frozen=True)
class Check:
    """One kernel's verdict: ``ok``, and the largest relative difference or the error."""

    kernel: str
    ok: bool
    detail: str


def device_name() -> str:
    """The default device as MLX describes it ("Apple M2 Pro", "NVIDIA H100 80GB HBM3", "cpu")."""
    try:
        info = mx.device_info()
        return str(info.get("device_name") or info.get("architecture") or mx.default_device())
    except (RuntimeError, ValueError, AttributeError):  # older MLX, or no GPU
        return str(mx.default_device())


def source_hash(dialect: str) -> str:
    """What the kernels compile from for ``dialect``: any edit to the source or launch shapes changes it."""
    text = S.header(dialect) + "".join(S.body(dialect, n) for n in S.SPECS) + repr(gpu.LAUNCH[dialect])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _inputs(rng: np.random.Generator, N: int, E: int = 8, K: int = 4, H: int = 64, I: int = 96):
    """Small random MXFP4 experts and activations (I = 96: the last tile of a column block is partial)."""

    def experts(d_out, d_in):
        w = mx.array(rng.integers(0, 2**32, (E, d_out, d_in // 8), dtype=np.uint32))
        s = mx.array(rng.integers(119, 127, (E, d_out, d_in // 32), dtype=np.uint8))
        return w, s, mx.array(rng.normal(0, 0.5, (E, d_out)).astype(np.float32)).astype(mx.bfloat16)

    x = mx.array(rng.normal(0, 1, (N, H)).astype(np.float32)).astype(mx.bfloat16)
    ids = mx.array(np.stack([rng.choice(E, K, replace=False) for _ in range(N)]).astype(np.uint32))
    w = mx.array(rng.dirichlet(np.ones(K), N).astype(np.float32)).astype(mx.bfloat16)
    return x, ids, w, experts(2 * I, H), experts(H, I)


def _rel(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a.astype(mx.float32), np.float64), np.array(b.astype(mx.float32), np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))


def _route(dialect: str, rng: np.random.Generator, N: int) -> float:
    # distinct logits, exact in bf16: no ties, whose order the twin leaves unspecified
    logits = mx.array(np.stack([rng.permutation(32) * 0.25 - 4 for _ in range(N)]).astype(np.float32)).astype(mx.bfloat16)
    ids, w = gpu.route_topk_softmax(logits, 4, dialect=dialect)
    return _same_topk(ids, w, *ops.route_topk_softmax(logits.astype(mx.float32), 4))


def _same_topk(ids, w, ids_t, w_t) -> float:
    """Largest weight difference, or inf when the chosen experts differ (compared sorted by id)."""
    a, b = np.array(ids), np.array(ids_t)
    if a.shape != b.shape or not (np.sort(a, 1) == np.sort(b, 1)).all():
        return float("inf")
    wa = np.take_along_axis(np.array(w.astype(mx.float32)), np.argsort(a, 1), 1)
    wb = np.take_along_axis(np.array(w_t.astype(mx.float32)), np.argsort(b, 1), 1)
    return float(np.abs(wa - wb).max())


def _route_matvec(dialect: str, rng: np.random.Generator, x: mx.array) -> float:
    E = 32
    rw = mx.array(rng.normal(0, 1, (E, x.shape[1])).astype(np.float32)).astype(mx.bfloat16)
    rb = mx.array(rng.normal(0, 1, (E,)).astype(np.float32)).astype(mx.bfloat16)
    return _same_topk(*gpu.route_matvec_topk(x, rw, rb, 4, dialect=dialect), *ops.route_matvec_topk(x, rw, rb, 4))


def run_checks(dialect: str) -> list[Check]:
    """Each custom kernel of ``dialect`` against its twin, at one and at three tokens."""
    f32 = mx.float32
    diffs: dict[str, float] = {name: 0.0 for name in S.SPECS}
    errors: dict[str, str] = {}
    rng = np.random.default_rng(0)
    for N in (1, 3):
        x, ids, w, (gw, gs, gb), (dw, ds, db) = _inputs(rng, N)
        act_t = ops.mxfp4_gate_up_swiglu(x.astype(f32), ids, gw, gs, gb.astype(f32), limit=LIMIT, alpha=ALPHA)
        y_t = ops.mxfp4_down_combine(act_t, ids, w.astype(f32), dw, ds, db.astype(f32), x.astype(f32), out_dtype=f32)
        runs = {
            S.ROUTE: lambda: _route(dialect, rng, N),
            S.ROUTE_MATVEC: lambda: _route_matvec(dialect, rng, x),
            S.GATE_UP: lambda: _rel(
                gpu.mxfp4_gate_up_swiglu(x, ids, gw, gs, gb, limit=LIMIT, alpha=ALPHA, dialect=dialect), act_t
            ),
            # from the twin's activations, so a gate_up error is not blamed on down
            S.DOWN: lambda: _rel(gpu.mxfp4_down_combine(act_t, ids, w, dw, ds, db, x, out_dtype=f32, dialect=dialect), y_t),
        }
        for name, run in runs.items():
            if name in errors:
                continue
            try:
                diffs[name] = max(diffs[name], run())
            except Exception as e:  # noqa: BLE001 - a compile error or any failure of the kernel is the verdict
                errors[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    out = []
    for name, d in diffs.items():
        if name in errors:
            out.append(Check(name, False, errors[name]))
        else:
            ok = d <= TOLERANCE[name]  # NaN compares false: a NaN output fails
            what = "max difference of the weights" if name in (S.ROUTE, S.ROUTE_MATVEC) else "max relative difference"
            out.append(Check(name, ok, f"{what} to the twin {d:.2e}" + ("" if ok else f" (tolerance {TOLERANCE[name]:g})")))
    return out


_failed: dict[str, frozenset[str]] = {}  # per process: dialect -> kernels that failed (the hot path's lookup)


def _cache_file() -> Path:
    return cache_root() / CACHE_NAME


def _key(dialect: str) -> str:
    return f"mlx {mx.__version__} | {dialect} | {device_name()} | source {source_hash(dialect)}"


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # absent or unreadable: check again
        return {}


def _write_cache(key: str, checks: list[Check]) -> None:
    path = _cache_file()
    data = _read_cache()
    data[key] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "checks": {c.kernel: {"ok": c.ok, "detail": c.detail} for c in checks},
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(path)
    except OSError:  # a read-only cache only costs a re-check next process
        pass


def failed(dialect: str) -> frozenset[str]:
    """The kernels of ``dialect`` the dispatcher must not use (checked once per process)."""
    if dialect in _failed:  # every MoE call asks: no hashing or device query after the first
        return _failed[dialect]
    key = _key(dialect)
    cached = _read_cache().get(key, {}).get("checks")
    if isinstance(cached, dict) and set(cached) == set(S.SPECS):
        checks = [Check(k, bool(v.get("ok")), str(v.get("detail", ""))) for k, v in cached.items()]
    else:
        checks = run_checks(dialect)
        _write_cache(key, checks)
    bad = frozenset(c.kernel for c in checks if not c.ok)
    _failed[dialect] = bad
    if bad:
        why = "; ".join(f"{c.kernel}: {c.detail}" for c in checks if not c.ok)
        warnings.warn(
            f"mlx-gptoss: the custom {dialect} kernel(s) {', '.join(sorted(bad))} failed the self-check ({why}); the "
            f"pure-MLX twins run instead (correct, slower at decode). Please report the output of "
            f"`mlx-gptoss doctor --kernels`. Verdict cached in {_cache_file()} (delete it to check again).",
            RuntimeWarning, stacklevel=3,
        )  # fmt: skip
    return bad


def reset() -> None:
    """Forget this process's verdicts (the on-disk cache stays)."""
    _failed.clear()


def _time(fn) -> float:
    reps = 3 if mx.default_device() == mx.cpu else 20  # the CPU's twins take ~100 ms a call
    mx.eval(fn())
    t = time.perf_counter()
    mx.eval([fn() for _ in range(reps)])
    return (time.perf_counter() - t) / reps


def benchmark(dialect: str, tokens: tuple[int, ...] = (1, 4), E: int = 8, H: int = 2880, I: int = 2880) -> list[str]:
    """µs per MoE call (gate_up + down, 4 of ``E`` experts at the 20b's widths): kernels vs twins."""
    rng = np.random.default_rng(1)
    x, ids, w, gu, dn = _inputs(rng, max(tokens), E=E, H=H, I=I)
    mx.eval(x, ids, w, gu, dn)
    lines = []
    for T in tokens:
        args = (x[:T], ids[:T], w[:T], *gu, *dn)

        def twin(args=args):
            f32 = mx.float32 if mx.default_device() == mx.cpu else args[0].dtype  # the dispatcher's CPU choice
            return ops.moe_mxfp4_swiglu(args[0].astype(f32), *args[1:], limit=LIMIT, alpha=ALPHA)

        row = f"  T={T}: twins {_time(twin) * 1e6:9.1f} us"
        if dialect != "twin":

            def kern(args=args):
                act = gpu.mxfp4_gate_up_swiglu(args[0], args[1], *args[3:6], limit=LIMIT, alpha=ALPHA, dialect=dialect)
                return gpu.mxfp4_down_combine(act, args[1], args[2], *args[6:], out_dtype=args[0].dtype, dialect=dialect)

            try:
                row += f"   kernels {_time(kern) * 1e6:9.1f} us"
            except Exception as e:  # noqa: BLE001 - the report shows it
                row += f"   kernels failed: {type(e).__name__}: {e}"
        lines.append(row)
    return lines


def report(bench: bool = True) -> str:
    """What ``mlx-gptoss doctor --kernels`` prints: versions, the checks, a short benchmark."""
    b = backends.backend()
    lines = [f"mlx {mx.__version__}, python {platform.python_version()}, {platform.platform()}",
             f"default device: {mx.default_device()} ({device_name()}); kernel mode {backends.mode()!r}; MoE ops run on: {b}"]  # fmt: skip
    if b == "twin":
        if backends.mode() == "twin":
            why = "MLX_GPTOSS_KERNELS=twin (or kernels.set_mode('twin')) forces the pure-MLX twins"
        elif mx.default_device() != mx.gpu:
            why = "MLX's default device is the CPU" + (
                "" if mx.metal.is_available() or _cuda() else " (this MLX build has neither Metal nor CUDA)"
            )
        else:
            why = "this MLX build has neither Metal nor CUDA"
        lines.append(f"custom kernels: not used here: {why}; the pure-MLX twins run every MoE op.")
        for d in ("metal", "cuda"):
            lines.append(f"kernel source ({d}): sha256 {source_hash(d)}, launch shapes {gpu.LAUNCH[d]}")
    else:
        lines.append(f"kernel source ({b}): sha256 {source_hash(b)}, launch shapes {gpu.LAUNCH[b]}")
        lines.append("self-check (each kernel against its twin, 1 and 3 tokens):")
        checks = run_checks(b)
        lines += [f"  {c.kernel}: {'ok' if c.ok else 'FAILED'}: {c.detail}" for c in checks]
        cached = _read_cache().get(_key(b), {}).get("checks")
        if isinstance(cached, dict):
            off = sorted(k for k, v in cached.items() if not v.get("ok"))
            lines.append(
                f"dispatcher's cached verdict ({_cache_file()}): "
                + (f"twins instead of {', '.join(off)}" if off else "all kernels in use")
            )
    if bench:
        lines.append("micro-benchmark, one MoE call (gate_up + down, 4 of 8 experts at the 20b's widths, bf16):")
        lines += benchmark(b)
    return "\n".join(lines)


def _cuda() -> bool:
    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available())
