"""Contracts of the file formats: safetensors headers, the shard index, config.json.

Each malformed file is built by hand and must be refused with one clear error naming the file
and the field, by every entry point (converter, loader, doctor), before anything is written.
Where the reference ``safetensors`` library has an opinion, it must refuse the file too.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY

import mlx_gptoss
from mlx_gptoss.config import ConfigError, GptOssConfig
from mlx_gptoss.memory import BudgetError, plan_memory
from mlx_gptoss.safetensors_io import SafetensorsError, read_header, read_index
from mlx_gptoss_convert import convert
from mlx_gptoss_convert.source import ConversionError

safetensors = pytest.importorskip("safetensors")


def st_file(path: Path, header, data: bytes = b"", *, n: int | None = None) -> Path:
    """A safetensors file from a header (a JSON value, or raw bytes) and data, byte by byte."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return path


def f32(b: int, e: int, shape: list) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [b, e]}


# name: (header, data, header length or None, a phrase our message must contain, reference refuses it)
HEADERS = {
    "overlap": ({"a": f32(0, 8, [2]), "b": f32(4, 12, [2])}, bytes(12), None, "overlaps tensor 'a'", True),
    "gap": ({"a": f32(0, 4, [1]), "b": f32(8, 12, [1])}, bytes(12), None, "gap of 4 bytes", True),
    "gap_at_start": ({"a": f32(4, 8, [1])}, bytes(8), None, "gap of 4 bytes after the header", True),
    "out_of_range": ({"a": f32(0, 8, [2])}, bytes(4), None, "truncated", True),
    "trailing_bytes": ({"a": f32(0, 4, [1])}, bytes(8), None, "4 bytes after the last tensor", True),
    "float_offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}, bytes(4), None, "data_offsets", True),
    "string_offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, bytes(4), None, "data_offsets", True),
    "three_offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, bytes(4), None, "data_offsets", True),
    "reversed_offsets": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}}, bytes(4), None, "end before", True),
    "float_shape": ({"a": f32(0, 4, [1.0])}, bytes(4), None, "shape", True),
    "bool_shape": ({"a": f32(0, 4, [True])}, bytes(4), None, "shape", True),
    "negative_dims": ({"a": f32(0, 16, [-1, -4])}, bytes(16), None, "shape", True),
    "shape_not_list": ({"a": f32(0, 4, 1)}, bytes(4), None, "shape", True),
    "header_list": ([], b"", None, "must be a JSON object", True),
    "header_string": ("weights", b"", None, "must be a JSON object", True),
    "entry_list": ({"a": [0, 4]}, bytes(4), None, "'a': expected an object", True),
    "entry_missing_dtype": ({"a": {"shape": [1], "data_offsets": [0, 4]}}, bytes(4), None, "no 'dtype'", True),
    "unknown_dtype": ({"a": {"dtype": "F17", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), None, "unsupported dtype 'F17'", True),
    "size_mismatch": ({"a": f32(0, 4, [2])}, bytes(4), None, "expected 8 for F32 [2]", True),
    "header_beyond_file": ({"a": f32(0, 4, [1])}, bytes(4), 10_000, "header of 10000 bytes", True),
    "header_huge": ({}, b"", 1 << 40, "not safetensors", True),
    "not_utf8": (b'{"a\xff": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(4), None, "not UTF-8", True),
    "not_json": (b'{"a": ', b"", None, "not valid JSON", True),
    "nan_offset": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, NaN]}}', bytes(4), None, "data_offsets", True),
    "metadata_list": ({"__metadata__": ["x"], "a": f32(0, 4, [1])}, bytes(4), None, "__metadata__", True),
    "metadata_not_str": ({"__metadata__": {"format": 1}, "a": f32(0, 4, [1])}, bytes(4), None, "__metadata__['format']", True),
    # Ambiguous (which entry is meant?): the reference keeps one silently, we refuse.
    "duplicate_name": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                       b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(4), None, "twice", None),
}  # fmt: skip


def reference_refuses(path: Path) -> bool:
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:  # opening checks the whole header
            for k in f.keys():
                f.get_slice(k).get_shape()
    except Exception:  # the reference raises several types (SafetensorError, OverflowError, ...)
        return True
    return False


@pytest.mark.parametrize("case", list(HEADERS))
def test_malformed_header_is_refused(case, tmp_path):
    header, data, n, phrase, ref = HEADERS[case]
    f = st_file(tmp_path / f"{case}.safetensors", header, data, n=n)
    with pytest.raises(SafetensorsError) as e:
        read_header(f)
    assert f.name in str(e.value) and phrase in str(e.value), str(e.value)
    if ref is not None:
        assert reference_refuses(f) == ref


