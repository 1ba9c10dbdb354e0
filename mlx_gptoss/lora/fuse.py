"""Serving adapters: attach one to a loaded model (unfused), or merge it into a new checkpoint.

Unfused (:func:`~mlx_gptoss.lora.io.load_adapter`, ``load(..., adapter=DIR)``) the base stays as stored and the
expert update is computed for the routed experts only. :func:`fuse` writes a converted checkpoint
whose attention and router weights hold the update (W + scale·B·A), re-quantized where the base
was quantized, every other tensor copied byte for byte; it reports the part of the update lost to
the stored precision and the KL divergence between the unfused and the fused model on a sample.

Expert adapters are never fused. The experts are MXFP4 (E2M1 codes, one power-of-two scale per
32 values): a LoRA update is far below one code step, so re-quantizing W + ΔW mostly rounds back
to W (:func:`mxfp4_update_loss` measures how much is lost). Dense bf16 experts would keep it, but
the model runs MXFP4 experts only (the converter quantizes dense experts too), so that request
is refused with the size it would have had.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_gptoss.safetensors_io import SafetensorsWriter
from mlx_gptoss_convert.convert import TOKENIZER_FILES
from mlx_gptoss_convert.destination import SPACE_MARGIN, check_no_overlap, claimed, destination, staged
from mlx_gptoss_convert.vocab import TIKTOKEN_FILE

from ..config import read_json
from ..converted import INDEX, shard_files
from ..loader import load
from ..models import resolve_model
from ..safetensors_io import read_header
from ..version import __version__
from .adapters import LoRAFusedLinear, LoRALinear, LoRASpec, remove_lora
from .io import load_adapter

FUSE_RECORD = "fused_adapter.json"  # beside the fused weights: which adapter, and the fuse report
_NUMPY = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "U32": np.uint32, "U8": np.uint8}
_MX = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32, "U32": mx.uint32, "U8": mx.uint8}
_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


class FuseError(ValueError):
    """A fuse that cannot be done (expert adapters, a bad destination); the message says why."""


def mxfp4_update_loss(codes: mx.array, scales: mx.array, delta: mx.array, *, keep_scales: bool = False) -> float:
    """The part of an update lost by re-quantizing W + ΔW into MXFP4: ‖Q(W + ΔW) − Q(W) − ΔW‖ / ‖ΔW‖.

    ``codes`` [out, in/8] u32 and ``scales`` [out, in/32] u8 are one expert's stored MXFP4 map W,
    ``delta`` [out, in]. Q is MLX's quantizer, or with ``keep_scales`` the nearest E2M1 code on
    W's own scales (the best a re-quantization can do without touching the scales). Measured
    against Q(W), not W, so what the quantizer does to W alone (:func:`mxfp4_requant_change`) is
    not counted as the update's. 1.0: the update is gone; above 1, the fuse moved the expert
    further from W + ΔW than W is.
    """
    w = _dequant_mxfp4(codes, scales)
    d = delta.astype(mx.float32)
    if keep_scales:
        s = mx.repeat(mx.power(2.0, scales.astype(mx.float32) - 127), 32, axis=-1)
        kept = (_round_e2m1((w + d) / s) - _round_e2m1(w / s)) * s
    else:
        kept = _requant_mxfp4(w + d) - _requant_mxfp4(w)
    return (mx.linalg.norm((kept - d).flatten()) / mx.linalg.norm(d.flatten())).item()


def _round_e2m1(v: mx.array) -> mx.array:
    """The nearest MXFP4 element value (E2M1: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives)."""
    a = mx.abs(v)
    # midpoints between neighbouring codes; counting those below |v| gives the code's index
    mids = mx.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    grid = mx.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    idx = sum((a > m).astype(mx.int32) for m in mids.tolist())
    return mx.sign(v) * grid[idx]


def mxfp4_requant_change(codes: mx.array, scales: mx.array) -> float:
    """‖Q(W) − W‖ / ‖W‖ for a stored MXFP4 map W: 0 when MLX's quantizer gives the stored codes back."""
    w = _dequant_mxfp4(codes, scales)
    return (mx.linalg.norm((_requant_mxfp4(w) - w).flatten()) / mx.linalg.norm(w.flatten())).item()


