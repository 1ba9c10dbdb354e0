"""MXFP4 as stored and as computed, against an independent reading of the OCP MX spec."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_gptoss.testing import dequantize_mxfp4


def e2m1_spec(code: int) -> float:
    """OCP MX v1.0 FP4 E2M1: 1 sign, 2 exponent (bias 1), 1 mantissa bit; exponent 0 is subnormal."""
    sign = -1.0 if code & 0b1000 else 1.0
    exp, man = (code >> 1) & 0b11, code & 1
    mag = man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man / 2)
    return sign * mag


def spec_dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Element k of a row: byte (k mod 32)//2 of group k//32, low nibble when k is even."""
    rows, groups = scales.shape
    out = np.zeros((rows, groups * 32), dtype=np.float64)
    for r in range(rows):
        for k in range(groups * 32):
            byte = int(blocks[r, k // 32, (k % 32) // 2])
            code = byte & 0xF if k % 2 == 0 else byte >> 4
            out[r, k] = e2m1_spec(code) * 2.0 ** (int(scales[r, k // 32]) - 127)
    return out


@pytest.fixture(scope="module")
def all_codes():
    # Every (low, high) nibble pair appears, under scales spanning a wide exponent range.
    rng = np.random.default_rng(0)
    pairs = np.arange(256, dtype=np.uint8)
    blocks = np.concatenate([pairs, rng.integers(0, 256, 256 * 3, dtype=np.uint8)]).reshape(32, 2, 16)
    scales = np.linspace(127 - 60, 127 + 60, 64).astype(np.uint8).reshape(32, 2)
    return blocks, scales


def test_e2m1_table_is_the_spec():
    assert [e2m1_spec(c) for c in range(16)] == [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]


def test_reference_dequantizer_matches_spec(all_codes):
    blocks, scales = all_codes
    np.testing.assert_array_equal(dequantize_mxfp4(blocks, scales), spec_dequantize(blocks, scales))


def test_mlx_mxfp4_reads_released_blocks_bit_exactly(all_codes):
    """Released blocks viewed as little-endian u32 are MLX's mxfp4 packing: same values, bitwise."""
    blocks, scales = all_codes
    w = mx.array(np.ascontiguousarray(blocks).view(np.uint32).reshape(32, 8))
    s = mx.array(scales)
    ours = np.array(mx.dequantize(w, s, group_size=32, bits=4, mode="mxfp4", dtype=mx.float32))
    np.testing.assert_array_equal(ours, spec_dequantize(blocks, scales).astype(np.float32))
    # the zero sign survives too (code 8 is -0)
    assert np.array_equal(np.signbit(ours), np.signbit(spec_dequantize(blocks, scales)))


def test_gather_qmm_uses_the_same_values(all_codes):
    """The matmul the model runs sees exactly the spec's weights (identity input extracts W)."""
    blocks, scales = all_codes
    w = mx.array(np.ascontiguousarray(blocks).view(np.uint32).reshape(1, 32, 8))
    s = mx.array(scales[None])
    eye = mx.eye(64, dtype=mx.float32)[:, None, :]  # [64, 1, 64]
    idx = mx.zeros((64, 1), dtype=mx.uint32)
    cols = mx.gather_qmm(eye[:, None], w, s, rhs_indices=idx, transpose=True, group_size=32, bits=4, mode="mxfp4")
    got = np.array(cols).reshape(64, 32).T
    np.testing.assert_array_equal(got, spec_dequantize(blocks, scales).astype(np.float32))


def test_quantizing_representable_values_is_lossless(all_codes):
    """Dense experts (fine-tuned exports) are quantized with mx.quantize: exact on MXFP4 values."""
    blocks, scales = all_codes
    dense = spec_dequantize(blocks, scales).astype(np.float32)
    q, sc = mx.quantize(mx.array(dense), group_size=32, bits=4, mode="mxfp4")
    back = np.array(mx.dequantize(q, sc, group_size=32, bits=4, mode="mxfp4", dtype=mx.float32))
    np.testing.assert_array_equal(back, dense)
