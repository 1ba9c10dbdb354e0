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
import os
import shutil
import sys
from collections.abc import Mapping
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
from ..converted import INDEX, read_config, shard_files
from ..loader import load
from ..models import resolve_model
from ..options import OptionError, check_number, check_seed
from ..safetensors_io import read_header
from ..version import __version__
from .adapters import LoRAFusedLinear, LoRALinear, LoRASpec, lora_parameters, remove_lora
from .files import FUSE_RECORD as FUSE_RECORD
from .io import adapter_identity, fused_adapters, load_adapter

LOSS_LIMIT = 0.5  # above this part of the update lost to the stored precision, a fuse is refused unless allowed
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
    allow_loss: bool = False,
    verbose: bool = True,
    names: Mapping[str, str] | None = None,
) -> FuseReport:
    """Merge the attention and router adapters of ``adapter_dir`` into a new checkpoint ``out``.

    Args:
        model_path: the converted base model (a folder or a repo id converted once).
        adapter_dir: an adapter folder (ours, PEFT or mlx-lm) trained on that base; refused when
            the model already holds it fused (its ``fused_adapter.json`` lists it).
        out: a new folder (refused if it exists or overlaps the model or the adapter). Written
            into a hidden sibling and renamed into place when complete.
        experts_bf16: fuse expert adapters into dense bf16 experts. The model runs MXFP4 experts
            only, so this is refused (with the size it would have); without it, an adapter with
            expert adapters is refused with the part of its update MXFP4 would lose.
        dtype: storage of merged float weights: None keeps the base's (bf16 for a release, so
            the update is rounded to bf16), or "float32"/"bfloat16"/"float16". Quantized weights
            stay in their format: new codes on the base's own scales (affine 2/4/8-bit) or a
            fresh quantization, whichever is nearer W + ΔW.
        check_tokens: length of the random sample the KL check runs (0 skips it); at most the
            model's context, and refused when its [check_tokens, vocab] float32 log-probabilities
            and attention scores would not fit in half the machine's memory.
        seed: the random sample's seed (-1: a random one).
        allow_loss: write the fused model even when the stored precision loses more than
            :data:`LOSS_LIMIT` of the update (with a warning); by default that is
            :class:`UpdateLostError` and nothing is written.
        names: how errors spell the options (the CLI passes its flags, e.g. ``{"dtype": "--dtype"}``).

    Returns a :class:`FuseReport` (also printed to stderr when ``verbose``). Raises
    :class:`FuseError` / :class:`LoRAError` (both ValueErrors) with nothing written: every check
    runs before the output is claimed, and a failure while writing removes the partial folder and
    releases the lock.
    """
    say = {k: names.get(k, k) if names else k for k in _OPTIONS}
    if dtype is not None and dtype not in _DTYPES:
        raise FuseError(f"{say['dtype']} must be one of {', '.join(_DTYPES)} (or None for the base's), got {dtype!r}")
    for name, flag in (("experts_bf16", experts_bf16), ("allow_loss", allow_loss), ("verbose", verbose)):
        if not isinstance(flag, bool):
            raise FuseError(f"{say.get(name, name)} must be true or false; got {flag!r}")
    try:
        check_tokens = int(check_number(say["check_tokens"], check_tokens, integer=True, min=0))
        seed = check_seed(say["seed"], seed)
    except OptionError as e:
        raise FuseError(str(e)) from None
    src, adapter_dir, given = resolve_model(model_path), Path(adapter_dir).expanduser(), out
    out = destination(out)
    if out.exists() or out.is_symlink():
        raise FuseError(f"{given}: already exists; fuse writes a new folder (choose another name)")
    check_no_overlap([src, adapter_dir], out)
    _check_sample(read_config(src), src, check_tokens, say)  # before anything loads: its memory is the model's rival
    model = load(src, dtype=mx.float32)
    spec = load_adapter(model, adapter_dir)  # refuses an adapter this model already holds fused
    if "experts" in spec.targets:
        raise FuseError(_experts_refusal(model, spec, src, adapter_dir, experts_bf16))
    ident = adapter_identity(spec, lora_parameters(model))
    infos = {}
    for f in shard_files(src):
        infos[f] = sorted(read_header(f)[0].values(), key=lambda i: i.begin)
    modules = _merged_modules(model)
    merged_names = {n for names in modules.values() for n in names[1]}
    total = sum(i.nbytes for v in infos.values() for i in v)
    report = FuseReport(out, sorted(merged_names), check_tokens=check_tokens)
    record = {"adapter": str(adapter_dir), "adapter_id": ident, "base": str(src), "spec": spec.to_dict(),
              "fused_adapters": [*fused_adapters(src), {"adapter": str(adapter_dir), "adapter_id": ident}]}  # fmt: skip

    def exists() -> None:  # another run may have finished meanwhile
        raise FuseError(f"{given}: already exists; fuse writes a new folder (choose another name)")

    # convert's destination handling: signals, the lock, stale partials, free space, one rename;
    # any error inside removes the partial folder and releases the lock
    with claimed(out, total + SPACE_MARGIN, exists, "fuse"), staged(out) as tmp:
        _write_shards(tmp, infos, modules, dtype, report)
        quantized = any("scales" in m.base for p, (m, _) in modules.items() if f"{p}.weight" == report.worst_tensor)
        if report.update_lost > LOSS_LIMIT and not allow_loss:
            raise UpdateLostError(report, dtype, quantized, adapter_dir, say)
        _write_metadata(src, tmp, adapter_dir, spec, infos)
        ref = _reference(model, check_tokens, seed, report) if check_tokens else None
        del model, modules  # the fused model loads next: never both in memory
        mx.clear_cache()
        if ref is not None:
            _kl_check(tmp, *ref, report)
        (tmp / FUSE_RECORD).write_text(json.dumps({**record, "report": report.to_dict()}, indent=2) + "\n")
    if verbose:
        print(report.summary(), file=sys.stderr)
        if report.update_lost > LOSS_LIMIT:
            print(f"warning: {out} lost {report.update_lost:.1%} of the adapter's update to the stored precision "
                  f"(worst: {report.worst_tensor}): it behaves nearer the base model than the adapted one; "
                  f"{_remedy(dtype, quantized, adapter_dir, say)}", file=sys.stderr)  # fmt: skip
    return report