def _dequant_mxfp4(codes: mx.array, scales: mx.array) -> mx.array:
    return mx.dequantize(codes, scales, group_size=32, bits=4, mode="mxfp4").astype(mx.float32)


def _requant_mxfp4(w: mx.array) -> mx.array:
    return _dequant_mxfp4(*mx.quantize(w, group_size=32, bits=4, mode="mxfp4"))


@dataclass
class FuseReport:
    """What :func:`fuse` wrote and the error it introduced.

    ``update_lost``: the worst merged tensor's ‖stored(W + ΔW) − (W + ΔW)‖ / ‖ΔW‖ (bf16 rounding or
    re-quantization), named by ``worst_tensor``. ``kl_mean``/``kl_max``: KL(unfused ‖ fused) of the
    next-token distributions over ``check_tokens`` random tokens (float32; None when not checked);
    ``kl_adapter_mean``: KL(unfused ‖ base), the adapter's own effect on the same tokens, for scale.
    """

    out: Path
    merged: list[str] = field(default_factory=list)
    update_lost: float = 0.0
    worst_tensor: str | None = None
    kl_mean: float | None = None
    kl_max: float | None = None
    kl_adapter_mean: float | None = None
    check_tokens: int = 0

    def summary(self) -> str:
        lines = [f"fused {len(self.merged)} tensors into {self.out}"]
        if self.worst_tensor is not None:
            lines.append(f"update lost to the stored precision: {self.update_lost:.3%} (worst: {self.worst_tensor})")
        if self.kl_mean is not None:
            lines.append(
                f"KL(unfused || fused) over {self.check_tokens} random tokens: mean {self.kl_mean:.3e}, max {self.kl_max:.3e} nats "
                f"(the adapter's own effect, KL(unfused || base): mean {self.kl_adapter_mean:.3e})"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"merged": self.merged, "update_lost": self.update_lost, "worst_tensor": self.worst_tensor,
                "kl_mean": self.kl_mean, "kl_max": self.kl_max, "kl_adapter_mean": self.kl_adapter_mean,
                "check_tokens": self.check_tokens}  # fmt: skip


