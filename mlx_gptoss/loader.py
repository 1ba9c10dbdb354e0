"""Loading a converted checkpoint folder: strict, lazy, no re-layout.

Nothing is read from disk until an array is evaluated (``mx.load`` is lazy); the checks below use
the safetensors headers only. This is the core's loader: a folder on disk. Repo ids (download and
convert once) are :mod:`mlx_gptoss.models`' concern, adapters :mod:`mlx_gptoss.lora`'s; the package
facade :func:`mlx_gptoss.load` composes the three.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .converted import FORMAT_NAME as FORMAT_NAME
from .converted import FORMAT_VERSION as FORMAT_VERSION
from .converted import INDEX as INDEX
from .converted import LoadError as LoadError
from .converted import read_config as read_config
from .converted import read_tensors, shard_files
from .layers import HostEmbedding
from .memory import MLX_CACHE, MemoryPlan, plan_memory
from .model import GptOss
from .options import OptionError, check_number
from .safetensors_io import SafetensorsError, read_header
from .streaming import stream_experts
from .tokenizer import Tokenizer

_ST_DTYPES = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32, "U8": mx.uint8, "U32": mx.uint32}


def load_weights(path: Path, expected: dict[str, mx.array]) -> dict[str, mx.array]:
    """Lazily load every shard, after checking names, shapes and dtypes against ``expected``."""
    seen: dict[str, Path] = {}
    weights: dict[str, mx.array] = {}
    for f in shard_files(path):
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


FLOAT_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


def check_load_options(dtype: Any = None, memory_budget: Any = None, context: Any = 8192) -> Any:
    """The load options checked before anything is read (the facade checks them before it resolves
    a repo id): :class:`~mlx_gptoss.options.OptionError` (a ValueError) naming the argument.
    Returns the dtype as an MLX dtype (a name such as ``"float32"`` is taken too)."""
    if dtype is None:
        dtype = mx.bfloat16
    elif isinstance(dtype, str) and dtype in FLOAT_DTYPES:
        dtype = FLOAT_DTYPES[dtype]
    elif not (isinstance(dtype, mx.Dtype) and dtype in FLOAT_DTYPES.values()):
        raise OptionError(f"dtype must be mx.bfloat16, mx.float16 or mx.float32 (or its name); got {dtype!r}")
    check_number("context", context, integer=True, min=1)
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (str, int, float, MemoryPlan, type(None))):
        raise OptionError(
            f"memory_budget must be a size such as '9.5GB', a number of bytes or a MemoryPlan; got {memory_budget!r}"
        )
    if isinstance(memory_budget, (int, float)):
        check_number("memory_budget", memory_budget, min=0, min_open=True)
    return dtype


def check_folder(path: str | Path) -> Path:
    """``path`` as a folder holding a config.json, or a :class:`LoadError` saying what it is instead."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise LoadError(f"{path}: no such folder (mlx_gptoss.load also takes a Hugging Face repo id)")
    if not (p / "config.json").is_file():
        raise LoadError(f"{p}: no config.json")
    return p


def load(
    path: str | Path,
    *,
    dtype: Any = None,
    lazy: bool = True,
    memory_budget: str | int | MemoryPlan | None = None,
    context: int = 8192,
    prefetch: bool = True,
    verbose: bool = False,
    cls: type[GptOss] = GptOss,
) -> GptOss:
    """Load the converted checkpoint in folder ``path`` (see :func:`mlx_gptoss.load` for repo ids and adapters).

    Args:
        dtype: dtype of everything that is not an MXFP4 expert (default ``mx.bfloat16``;
            ``mx.float32`` for verification; ``"float32"`` and the other names work too).
        lazy: read weights on first use (default). ``False`` reads them all now. MLX evaluates a
            lazy array only in the thread that built it: to use the model from another thread,
            load it there, or load with ``lazy=False`` (a chat session reads them when created).
        memory_budget: keep MLX's memory under this ("9.5GB", bytes, or a plan made by
            :mod:`mlx_gptoss.memory`): the embedding is served from the file on the host, and when
            the MXFP4 experts do not fit, only some expert slots per layer stay resident and the
            rest are read from disk on demand (exact: the same computation). ``model.memory_plan``
            says what lives where, ``model.stream_stats`` how the expert cache does. Raises
            :class:`~mlx_gptoss.memory.BudgetError` when the budget cannot be met.
        context: the longest conversation (prompt + generated tokens) the budget must allow for
            (an integer >= 1).
        prefetch: read the experts the next layer will probably need while this one computes.
        verbose: print the memory plan to stderr.
        cls: the model class to build (a subclass of :class:`~mlx_gptoss.model.GptOss`; the
            facade's adds conveniences such as ``chat()``).

    Returns the model with ``.config``, ``.tokenizer`` and ``.path``. Nothing is read from disk
    until it is used (unless ``lazy=False``), but the weight files are held open from here on: a
    folder replaced later (``convert --force``) does not change a loaded model. A bad ``dtype``,
    ``memory_budget`` or ``context`` raises :class:`~mlx_gptoss.options.OptionError` naming it.
    """
    dtype = check_load_options(dtype, memory_budget, context)
    path = check_folder(path)
    config = read_config(path)
    model = cls(config)
    expected = dict(tree_flatten(model.parameters()))
    # the lazy loads, the host embedding and the expert reader each open the shards; all must be
    # the files planned from (held open after this, so a later replacement cannot reach them)
    shards = {f: _file_id(f) for f in shard_files(path)}
    weights = load_weights(path, expected)
    weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype else v for k, v in weights.items()}
    model.update(tree_unflatten(list(weights.items())))
    model.memory_plan = None
    model.stream_stats = None
    if memory_budget is not None:
        _apply_budget(model, path, memory_budget, context, dtype, prefetch, verbose)
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


def _apply_budget(model: GptOss, path: Path, budget: Any, context: int, dtype: Any, prefetch: bool, verbose: bool) -> None:
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