@pytest.mark.parametrize("size", [0, 5])
def test_file_shorter_than_a_header_length(size, tmp_path):
    f = tmp_path / "short.safetensors"
    f.write_bytes(bytes(size))
    with pytest.raises(SafetensorsError, match="short.safetensors: truncated"):
        read_header(f)
    assert reference_refuses(f)


def test_valid_file_both_accept(tmp_path):
    header = {"__metadata__": {"format": "pt"}, "b": {"dtype": "BF16", "shape": [2, 1], "data_offsets": [8, 12]},
              "a": f32(0, 8, [2]), "empty": {"dtype": "U8", "shape": [0, 3], "data_offsets": [12, 12]}}  # fmt: skip
    f = st_file(tmp_path / "ok.safetensors", header, bytes(range(12)))
    tensors, meta = read_header(f)
    assert meta == {"format": "pt"} and not reference_refuses(f)
    assert tensors["a"].read_bytes() == bytes(range(8)) and tensors["b"].shape == (2, 1) and tensors["empty"].nbytes == 0
    with safetensors.safe_open(str(f), framework="numpy") as ref:
        assert set(ref.keys()) == set(tensors) and ref.metadata() == meta


# -- every reader goes through read_header -----------------------------------------------------


def negative_dims(f: Path) -> None:
    """Rewrite the first tensor's shape with two negative dims (same product, so the size still matches)."""
    tensors, meta = read_header(f)
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__" and len(header[k]["shape"]) == 2)
    header[name]["shape"] = [-d for d in header[name]["shape"]]
    st_file(f, header, raw[8 + n :])