def fuse(
    model_path: str | Path,
    adapter_dir: str | Path,
    out: str | Path,
    *,
    experts_bf16: bool = False,
    dtype: str | None = None,
    check_tokens: int = 64,
    seed: int = 0,
    verbose: bool = True,
) -> FuseReport:
    """Merge the attention and router adapters of ``adapter_dir`` into a new checkpoint ``out``.

    Args:
        model_path: the converted base model (a folder or a repo id converted once).
        adapter_dir: an adapter folder (ours, PEFT or mlx-lm) trained on that base.
        out: a new folder (refused if it exists or overlaps the model or the adapter). Written
            into a hidden sibling and renamed into place when complete.
        experts_bf16: fuse expert adapters into dense bf16 experts. The model runs MXFP4 experts
            only, so this is refused (with the size it would have); without it, an adapter with
            expert adapters is refused with the part of its update MXFP4 would lose.
        dtype: storage of merged float weights: None keeps the base's (bf16 for a release, so
            the update is rounded to bf16), or "float32"/"bfloat16"/"float16". Quantized weights
            stay in their format: new codes on the base's own scales (affine 2/4/8-bit) or a
            fresh quantization, whichever is nearer W + ΔW.
        check_tokens: length of the random sample the KL check runs (0 skips it).

    Returns a :class:`FuseReport` (also printed to stderr when ``verbose``). Raises
    :class:`FuseError` / :class:`LoRAError` (both ValueErrors) before anything is written.
    """
    if dtype is not None and dtype not in _DTYPES:
        raise FuseError(f"dtype must be one of {', '.join(_DTYPES)} (or None for the base's), got {dtype!r}")
    if isinstance(check_tokens, bool) or not isinstance(check_tokens, int) or check_tokens < 0:
        raise FuseError(f"check_tokens must be an integer >= 0, got {check_tokens!r}")
    src, adapter_dir, given = resolve_model(model_path), Path(adapter_dir).expanduser(), out
    out = destination(out)
    if out.exists() or out.is_symlink():
        raise FuseError(f"{given}: already exists; fuse writes a new folder (choose another name)")
    check_no_overlap([src, adapter_dir], out)
    model = load(src, dtype=mx.float32)
    spec = load_adapter(model, adapter_dir)
    if "experts" in spec.targets:
        raise FuseError(_experts_refusal(model, spec, src, adapter_dir, experts_bf16))
    infos = {}
    for f in shard_files(src):
        infos[f] = sorted(read_header(f)[0].values(), key=lambda i: i.begin)
    modules = _merged_modules(model)
    merged_names = {n for names in modules.values() for n in names[1]}
    total = sum(i.nbytes for v in infos.values() for i in v)
    report = FuseReport(out, sorted(merged_names), check_tokens=check_tokens)

    def exists() -> None:  # another run may have finished meanwhile
        raise FuseError(f"{given}: already exists; fuse writes a new folder (choose another name)")

    # convert's destination handling: signals, the lock, stale partials, free space, one rename
    with claimed(out, total + SPACE_MARGIN, exists, "fuse"), staged(out) as tmp:
        _write_shards(tmp, infos, modules, dtype, report)
        _write_metadata(src, tmp, adapter_dir, spec, infos)
        ref = _reference(model, check_tokens, seed, report) if check_tokens else None
        del model, modules  # the fused model loads next: never both in memory
        mx.clear_cache()
        if ref is not None:
            _kl_check(tmp, *ref, report)
        (tmp / FUSE_RECORD).write_text(json.dumps({"adapter": str(adapter_dir), "base": str(src),
                                                   "spec": spec.to_dict(), "report": report.to_dict()}, indent=2) + "\n")  # fmt: skip
    if verbose:
        print(report.summary(), file=sys.stderr)
    return report


def _update(module: Any) -> mx.array:
    """scale · B A [out, in] of a LoRALinear, or the q, k, v updates stacked as the fused rows."""
    if isinstance(module, LoRAFusedLinear):
        return mx.concatenate([p.scale * (p.lora_b @ p.lora_a) for p in module._parts], axis=0)
    return module.scale * (module.lora_b @ module.lora_a)


def _merged_modules(model: Any) -> dict[str, tuple[Any, list[str]]]:
    """Stored prefix -> (adapted module, the stored tensor names its merge rewrites)."""
    out = {}
    for i, layer in enumerate(model.layers):
        for prefix, m in ((f"layers.{i}.self_attn.qkv", layer.self_attn.qkv), (f"layers.{i}.self_attn.o_proj", layer.self_attn.o_proj),
                          (f"layers.{i}.mlp.router", layer.mlp.router)):  # fmt: skip
            if isinstance(m, (LoRALinear, LoRAFusedLinear)):
                leaves = ["weight", "scales", *(["biases"] if "biases" in m.base else [])] if "scales" in m.base else ["weight"]
                out[prefix] = (m, [f"{prefix}.{leaf}" for leaf in leaves])
    return out