_OPTIONS = ("dtype", "check_tokens", "seed", "allow_loss", "experts_bf16", "verbose")


def _spell(say: Mapping[str, str], key: str, value: Any) -> str:
    """An option with a value as the caller writes it: ``--dtype float32`` or ``dtype='float32'``; a flag alone when True."""
    name = say[key]
    if name.startswith("-"):
        return name if value is True else f"{name} {value}"
    return f"{name}={value!r}"


def _remedy(dtype: str | None, quantized: bool, adapter_dir: Path, say: Mapping[str, str]) -> str:
    """What to do instead of a fuse that loses the update: keep it in float32 (float weights only), or serve it unfused."""
    unfused = f"serve the adapter unfused: load(..., adapter={str(adapter_dir)!r}) or --adapter {adapter_dir}"
    if quantized:  # --dtype changes float weights only: quantized ones keep their format
        return f"the worst tensor is stored quantized, which {say['dtype']} does not change; {unfused}"
    if dtype == "float32":
        return unfused
    return f"fuse with {_spell(say, 'dtype', 'float32')} to keep the update whole (twice the merged tensors' size), or {unfused}"


class UpdateLostError(FuseError):
    """The stored precision would lose more than :data:`LOSS_LIMIT` of the update: nothing was written.

    ``lost`` (a fraction) and ``worst`` (the tensor that lost most) say how much and where.
    """

    def __init__(self, report: FuseReport, dtype: str | None, quantized: bool, adapter_dir: Path, say: Mapping[str, str]):
        self.lost, self.worst = report.update_lost, report.worst_tensor
        stored = f"as {dtype}" if dtype else "at the base's precision"
        super().__init__(
            f"{report.out}: storing the merged weights {stored} would lose {self.lost:.1%} of the adapter's update "
            f"(worst: {self.worst}), more than {LOSS_LIMIT:.0%}, so the fused model would behave nearer the base than "
            f"the adapted one; nothing was written — {_remedy(dtype, quantized, adapter_dir, say)}; "
            f"{_spell(say, 'allow_loss', True)} writes it anyway"
        )