def copy(src: Path, tmp_path: Path, name: str = "src") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def doctor(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_gptoss.cli", "doctor", "-m", str(path)], capture_output=True, text=True)


def assert_clean_failure(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    for n in needles:
        assert n in out.stderr, (n, out.stderr)


def test_converter_refuses_a_malformed_header_and_writes_nothing(releases, tmp_path):
    src = copy(releases["hf"], tmp_path)
    f = sorted(src.glob("*.safetensors"))[0]
    negative_dims(f)
    with pytest.raises(ConversionError, match=f"{f.name}: tensor .*shape"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_loader_and_doctor_refuse_a_malformed_header(tiny_model_dir, tmp_path):
    m = copy(tiny_model_dir, tmp_path, "m")
    f = sorted(m.glob("*.safetensors"))[0]
    negative_dims(f)
    with pytest.raises(ValueError, match=f"{f.name}: tensor .*shape"):
        mlx_gptoss.load(m)
    assert_clean_failure(doctor(m), f.name, "shape")


# -- the shard index ---------------------------------------------------------------------------


INDEXES = {
    "not_json": ('{"weight_map": ', "not valid JSON"),
    "list": ("[]", "expected a JSON object"),
    "no_weight_map": ('{"metadata": {}}', "weight_map must be"),
    "weight_map_list": ('{"weight_map": ["a.safetensors"]}', "weight_map must be"),
    "weight_map_empty": ('{"weight_map": {}}', "weight_map must be"),
    "file_not_str": ('{"weight_map": {"w": 3}}', "weight_map['w']"),
    "parent_dir": ('{"weight_map": {"w": "../x.safetensors"}}', "weight_map['w']"),
    "sub_dir": ('{"weight_map": {"w": "sub/x.safetensors"}}', "weight_map['w']"),
    "absolute": ('{"weight_map": {"w": "/tmp/x.safetensors"}}', "weight_map['w']"),
    "backslash": ('{"weight_map": {"w": "..\\\\x.safetensors"}}', "weight_map['w']"),
    "not_safetensors": ('{"weight_map": {"w": "x.bin"}}', "weight_map['w']"),
    "metadata_list": ('{"metadata": [], "weight_map": {"w": "x.safetensors"}}', "metadata must be"),
}


@pytest.mark.parametrize("case", list(INDEXES))
def test_malformed_index_is_refused(case, tmp_path):
    text, phrase = INDEXES[case]
    f = tmp_path / "model.safetensors.index.json"
    f.write_text(text)
    with pytest.raises(SafetensorsError) as e:
        read_index(f)
    assert str(f) in str(e.value) and phrase in str(e.value), str(e.value)


def test_index_not_utf8(tmp_path):
    f = tmp_path / "model.safetensors.index.json"
    f.write_bytes(b'{"weight_map": {"w\xff": "a.safetensors"}}')
    with pytest.raises(SafetensorsError, match="not UTF-8"):
        read_index(f)


@pytest.mark.parametrize("case", ["weight_map_list", "parent_dir"])
def test_converter_and_loader_check_the_index(case, releases, tiny_model_dir, tmp_path):
    text, phrase = INDEXES[case]
    src = copy(releases["hf"], tmp_path)
    (src / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ConversionError, match="index.json: " + phrase.split("[")[0]):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    m = copy(tiny_model_dir, tmp_path, "m")
    (m / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ValueError, match="index.json: " + phrase.split("[")[0]):
        mlx_gptoss.load(m)


# -- config.json -------------------------------------------------------------------------------


NAN = float("nan")
ROPE = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "original_max_position_embeddings": 4096,
    "truncate": False,
}
# name: (key, value, a phrase our message must contain)
CONFIGS = {
    "int_as_string": ("hidden_size", "64", "hidden_size must be an integer"),
    "int_as_bool": ("num_hidden_layers", True, "num_hidden_layers must be an integer"),
    "int_as_float": ("num_hidden_layers", 4.0, "num_hidden_layers must be an integer"),
    "zero_kv_heads": ("num_key_value_heads", 0, "num_key_value_heads must be an integer >= 1"),
    "zero_heads": ("num_attention_heads", 0, "num_attention_heads must be an integer >= 1"),
    "negative_vocab": ("vocab_size", -1, "vocab_size must be an integer >= 1"),
    "zero_window": ("sliding_window", 0, "sliding_window must be an integer >= 1"),
    "zero_experts_per_tok": ("num_experts_per_tok", 0, "num_experts_per_tok"),
    "float_as_string": ("rms_norm_eps", "1e-5", "rms_norm_eps must be a finite number"),
    "nan": ("rms_norm_eps", NAN, "rms_norm_eps must be a finite number"),
    "inf": ("rope_theta", float("inf"), "rope_theta must be a finite number"),
    "negative_limit": ("swiglu_limit", -7.0, "swiglu_limit must be a positive"),
    "layer_types_string": ("layer_types", "sliding_attention", "layer_types must be a list"),
    "layer_types_ints": ("layer_types", [0, 1, 0, 1], "layer_types must be a list"),
    "layer_types_length": ("layer_types", ["full_attention"] * 3, "layer_types has 3 entries"),
    "layer_types_unknown": ("layer_types", ["full_attention"] * 3 + ["local"], "unknown entries ['local']"),
    "eos_string": ("eos_token_id", "</s>", "eos_token_id must be a token id"),
    "eos_list_of_mixed": ("eos_token_id", [1, "x"], "eos_token_id must be a token id"),
    "pad_negative": ("pad_token_id", -1, "pad_token_id must be a token id"),
    "rope_not_object": ("rope_scaling", "yarn", "rope_scaling must be an object"),
    "rope_factor_string": ("rope_scaling", {**ROPE, "factor": "32"}, "rope_scaling.factor must be a finite number"),
    "rope_unknown_key": ("rope_scaling", {**ROPE, "mscale": 1.0}, "rope_scaling: unknown key 'mscale'"),
    "rope_zero_context": ("rope_scaling", {**ROPE, "original_max_position_embeddings": 0}, "original_max_position_embeddings must be a positive"),
    "rope_truncate_string": ("rope_scaling", {**ROPE, "truncate": "no"}, "rope_scaling.truncate must be true or false"),
    "rope_type": ("rope_scaling", {**ROPE, "rope_type": "linear"}, "rope_type 'linear' is not supported"),
    "quant_not_object": ("quantization", [8], "quantization must be an object"),
    "quant_spec_int": ("quantization", {"attention": 8}, "quantization.attention must be an object"),
    "quant_unknown_key": ("quantization", {"attention": {"bits": 8, "scale": 2}}, "quantization.attention: unknown key 'scale'"),
    "quant_bits_string": ("quantization", {"attention": {"bits": "8"}}, "quantization.attention.bits must be an integer"),
    "quant_bits": ("quantization", {"attention": {"bits": 5}}, "quantization.attention: unsupported quantization affine 5-bit"),
    "quant_group": ("quantization", {"lm_head": {"bits": 8, "group_size": 7}}, "quantization.lm_head: affine quantization uses groups"),
    "quant_component": ("quantization", {"mlp": {"bits": 8}}, "unknown components ['mlp']"),
    "format_not_object": ("mlx_gptoss", "mlx-gptoss", "mlx_gptoss must be an object"),
    "format_unknown_key": ("mlx_gptoss", {"format": "mlx-gptoss", "format_version": 1, "flavour": "x"}, "mlx_gptoss: unknown key 'flavour'"),
    "format_version_string": ("mlx_gptoss", {"format": "mlx-gptoss", "format_version": "1"}, "mlx_gptoss.format_version must be an integer"),
}  # fmt: skip


def bad_config(path: Path, key: str, value) -> Path:
    cfg = json.loads(path.read_text())
    cfg[key] = value
    path.write_text(json.dumps(cfg))  # NaN and Infinity are written as the bare words Python reads back
    return path


@pytest.mark.parametrize("case", list(CONFIGS))
def test_malformed_config_is_refused(case, tiny_model_dir, tmp_path):
    key, value, phrase = CONFIGS[case]
    f = tmp_path / "config.json"
    shutil.copy(tiny_model_dir / "config.json", f)
    bad_config(f, key, value)
    with pytest.raises(ConfigError) as e:
        GptOssConfig.from_file(f)
    assert str(e.value).startswith(f"{f}: ") and phrase in str(e.value), str(e.value)


@pytest.mark.parametrize("text", [b"[]", b'"config"', b'{"hidden_size": 64\xff}'])
def test_config_not_an_object(text, tmp_path):
    f = tmp_path / "config.json"
    f.write_bytes(text)
    with pytest.raises(ConfigError, match=f"{f}: (expected a JSON object|not UTF-8)"):
        GptOssConfig.from_file(f)


def test_unknown_top_level_keys_are_ignored(tiny_model_dir, tmp_path):
    f = tmp_path / "config.json"
    shutil.copy(tiny_model_dir / "config.json", f)
    bad_config(f, "transformers_version", "9.9")
    assert GptOssConfig.from_file(f) == TINY


@pytest.mark.parametrize("case", ["zero_kv_heads", "quant_unknown_key", "nan"])
def test_converter_refuses_a_bad_config_and_writes_nothing(case, releases, tmp_path):
    key, value, phrase = CONFIGS[case]
    src = copy(releases["hf"], tmp_path)
    bad_config(src / "config.json", key, value)
    with pytest.raises(ConversionError) as e:
        convert(src, tmp_path / "out")
    assert "config.json" in str(e.value) and phrase in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("raw,phrase", [(b"\xff\xfe[]", "not UTF-8"), (b"[1]", "must be a JSON object"),
                                        (None, "must be an integer")])  # fmt: skip
def test_converter_refuses_a_bad_original_config(raw, phrase, releases, tmp_path):
    src = copy(releases["original"], tmp_path)
    cfg = next(src.rglob("config.json"))
    if raw is None:  # a string where openai's original/config.json has a number
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "initial_context_length": "4096"}))
    else:
        cfg.write_bytes(raw)
    with pytest.raises(ConversionError) as e:
        convert(src, tmp_path / "out")
    assert "config.json" in str(e.value) and phrase in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["quant_spec_int", "format_unknown_key", "int_as_string"])