def _merge(module: Any, prefix: str, st_dtypes: dict[str, str]) -> tuple[dict[str, mx.array], float]:
    """The merged stored tensors of one adapted module, and the part of its update they lose."""
    base, delta = module.base, _update(module).astype(mx.float32)
    spec = getattr(base, "spec", None)
    if spec is None:
        merged = base.weight.astype(mx.float32) + delta
        stored = merged.astype(_MX[st_dtypes[f"{prefix}.weight"]])
        tensors, back = {f"{prefix}.weight": stored}, stored.astype(mx.float32)
    else:
        q = dict(group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
        w = mx.dequantize(base.weight, base.scales, base.get("biases"), **q).astype(mx.float32)
        merged = w + delta
        # quantized at the scales' stored precision, as the converter does, so the scales are exact
        scale_dtype = _MX[st_dtypes[f"{prefix}.scales"]]
        parts = mx.quantize(merged.astype(scale_dtype if mx.issubdtype(scale_dtype, mx.floating) else mx.float32), **q)
        back = mx.dequantize(*parts, **q).astype(mx.float32)
        if spec.mode == "affine" and 32 % spec.bits == 0:
            # new codes on the base's own grid: only the update is rounded, W's codes stay exact; the
            # fresh quantization above re-rounds all of W and can add more error than the update holds
            grid = (_codes_on_grid(merged, base.scales, base.biases, spec), base.scales, base.biases)
            grid_back = mx.dequantize(*grid, **q).astype(mx.float32)
            if mx.linalg.norm((grid_back - merged).flatten()).item() <= mx.linalg.norm((back - merged).flatten()).item():
                parts, back = grid, grid_back
        tensors = dict(zip([f"{prefix}.{k}" for k in ("weight", "scales", "biases")], parts))
    lost = mx.linalg.norm((back - merged).flatten()) / mx.maximum(mx.linalg.norm(delta.flatten()), 1e-30)
    mx.eval(tensors, lost)
    return tensors, lost.item()


def _codes_on_grid(w: mx.array, scales: mx.array, biases: mx.array, spec: Any) -> mx.array:
    """w [out, in] as affine codes on the given scales and biases, packed as ``mx.quantize`` packs them."""
    g, per = spec.group_size, 32 // spec.bits
    s, b = (mx.repeat(t.astype(mx.float32), g, axis=-1) for t in (scales, biases))
    codes = mx.clip(mx.round((w - b) / s), 0, 2**spec.bits - 1).astype(mx.uint32)
    shifts = mx.arange(per, dtype=mx.uint32) * spec.bits  # element j of a word sits at bit j·bits
    return (codes.reshape(w.shape[0], -1, per) << shifts).sum(axis=-1).astype(mx.uint32)


def _as_numpy(a: mx.array, st_dtype: str) -> np.ndarray:
    a = a.astype(_MX[st_dtype])
    return np.array(a.view(mx.uint16) if st_dtype == "BF16" else a, dtype=_NUMPY[st_dtype])


def _write_shards(tmp: Path, infos: dict, modules: dict, dtype: str | None, report: FuseReport) -> None:
    """Each source shard again under its name, merged tensors replaced, every other one copied as is."""
    st = {i.name: i.dtype for v in infos.values() for i in v}
    out_dtype = dict(st)
    for m, names in modules.values():
        if "scales" not in m.base and dtype is not None:
            out_dtype[names[0]] = _DTYPES[dtype]
    pending: dict[str, mx.array] = {}
    owner = {n: prefix for prefix, (_, names) in modules.items() for n in names}
    for f, entries in infos.items():
        with open(f, "rb") as fh, SafetensorsWriter(tmp / f.name, [(i.name, out_dtype[i.name], i.shape) for i in entries],
                                                    {"format": "mlx"}) as w:  # fmt: skip
            for info in entries:
                if info.name not in owner:
                    for chunk in info.iter_chunks(fh):
                        w.write(info.name, chunk)
                    continue
                if info.name not in pending:
                    prefix = owner[info.name]
                    tensors, lost = _merge(modules[prefix][0], prefix, out_dtype)
                    pending.update(tensors)
                    if lost >= report.update_lost:
                        report.update_lost, report.worst_tensor = lost, f"{prefix}.weight"
                w.write(info.name, _as_numpy(pending.pop(info.name), out_dtype[info.name]))


def _write_metadata(src: Path, tmp: Path, adapter_dir: Path, spec: LoRASpec, infos: dict) -> None:
    """config.json (the source's, the adapter named in its source), the index, the tokenizer files."""
    config = read_json(src / "config.json")
    block = config["mlx_gptoss"]
    block["source"] = f"{block.get('source', src)} + LoRA {adapter_dir} ({', '.join(spec.targets)}, fused)"
    block["converter_version"] = __version__
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weight_map = {i.name: f.name for f, v in infos.items() for i in v}
    total = sum((tmp / f.name).stat().st_size for f in infos)
    index = {"metadata": {"total_size": total, "format": "mlx-gptoss"}, "weight_map": weight_map}
    (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    for name in (*TOKENIZER_FILES, TIKTOKEN_FILE):
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)


def _reference(unfused: Any, n: int, seed: int, report: FuseReport) -> tuple[mx.array, mx.array]:
    """n random token ids [1, n] and the unfused model's next-token log-probabilities on them; the
    adapter's own effect, KL(unfused ‖ base), goes into the report for scale (adapters removed after)."""
    ids = mx.array(np.random.default_rng(seed).integers(0, unfused.config.vocab_size, (1, n)))
    ref = _log_softmax(unfused(ids))
    mx.eval(ref)
    remove_lora(unfused)
    report.kl_adapter_mean = mx.mean(_kl(ref, _log_softmax(unfused(ids)))).item()
    return ids, ref


def _kl(ref: mx.array, got: mx.array) -> mx.array:
    return (mx.exp(ref) * (ref - got)).sum(axis=-1)


def _kl_check(fused_dir: Path, ids: mx.array, ref: mx.array, report: FuseReport) -> None:
    """KL(unfused ‖ fused) of the next-token distributions on ``ids``, float32."""
    kl = _kl(ref, _log_softmax(load(fused_dir, dtype=mx.float32)(ids)))
    report.kl_mean, report.kl_max = mx.mean(kl).item(), mx.max(kl).item()


def _experts_refusal(model: Any, spec: LoRASpec, src: Path, adapter_dir: Path, experts_bf16: bool) -> str:
    """Why an adapter with expert adapters is not fused, with the loss measured on its own update."""
    layers = [i for i, layer in enumerate(model.layers) if getattr(layer.mlp, "experts_lora", None) is not None]
    serve = f"serve it unfused instead: load(..., adapter={str(adapter_dir)!r}) or --adapter {adapter_dir}"
    if experts_bf16:
        cfg = model.config
        dense = cfg.num_hidden_layers * cfg.num_local_experts * 3 * cfg.hidden_size * cfg.intermediate_size * 2
        mxfp4 = dense * 17 // 64  # 4-bit codes and one byte of scale per 32 values, against 2 bytes per value
        return (f"{adapter_dir}: fusing expert adapters into bf16 experts would grow the experts from "
                f"{mxfp4 / 1e9:.2f} GB to {dense / 1e9:.2f} GB, but this version of mlx-gptoss runs MXFP4 experts "
                f"only (the converter quantizes dense experts to MXFP4 too), so such a checkpoint could not be "
                f"loaded; {serve}")  # fmt: skip
    i = layers[0]
    lora, g = model.layers[i].mlp.experts_lora, model.layers[i].mlp.gate_up
    a, b = lora.gate_up.lora_a, lora.gate_up.lora_b
    # ‖B_e A_e‖² = trace(BᵀB · AAᵀ): each expert's update size without forming it
    norms = mx.sum((b.swapaxes(1, 2) @ b) * (a @ a.swapaxes(1, 2)), axis=(1, 2))
    e = int(mx.argmax(norms).item())
    delta = lora.scale * (b[e] @ a[e])
    lost, kept_scales = (mxfp4_update_loss(g.weight[e], g.scales[e], delta, keep_scales=k) for k in (False, True))
    return (f"{adapter_dir}: the adapter trains the experts (layers {', '.join(map(str, layers))}); re-quantizing "
            f"them into MXFP4 would lose {lost:.1%} of the update ({kept_scales:.1%} even keeping the base's scales; "
            f"measured on layer {i}, expert {e}'s gate_up, its largest update), so expert adapters are not fused; {serve}")  # fmt: skip


def _log_softmax(logits: mx.array) -> mx.array:
    x = logits.astype(mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)
