"""Linear and embedding layers whose storage is chosen at conversion (float or quantized), and
an embedding served from the checkpoint file on the host instead of MLX memory."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import kernels
from .config import QuantSpec
from .safetensors_io import NUMPY_DTYPE


class QuantLinear(nn.Module):
    """``x @ W.T (+ bias)`` with W stored quantized (``mx.quantize`` layout)."""

    def __init__(self, d_in: int, d_out: int, bias: bool, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        self.weight = mx.zeros((d_out, d_in * spec.bits // 32), dtype=mx.uint32)
        self.scales = mx.zeros((d_out, d_in // spec.group_size), dtype=mx.uint8 if spec.mode == "mxfp8" else mx.float32)
        if spec.mode == "affine":
            self.biases = mx.zeros((d_out, d_in // spec.group_size))
        if bias:
            self.bias = mx.zeros((d_out,))

    def __call__(self, x: mx.array) -> mx.array:
        s = self.spec
        y = kernels.quantized_matmul(
            x, self.weight, self.scales, self.get("biases"), group_size=s.group_size, bits=s.bits, mode=s.mode
        )
        return y + self.bias if "bias" in self else y


def linear(d_in: int, d_out: int, bias: bool, spec: QuantSpec | None) -> nn.Module:
    return nn.Linear(d_in, d_out, bias=bias) if spec is None else QuantLinear(d_in, d_out, bias, spec)


def embedding(vocab: int, dims: int, spec: QuantSpec | None) -> nn.Module:
    if spec is None:
        return nn.Embedding(vocab, dims)
    emb = nn.QuantizedEmbedding(vocab, dims, group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
    if spec.mode == "mxfp8":
        emb.scales = mx.zeros(emb.scales.shape, dtype=mx.uint8)
    return emb


class HostEmbedding:
    """The embedding table read from the checkpoint file through a memory map.

    A token's lookup touches one row, so the 0.3-1.2 GB table need not sit in MLX (GPU) memory:
    rows are gathered on the host and only they become MLX arrays. The map is taken here, at load:
    a file renamed over the checkpoint's later (``convert --force``) does not reach it.
    """

    def __init__(self, tensors: dict, dtype: mx.Dtype, spec: QuantSpec | None):
        self.spec, self.dtype = spec, dtype
        self._maps = {k: _memmap(info) for k, info in tensors.items()}

    def __call__(self, ids: mx.array) -> mx.array:
        rows = np.asarray(ids).reshape(-1)
        got = {k: mx.array(np.ascontiguousarray(m[rows])) for k, m in self._maps.items()}
        w = got["weight"]
        if self.spec is None:
            out = w.view(mx.bfloat16) if self._maps["weight"].dtype == np.uint16 else w
        else:
            scales, biases = got["scales"], got.get("biases")
            if scales.dtype == mx.uint16:  # bf16 bits; dequantize at the model's dtype, as the resident layer does
                scales = scales.view(mx.bfloat16).astype(self.dtype)
            if biases is not None:
                biases = (biases.view(mx.bfloat16) if biases.dtype == mx.uint16 else biases).astype(self.dtype)
            out = mx.dequantize(w, scales, biases, group_size=self.spec.group_size, bits=self.spec.bits, mode=self.spec.mode)
        return out.astype(self.dtype).reshape(*ids.shape, -1)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self._maps.values())


def _memmap(info) -> np.memmap:

    return np.memmap(Path(info.file), dtype=NUMPY_DTYPE[info.dtype], mode="r", offset=info.begin, shape=info.shape)