def _memory_limit() -> int:
    """Bytes the KL check may take: half the memory MLX can use (a GPU's working set, else the RAM)."""
    info = mx.device_info()
    total = int(info.get("max_recommended_working_set_size") or info.get("total_memory") or 0)
    return (total or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 2


def _check_sample(cfg: Any, src: Path, n: int, say: Mapping[str, str]) -> None:
    """Refuse a KL sample beyond the model's context or too large for memory (MLX crashes, it does not raise)."""
    what = _spell(say, "check_tokens", n)
    if n > cfg.max_position_embeddings:
        raise FuseError(f"{what} exceeds the model's context of {cfg.max_position_embeddings} tokens "
                        f"(max_position_embeddings in {src / 'config.json'}); use a smaller {say['check_tokens']} "
                        "(64 is the default, 0 skips the check)")  # fmt: skip
    # [n, vocab] float32: the unfused logits, their log-probabilities kept, the fused ones and theirs;
    # one layer's attention scores and their softmax, [heads, n, n] float32
    need = 4 * n * cfg.vocab_size * 4 + 2 * cfg.num_attention_heads * n * n * 4
    limit = _memory_limit()
    if need > limit:
        raise FuseError(f"{what}: the KL check would hold about {need / 1e9:.2f} GB ([{n}, {cfg.vocab_size}] float32 "
                        f"log-probabilities and [{cfg.num_attention_heads}, {n}, {n}] attention scores), more than the "
                        f"{limit / 1e9:.2f} GB it may use here (half the memory); use a smaller {say['check_tokens']}")  # fmt: skip


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
    """KL(ref ‖ got) per position from log-probabilities; >= 0 (float32 rounding of two equal
    distributions' sum would otherwise go a few 1e-7 below zero)."""
    return mx.maximum((mx.exp(ref) * (ref - got)).sum(axis=-1), 0.0)


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
    # the largest expert update of any layer and part: where a number means something (a part the
    # adapter leaves at zero, e.g. PEFT's down_proj alone, has no update to lose)
    best = (0.0, layers[0], "gate_up", 0)
    for i in layers:
        lora = model.layers[i].mlp.experts_lora
        for part in ("gate_up", "down"):
            a, b = getattr(lora, part).lora_a, getattr(lora, part).lora_b
            # ‖B_e A_e‖² = trace(BᵀB · AAᵀ): each expert's update size without forming it
            norms = mx.sum((b.swapaxes(1, 2) @ b) * (a @ a.swapaxes(1, 2)), axis=(1, 2))
            e = int(mx.argmax(norms).item())
            if norms[e].item() > best[0]:
                best = (norms[e].item(), i, part, e)
    norm, i, part, e = best
    trained = f"{adapter_dir}: the adapter trains the experts (layers {', '.join(map(str, layers))})"
    if norm == 0:
        return (f"{trained}, but its expert update is zero everywhere (nothing MXFP4 could lose); expert adapters "
                f"are not fused — {serve}, or train without 'experts'")  # fmt: skip
    lora, base = model.layers[i].mlp.experts_lora, getattr(model.layers[i].mlp, part)
    delta = lora.scale * (getattr(lora, part).lora_b[e] @ getattr(lora, part).lora_a[e])
    lost, kept_scales = (mxfp4_update_loss(base.weight[e], base.scales[e], delta, keep_scales=k) for k in (False, True))
    return (f"{trained}; re-quantizing them into MXFP4 would lose {lost:.1%} of the update ({kept_scales:.1%} even "
            f"keeping the base's scales; measured on layer {i}, expert {e}'s {part}, its largest update), so expert "
            f"adapters are not fused; {serve}")  # fmt: skip


def _log_softmax(logits: mx.array) -> mx.array:
    x = logits.astype(mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)