def test_loader_and_doctor_refuse_a_bad_config(case, tiny_model_dir, tmp_path):
    key, value, phrase = CONFIGS[case]
    m = copy(tiny_model_dir, tmp_path, "m")
    bad_config(m / "config.json", key, value)
    with pytest.raises(ConfigError) as e:
        mlx_gptoss.load(m)
    assert "config.json" in str(e.value) and phrase in str(e.value)
    assert_clean_failure(doctor(m), "config.json", phrase)


def test_loader_and_doctor_refuse_a_config_that_is_not_utf8(tiny_model_dir, tmp_path):
    m = copy(tiny_model_dir, tmp_path, "m")
    (m / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match="not UTF-8"):
        mlx_gptoss.load(m)
    assert_clean_failure(doctor(m), "config.json", "not UTF-8")


# -- doctor on an unconverted release ----------------------------------------------------------


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_doctor_refuses_a_released_checkpoint(layout, releases):
    out = doctor(releases[layout])
    assert "everything fits" not in out.stdout and "0.00  MLX" not in out.stdout
    assert_clean_failure(out, "released checkpoint, not a converted one", "mlx-gptoss convert")


def test_plan_refuses_tensors_without_experts(releases):
    tensors = {}
    for f in releases["hf"].glob("*.safetensors"):
        tensors.update(read_header(f)[0])
    with pytest.raises(BudgetError, match="no expert tensors"):
        plan_memory(TINY, tensors, None)
