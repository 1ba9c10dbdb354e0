"""Loading a converted checkpoint: strict, lazy, no re-layout.

Nothing is read from disk until an array is evaluated (``mx.load`` is lazy); the checks below use
the safetensors headers only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import mlx.core as mx

from .config import GptOssConfig, read_json
from .safetensors_io import SafetensorsError, read_header, read_index
from .tokenizer import Tokenizer

FORMAT_NAME = "mlx-gptoss"
FORMAT_VERSION = 1
INDEX = "model.safetensors.index.json"
DEFAULT_MODEL = "openai/gpt-oss-20b"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ST_DTYPES = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32, "U8": mx.uint8, "U32": mx.uint32}


class LoadError(ValueError):
    """A model folder that is not a valid converted checkpoint; the message names file and key."""


def cache_root() -> Path:
    """Where repo ids are converted once: ``$MLX_GPTOSS_CACHE`` or ``~/.cache/mlx-gptoss``."""
    return Path(os.environ.get("MLX_GPTOSS_CACHE", Path.home() / ".cache" / "mlx-gptoss"))


def resolve_model(path_or_repo: str | Path, *, progress: bool | None = None, revision: str | None = None,
                  keep_download: bool | None = None, convert: bool = True) -> Path:  # fmt: skip
    """A converted model folder for a path or a Hugging Face repo id (downloaded and converted once).

    A repo id is looked up in ``cache_root()/models`` (see :mod:`mlx_gptoss.models`). The first
    time, it is downloaded into the Hugging Face cache (``$HF_TOKEN`` for private or gated repos)
    and converted there: where it writes and the disk it needs are said on stderr first, free space
    is checked, and once the converted copy is checked the download is kept or dropped
    (``keep_download``; default ``$MLX_GPTOSS_KEEP_DOWNLOAD``, else keep). ``convert=False``
    raises :class:`LoadError` instead of downloading.
    """
    p = Path(path_or_repo).expanduser()
    if p.exists():
        return p
    name = str(path_or_repo)
    if not _REPO_ID.match(name):
        raise LoadError(f"{name}: no such folder, and not a Hugging Face repo id (owner/name)")
    from .models import convert_once, converted_path

    converted = converted_path(name, revision)
    if (converted / "config.json").is_file():
        return converted
    if not convert:
        raise LoadError(f"{name}: not converted yet ({converted} does not exist); `mlx-gptoss convert {name} {converted}` "
                        f"converts it (generate and chat do it on first use)")  # fmt: skip
    hint = (
        f"It has not been converted yet ({converted} does not exist). If you have the release downloaded, "
        "convert it: `mlx-gptoss convert SRC DST`, then run with `--model DST` (in Python: load(DST))."
    )
    return convert_once(name, converted, revision=revision, progress=progress, keep_download=keep_download, offline_hint=hint)


def _format_check(path: Path, raw: Any) -> None:
    """Refuse a config.json that is not one written by our converter (a release, a future format)."""
    cfg = path / "config.json"
    if not isinstance(raw, dict):
        raise LoadError(f"{cfg}: expected a JSON object, found {type(raw).__name__}")
    fmt = raw.get("mlx_gptoss")
    if not isinstance(fmt, dict) or fmt.get("format") != FORMAT_NAME:
        hint = ""
        released = ("quantization_config", "experts_per_token", "num_experts")  # HF release, original/ config
        if any(k in raw for k in released) or raw.get("model_type") == "gpt_oss" or (path / "original").is_dir():
            hint = f": this is a released checkpoint, not a converted one: convert it first (mlx-gptoss convert {path} DST)"
        raise LoadError(f"{cfg}: not an mlx-gptoss checkpoint{hint}")
    if fmt.get("format_version") != FORMAT_VERSION:
        raise LoadError(
            f"{cfg}: format version {fmt.get('format_version')} is not the supported "
            f"{FORMAT_VERSION}; re-convert it with this version of mlx-gptoss"
        )


def read_config(path: Path) -> GptOssConfig:
    """A converted folder's config, with the loader's checks (a release or another format is refused)."""
    raw = read_json(path / "config.json")
    _format_check(path, raw)
    return GptOssConfig.from_dict(raw, source=str(path / "config.json"))


def resolve_config(path_or_repo: str | Path) -> tuple[Path, GptOssConfig]:
    """The converted folder of ``path_or_repo`` (see :func:`resolve_model`) and its config, as :func:`load` reads them."""
    path = resolve_model(path_or_repo)
    if not (path / "config.json").is_file():
        raise LoadError(f"{path}: no config.json")
    return path, read_config(path)


def _shards(path: Path) -> list[Path]:
    """The shard files of a converted checkpoint: those its index lists, else every *.safetensors."""
    index = path / INDEX
    if index.is_file():
        try:
            names = sorted(set(read_index(index).values()))
        except SafetensorsError as e:
            raise LoadError(str(e)) from None
        files = [path / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise LoadError(f"{path}: missing shard(s) {', '.join(missing)} listed in {INDEX}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LoadError(f"{path}: no *.safetensors files")
    return files


def load_weights(path: Path, expected: dict[str, mx.array]) -> dict[str, mx.array]:
    """Lazily load every shard, after checking names, shapes and dtypes against ``expected``."""
    seen: dict[str, Path] = {}
    weights: dict[str, mx.array] = {}
    for f in _shards(path):
        try:
            header, _ = read_header(f)
        except SafetensorsError as e:
            raise LoadError(str(e)) from None
        for name, info in header.items():
            if name not in expected:
                raise LoadError(f"{f}: unexpected tensor {name!r} (does config.json match the weights?)")
            want = expected[name]
            dtype = _ST_DTYPES.get(info.dtype)
            float_ok = dtype is not None and mx.issubdtype(dtype, mx.floating) and mx.issubdtype(want.dtype, mx.floating)
            if info.shape != tuple(want.shape) or not (float_ok or dtype == want.dtype):
                raise LoadError(
                    f"{f}: tensor {name!r} is {info.dtype} {list(info.shape)}, expected "
                    f"{'float' if mx.issubdtype(want.dtype, mx.floating) else want.dtype} {list(want.shape)}"
                )
            seen[name] = f
        weights.update(mx.load(str(f)))
    missing = [k for k in expected if k not in seen]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LoadError(f"{path}: missing tensor(s) {', '.join(missing[:3])}{more}")
    return weights


def load(
    path_or_repo: str | Path = DEFAULT_MODEL,
    *,
    dtype: Any = None,
    lazy: bool = True,
    memory_budget: str | int | None = None,
    context: int = 8192,
    prefetch: bool = True,
    verbose: bool = False,
    adapter: str | Path | None = None,
) -> GptOss:  # noqa: F821
    """Load a converted gpt-oss model (a folder, or a Hugging Face repo id converted once into a cache).

    Args:
        path_or_repo: a folder written by ``mlx-gptoss convert``, or a repo id such as
            ``openai/gpt-oss-20b`` (downloaded and converted on first use).
        dtype: dtype of everything that is not an MXFP4 expert (default ``mx.bfloat16``;
            ``mx.float32`` for verification).
        lazy: read weights on first use (default). ``False`` reads them all now. MLX evaluates a
            lazy array only in the thread that built it: to use the model from another thread,
            load it there, or load with ``lazy=False`` (a chat session reads them when created).
        memory_budget: keep MLX's memory under this ("9.5GB" or bytes): the embedding is served
            from the file on the host, and when the MXFP4 experts do not fit, only some expert
            slots per layer stay resident and the rest are read from disk on demand (exact:
            the same computation). ``model.memory_plan`` says what lives where,
            ``model.stream_stats`` how the expert cache does. Raises
            :class:`~mlx_gptoss.memory.BudgetError` when the budget cannot be met.
        context: the longest conversation (prompt + generated tokens) the budget must allow for.
        prefetch: read the experts the next layer will probably need while this one computes.
        verbose: print the memory plan to stderr.
        adapter: a LoRA adapter folder (ours, PEFT or mlx-lm) to serve unfused: the base stays as
            stored and the expert update is computed for the routed experts only. An adapter
            trained on another base is refused (:class:`~mlx_gptoss.lora.adapters.LoRAError`).

    Returns a :class:`~mlx_gptoss.model.GptOss` with ``.config`` and ``.tokenizer``. Nothing is
    read from disk until it is used (unless ``lazy=False``), but the weight files are held open
    from here on: a folder replaced later (``convert --force``) does not change a loaded model.
    """
    from mlx.utils import tree_flatten, tree_unflatten

    from .model import GptOss

    dtype = mx.bfloat16 if dtype is None else dtype
    path, config = resolve_config(path_or_repo)
    model = GptOss(config)
    expected = dict(tree_flatten(model.parameters()))
    # the lazy loads, the host embedding and the expert reader each open the shards; all must be
    # the files planned from (held open after this, so a later replacement cannot reach them)
    shards = {f: _file_id(f) for f in _shards(path)}
    weights = load_weights(path, expected)
    weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype else v for k, v in weights.items()}
    model.update(tree_unflatten(list(weights.items())))
    model.memory_plan = None
    model.stream_stats = None
    if memory_budget is not None:
        _apply_budget(model, path, memory_budget, context, dtype, prefetch, verbose)
    if adapter is not None:
        from .lora.io import load_adapter

        load_adapter(model, adapter)
    changed = [f.name for f, before in shards.items() if _file_id(f) != before]
    if changed:
        raise LoadError(
            f"{path}: {', '.join(changed)} changed while the model was loading (a conversion writing there?); load it again"
        )
    if not lazy:
        mx.eval(model.parameters())
    model.tokenizer = Tokenizer(path)
    model.path = path
    return model


def _file_id(f: Path) -> tuple[int, ...] | None:
    try:
        st = os.stat(f)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _apply_budget(model, path: Path, budget, context: int, dtype, prefetch: bool, verbose: bool) -> None:
    import sys

    from .layers import HostEmbedding
    from .memory import MLX_CACHE, MemoryPlan, plan_memory, read_tensors
    from .streaming import stream_experts

    tensors = read_tensors(path)
    if isinstance(budget, MemoryPlan):  # planned by the caller, e.g. memory.plan_training for LoRA training
        plan = budget
    else:
        plan = plan_memory(model.config, tensors, budget, context=context, float_bytes=mx.zeros((), dtype).itemsize)
    if verbose:
        print(plan.table(), file=sys.stderr)
    if plan.embed_on_host:
        emb = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("embed_tokens.")}
        model.pop("embed_tokens")  # its (lazy, never read) arrays are dropped with it
        model.embed_tokens = HostEmbedding(emb, dtype, model.config.quant("embed_tokens"))
    if plan.streaming:
        model.stream_stats = stream_experts(model, tensors, plan.expert_slots, prefetch=prefetch)
    mx.set_cache_limit(MLX_CACHE)  # freed buffers MLX keeps for reuse count against the budget too
    model.memory_plan = plan
