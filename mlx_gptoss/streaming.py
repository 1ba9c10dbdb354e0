"""Expert streaming: a fixed number of expert slots per layer, filled from the checkpoint on demand.

The router's choice reaches the host once per layer (one sync for all tokens and experts); the
experts it needs that are not resident are read from the safetensors file by offset (no whole-file
load) into slots, least recently used first; the dispatch kernels then run unchanged on slot
ids. While a layer computes, a background thread reads the experts the next layer's router is
likely to pick (predicted from this layer's input), so the read often overlaps compute.
A failed read raises :class:`ExpertReadError` (file, layer, expert) and leaves every slot as it
was; slot writes are evaluated before a layer returns and slot changes happen under one lock,
so no lazy MLX state outlives a call and several threads may use the model.
Shape legend: N tokens, K experts per token, S slots, H hidden, I intermediate.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import kernels
from .model import MoE
from .safetensors_io import NUMPY_DTYPE, TensorInfo

PARTS = ("gate_up.weight", "gate_up.scales", "gate_up.bias", "down.weight", "down.scales", "down.bias")


@dataclass
class StreamStats:
    """Expert-cache statistics, per layer and in total."""

    hits: list[int]
    misses: list[int]
    prefetched: list[int]  # misses whose bytes a prefetch had already read
    bytes_read: int = 0
    stall_s: float = 0.0  # time the forward pass waited for expert bytes
    tokens: int = 0

    @classmethod
    def empty(cls, layers: int) -> StreamStats:
        return cls([0] * layers, [0] * layers, [0] * layers)

    def hit_rate(self, layer: int | None = None) -> float:
        h = sum(self.hits) if layer is None else self.hits[layer]
        m = sum(self.misses) if layer is None else self.misses[layer]
        return h / (h + m) if h + m else 1.0

    def reset(self) -> None:
        """Start counting afresh (e.g. after the prefill, to see the decode-phase hit rate)."""
        n = len(self.hits)
        self.hits, self.misses, self.prefetched = [0] * n, [0] * n, [0] * n
        self.bytes_read, self.stall_s, self.tokens = 0, 0.0, 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "hit_rate": self.hit_rate(),
            "hit_rate_per_layer": [self.hit_rate(i) for i in range(len(self.hits))],
            "bytes_read_per_token": self.bytes_read / self.tokens if self.tokens else 0.0,
            "stall_s": self.stall_s,
            "prefetched_misses": sum(self.prefetched),
            "tokens": self.tokens,
        }


class ExpertReadError(OSError):
    """Reading a streamed expert from the checkpoint failed; the message names file, layer and expert."""


def _read_error(file, layer: int, expert: int, err: BaseException) -> ExpertReadError:
    why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return ExpertReadError(f"{file}: reading expert {expert} of layer {layer} failed: {why}")


class ExpertReader:
    """Reads one expert's tensors of one layer straight from the checkpoint files (pread).

    The files are opened here, at load time, and held: a folder replaced afterwards (a
    conversion renaming new files over the old names) cannot make the offsets planned from the
    old headers read the new files' bytes.
    """

    def __init__(self, tensors: dict[str, TensorInfo], layers: int):
        self.info = {(i, p): tensors[f"layers.{i}.mlp.{p}"] for i in range(layers) for p in PARTS}
        self._fds: dict[Any, int] = {}
        try:
            for f in sorted({info.file for info in self.info.values()}):
                self._fds[f] = os.open(f, os.O_RDONLY)
        except OSError:
            _close_fds(self._fds)
            raise
        weakref.finalize(self, _close_fds, self._fds)  # the descriptors go with the model

    def read(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        """The expert's six tensors as numpy arrays (no MLX arrays: this runs in the prefetch thread)."""
        out = {}
        for p in PARTS:
            info = self.info[(layer, p)]
            per = info.nbytes // info.shape[0]
            try:
                raw = os.pread(self._fds[info.file], per, info.begin + expert * per)
            except KeyError:
                raise ExpertReadError(f"{info.file}: the expert reader is closed") from None
            except OSError as e:
                raise _read_error(info.file, layer, expert, e) from e
            if len(raw) != per:
                raise _read_error(info.file, layer, expert, EOFError("the file is truncated"))
            out[p] = np.frombuffer(raw, dtype=NUMPY_DTYPE[info.dtype]).reshape(info.shape[1:])
        return out

    def expert_nbytes(self, layer: int = 0) -> int:
        return sum(self.info[(layer, p)].nbytes // self.info[(layer, p)].shape[0] for p in PARTS)

    def close(self) -> None:
        _close_fds(self._fds)


def _close_fds(fds: dict[Any, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


@dataclass
class _Shared:
    """What all streamed layers share: the reader, the prefetch thread, statistics."""

    reader: ExpertReader
    stats: StreamStats
    pool: ThreadPoolExecutor | None
    layers: list[StreamedMoE] = field(default_factory=list)
    # the slot bookkeeping of all layers (slot maps, staged reads) is changed by one thread at a time
    lock: threading.RLock = field(default_factory=threading.RLock)
    # For measurements only: (layer, router logits [N, E]) -> expert ids [N, K], e.g. a routing
    # trace with realistic skew in place of random weights' nearly uniform choice.
    route: Any = None


class StreamedMoE(nn.Module):
    """Drop-in for :class:`~mlx_gptoss.model.MoE` with S resident expert slots per layer."""

    def __init__(self, moe: nn.Module, layer: int, slots: int, shared: _Shared, float_dtype: mx.Dtype):
        super().__init__()
        self.router = moe.router
        # the adapters' seam, as on MoE: its delta is indexed by expert, the slots by slot (see _delta)
        self.experts_lora: nn.Module | None = moe.experts_lora
        self.k, self.limit, self.alpha = moe.k, moe.limit, moe.alpha
        self._layer, self._shared, self._dtype = layer, shared, float_dtype
        g, d = moe.gate_up, moe.down
        E = g.weight.shape[0]
        self._E, self._S = E, slots
        # the slots: the same layout as the resident experts, S of them instead of E
        self._w = {
            "gate_up.weight": mx.zeros((slots, *g.weight.shape[1:]), g.weight.dtype),
            "gate_up.scales": mx.zeros((slots, *g.scales.shape[1:]), g.scales.dtype),
            "gate_up.bias": mx.zeros((slots, *g.bias.shape[1:]), float_dtype),
            "down.weight": mx.zeros((slots, *d.weight.shape[1:]), d.weight.dtype),
            "down.scales": mx.zeros((slots, *d.scales.shape[1:]), d.scales.dtype),
            "down.bias": mx.zeros((slots, *d.bias.shape[1:]), float_dtype),
        }
        mx.eval(list(self._w.values()))
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recent first
        self._free = list(range(slots))
        self._staged: dict[int, Future] = {}

    # -- slots ----------------------------------------------------------------------------------

    def _write(self, slot: int, data: dict[str, np.ndarray]) -> None:
        for p, arr in data.items():
            a = mx.array(arr)
            if p.endswith(".bias"):
                a = (a.view(mx.bfloat16) if arr.dtype == np.uint16 else a).astype(self._dtype)
            self._w[p][slot] = a  # in place: the slot arrays have no other reference

    def _ensure(self, needed: list[int], protect: set[int]) -> None:
        """Make every expert in ``needed`` resident, evicting least-recent ones not in ``protect``.

        The slots are evaluated before this returns, also when a read fails: no lazy write is left
        for a later generation, perhaps in another thread (MLX evaluates an array only in the
        thread whose stream built it).
        """
        sh = self._shared
        dirty = False
        try:
            for e in needed:
                if e in self._slot_of:
                    self._slot_of.move_to_end(e)
                    sh.stats.hits[self._layer] += 1
                    continue
                sh.stats.misses[self._layer] += 1
                data = self._fetch(e)  # before a slot is taken, so a failed read changes no slot
                slot = self._take_slot(protect)
                dirty = True
                try:
                    self._write(slot, data)
                    # one expert's copy alive at a time, not every expert this call reads
                    mx.eval(*(self._w[p] for p in data))
                except BaseException:
                    self._free.append(slot)  # half written: empty, not the evicted expert's
                    raise
                self._slot_of[e] = slot
        finally:
            if dirty:
                mx.eval(list(self._w.values()))

    def _fetch(self, e: int) -> dict[str, np.ndarray]:
        sh = self._shared
        t = time.perf_counter()
        fut = self._staged.pop(e, None)
        try:
            if fut is not None and not fut.cancelled():
                data = fut.result()
                sh.stats.prefetched[self._layer] += 1
            else:
                data = sh.reader.read(self._layer, e)
        except ExpertReadError:
            raise
        except OSError as err:  # a reader that failed without naming the file
            raise _read_error(sh.reader.info[(self._layer, PARTS[0])].file, self._layer, e, err) from err
        sh.stats.stall_s += time.perf_counter() - t
        sh.stats.bytes_read += sh.reader.expert_nbytes(self._layer)
        return data

    def _take_slot(self, protect: set[int]) -> int:
        if self._free:
            return self._free.pop()
        victim = next((v for v in self._slot_of if v not in protect), None)
        if victim is None:
            raise RuntimeError(f"layer {self._layer}: all {self._S} expert slots are in use by this step")
        return self._slot_of.pop(victim)

    def prefetch(self, experts: list[int]) -> None:
        """Start reading experts this layer will probably need (into host memory)."""
        pool = self._shared.pool
        if pool is None:
            return
        for e in experts:
            if e not in self._slot_of and e not in self._staged and len(self._staged) < 2 * self.k:
                self._staged[e] = pool.submit(self._shared.reader.read, self._layer, e)

    # -- forward --------------------------------------------------------------------------------

    def __call__(self, x: mx.array, residual: mx.array | None = None, tap: Any = None) -> mx.array:
        with self._shared.lock:
            try:
                y = self._forward(x, tap)
            except BaseException:
                for layer in self._shared.layers:  # no read staged by a failed step reaches the next one
                    layer._drop_staged()
                raise
            self._drop_staged()  # guesses that did not come true
        return y if residual is None else residual + y

    def _drop_staged(self) -> None:
        for fut in self._staged.values():
            fut.cancel()
        self._staged.clear()

    def _forward(self, x: mx.array, tap: Any = None) -> mx.array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, H]
        logits = self.router(x)
        if tap is not None:  # the research hooks' points, as in model.MoE
            logits = tap("router.logits", logits)
        indices, weights = kernels.route_topk_softmax(logits, self.k)
        if self._shared.route is not None:
            indices = self._shared.route(self._layer, logits).astype(mx.uint32)
            weights = mx.softmax(mx.take_along_axis(logits, indices.astype(mx.int32), axis=-1), axis=-1, precise=True)
        if tap is not None:
            indices, weights = tap("router.topk", (indices, weights))
        nxt = self._next_layer()
        guess = None
        if nxt is not None:
            guess = kernels.route_topk_softmax(nxt.router(x), self.k)[0]  # cheap guess for layer + 1
        mx.eval(indices, weights, *(() if guess is None else (guess,)))  # the one host sync of this layer
        ids = np.array(indices)
        if guess is not None:
            nxt.prefetch([int(e) for e, _ in sorted(zip(*np.unique(np.array(guess), return_counts=True)), key=lambda t: -t[1])])
        self._shared.stats.tokens += ids.shape[0] if self._layer == 0 else 0
        uniq = [int(e) for e in np.unique(ids)]
        if len(uniq) <= self._S:
            self._ensure(uniq, set(uniq))
            y = self._dispatch(x, ids, weights)
        else:
            y = self._grouped(x, ids, weights, uniq)
        return y.reshape(shape)

    def _slots(self, ids: np.ndarray) -> mx.array:
        lut = np.zeros(self._E, dtype=np.uint32)
        for e, s in self._slot_of.items():
            lut[e] = s
        return mx.array(lut[ids])

    def _delta(self) -> kernels.ExpertsDelta | None:
        """The adapters' update re-indexed by slot (slot s: its resident expert's A and B).

        A gather from the full [E, ...] arrays, so gradients reach them; it is taken when the
        kernels are called, from the experts then resident, so a recomputation in the backward
        pass (gradient checkpointing) pairs each slot with the expert it holds at that time.
        """
        if self.experts_lora is None:
            return None
        expert_of = np.zeros(self._S, dtype=np.uint32)  # a free slot is never indexed: any expert will do
        for e, s in self._slot_of.items():
            expert_of[s] = e
        return self.experts_lora.delta().select(mx.array(expert_of))

    def _dispatch(self, x: mx.array, ids: np.ndarray, weights: mx.array) -> mx.array:
        w = self._w
        return kernels.moe_mxfp4_swiglu(
            x, self._slots(ids), weights, w["gate_up.weight"], w["gate_up.scales"], w["gate_up.bias"],
            w["down.weight"], w["down.scales"], w["down.bias"], limit=self.limit, alpha=self.alpha, delta=self._delta(),
        )  # fmt: skip

    def _grouped(self, x: mx.array, ids: np.ndarray, weights: mx.array, uniq: list[int]) -> mx.array:
        """More distinct experts than slots (long prefill chunks at small budgets): S at a time."""
        w = self._w
        N, K = ids.shape
        per_pair = mx.zeros((N, K, x.shape[-1]), dtype=mx.float32)
        for start in range(0, len(uniq), self._S):
            group = uniq[start : start + self._S]
            self._ensure(group, set(group))
            n_idx, k_idx = np.nonzero(np.isin(ids, group))
            y = kernels.moe_mxfp4_pairs(
                x[mx.array(n_idx)], self._slots(ids[n_idx, k_idx])[:, None], w["gate_up.weight"], w["gate_up.scales"],
                w["gate_up.bias"], w["down.weight"], w["down.scales"], w["down.bias"], limit=self.limit, alpha=self.alpha,
                delta=self._delta(),
            )  # fmt: skip
            per_pair[mx.array(n_idx), mx.array(k_idx)] = y[:, 0].astype(mx.float32)
            mx.eval(per_pair)  # the next group may overwrite these slots
        return kernels.combine_experts(per_pair, weights).astype(x.dtype)

    def _next_layer(self) -> StreamedMoE | None:
        layers = self._shared.layers
        return layers[self._layer + 1] if self._layer + 1 < len(layers) else None


def stream_experts(model: nn.Module, tensors: dict[str, TensorInfo], slots: int, *, prefetch: bool = True) -> StreamStats:
    """Replace every layer's MoE by a :class:`StreamedMoE` with ``slots`` resident experts."""
    L = model.config.num_hidden_layers
    shared = _Shared(ExpertReader(tensors, L), StreamStats.empty(L), ThreadPoolExecutor(1) if prefetch else None)
    dtype = model.layers[0].input_layernorm.weight.dtype  # the router may be stored quantized
    for i, layer in enumerate(model.layers):
        if not isinstance(layer.mlp, MoE):
            raise TypeError("experts are already streamed")
        layer.mlp = StreamedMoE(layer.mlp, i, slots, shared, dtype)
        shared.layers.append(layer.mlp)
    return shared.stats


def set_routing_trace(model: nn.Module, route: Any) -> None:
    """For measurements: route with ``route(layer, logits [N, E]) -> ids [N, K]`` instead of the
    router's top-k (e.g. a trace with realistic skew, since random weights route uniformly)."""
    layers = [layer.mlp for layer in model.layers if isinstance(layer.mlp, StreamedMoE)]
    if not layers:
        raise TypeError("the model's experts are not streamed (load it with a memory budget)")
    layers[0]._shared.route = route
