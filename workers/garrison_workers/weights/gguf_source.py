"""GGUF files (llama.cpp's format): config from metadata, tensors dequantized with the `gguf` package.

A hostile file is refused before the `gguf` reader parses it: `check_header` walks the header with every
count and length checked against the bytes that remain (the reader loops over a claimed array length
item by item, so a length of 2**60 inside a large file would run for hours and hold millions of arrays),
and every tensor's extent against the file. Metadata values are then read with their types checked.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from garrison_workers.config import LIMITS, ModelConfig, from_hf_config
from garrison_workers.errors import ModelLoadError
from garrison_workers.quant.codec import GGUF_BLOCK as QK
from garrison_workers.quant.codec import from_gguf_blocks

_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "feed_forward.gate_proj.weight",
    "ffn_up.weight": "feed_forward.up_proj.weight",
    "ffn_down.weight": "feed_forward.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def open_reader(path: Path) -> Any:
    from gguf import GGUFReader

    check_header(path)
    try:
        return GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as err:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({err}); re-download or re-convert it") from None


# -- the header, checked before the gguf reader sees it ------------------------------------------------

_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> size
_STRING, _ARRAY = 8, 9
MAX_ITEMS = 1 << 24  # metadata items in one array, and tensors or keys in one file
MAX_DIMS = 4  # GGML_MAX_DIMS


class _Header:
    """A cursor over a GGUF file's bytes that refuses to read, or to be told to read, past their end."""

    def __init__(self, data: Any, path: Path) -> None:
        self.data, self.path, self.at = data, path, 0

    def refuse(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path} is not a readable GGUF file: {what} (at byte {self.at}); re-download or "
                              f"re-convert it")

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise self.refuse("it ends inside its header")
        value = struct.unpack_from(fmt, self.data, self.at)[0]
        self.at += size
        return value

    def count(self, what: str, min_item_bytes: int, limit: int = MAX_ITEMS) -> int:
        n = self.take("<Q")
        if n > limit or n * min_item_bytes > len(self.data) - self.at:
            raise self.refuse(f"{what} claims {n} items, more than the file can hold")
        return n

    def string(self, what: str) -> str:
        n = self.count(f"{what} (a string)", 1, len(self.data))
        raw = bytes(self.data[self.at:self.at + n])
        self.at += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.refuse(f"{what} is not UTF-8") from None

    def skip_value(self, kind: int, key: str, depth: int = 0) -> None:
        if kind in _SCALAR_BYTES:
            self.take({1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[_SCALAR_BYTES[kind]])
        elif kind == _STRING:
            self.string(f"the value of {key}")
        elif kind == _ARRAY and depth < 2:
            item = self.take("<I")
            n = self.count(f"the array {key}", _SCALAR_BYTES.get(item, 8))
            if item in _SCALAR_BYTES:  # fixed-size items: jump over them
                self.at += n * _SCALAR_BYTES[item]
            else:
                for _ in range(n):
                    self.skip_value(item, key, depth + 1)
        else:
            raise self.refuse(f"the value of {key} has an unknown type {kind}")


def check_header(path: Path) -> None:
    """Refuse a GGUF file whose header claims more than the file holds (see the module docstring)."""
    try:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _check(_Header(data, path))
    except (OSError, ValueError) as err:  # mmap of an empty file is a ValueError
        raise ModelLoadError(f"cannot read the GGUF file {path}: {getattr(err, 'strerror', None) or err}") from None


def _check(header: _Header) -> None:
    if header.take("<4s") != b"GGUF":
        raise header.refuse("no GGUF magic number")
    if header.take("<I") not in (2, 3):
        raise header.refuse("an unsupported GGUF version")
    num_tensors = header.count("the tensor count", 24)
    num_keys = header.count("the metadata key count", 13)
    alignment = 32
    for _ in range(num_keys):
        key = header.string("a metadata key")
        kind = header.take("<I")
        if key == "general.alignment" and kind == 4:
            alignment = header.take("<I")
        else:
            header.skip_value(kind, key)
    if alignment < 1 or alignment & (alignment - 1):
        raise header.refuse(f"general.alignment {alignment} is not a power of two")
    extents = [_tensor_extent(header) for _ in range(num_tensors)]
    data_start = -(-header.at // alignment) * alignment
    for name, offset, size in extents:
        if data_start + offset + size > len(header.data):
            raise header.refuse(f"tensor {name} claims {size} bytes at offset {offset}, past the end of the file")


def _tensor_extent(header: _Header) -> tuple[str, int, int]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    name = header.string("a tensor name")
    n_dims = header.take("<I")
    if not 1 <= n_dims <= MAX_DIMS:
        raise header.refuse(f"tensor {name} has {n_dims} dimensions")
    dims = [header.take("<Q") for _ in range(n_dims)]
    kind = header.take("<I")
    offset = header.take("<Q")
    try:
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        raise header.refuse(f"tensor {name} has an unknown type {kind}") from None
    elements = math.prod(dims)
    if elements % block or elements > 1 << 48:
        raise header.refuse(f"tensor {name} has a shape {dims} its type cannot hold")
    return name, offset, elements // block * block_bytes


# -- metadata -------------------------------------------------------------------------------------------

_REQUIRED: Any = object()


def field(reader: Any, key: str, default: Any = None) -> Any:
    entry = reader.fields.get(key)
    return default if entry is None else entry.contents()


def _typed(reader: Any, path: Path, key: str, kind: type, default: Any = _REQUIRED, high: int = (1 << 31) - 1,
           low: int = 1) -> Any:
    """A metadata value of `kind` (an int in low..high, or a finite float); ModelLoadError names the file and key."""
    value = field(reader, key, default)
    if value is _REQUIRED:
        raise ModelLoadError(f"{path}: GGUF metadata lacks {key}")
    if value is default:
        return value
    if kind is int and not isinstance(value, bool) and isinstance(value, int) and low <= value <= high:
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    what = f"an integer from {low} to {high}" if kind is int else "a finite number"
    raise ModelLoadError(f"{path}: GGUF key {key} must be {what}, not {str(value)[:60]!r}")


def config_from_gguf(reader: Any, path: Path) -> ModelConfig:
    return from_hf_config(hf_config_from_gguf(reader, path), source=str(path))


def hf_config_from_gguf(reader: Any, path: Path) -> dict[str, Any]:
    """The file's metadata as a transformers config.json dict (what the encrypted store keeps)."""
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{path}: GGUF architecture {str(arch)[:60]!r} is not supported; Garrison reads dense "
                             "'llama' GGUF files (use HF safetensors for Llama 4)")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ModelLoadError(f"{path}: GGUF rope_freqs (Llama 3.1 RoPE scaling) is not supported; use the HF checkpoint")

    def g(key: str, kind: type, limit: str | None = None, default: Any = _REQUIRED, low: int = 1) -> Any:
        return _typed(reader, path, key, kind, default, LIMITS[limit] if limit else (1 << 31) - 1, low)

    num_heads = g("llama.attention.head_count", int, "num_heads")
    hidden = g("llama.embedding_length", int, "hidden_size")
    tokens = field(reader, "tokenizer.ggml.tokens", [])
    return dict(
        model_type="llama", vocab_size=g("llama.vocab_size", int, "vocab_size", len(tokens) if isinstance(tokens, list)
                                         else 0),
        hidden_size=hidden, intermediate_size=g("llama.feed_forward_length", int, "intermediate_size"),
        num_hidden_layers=g("llama.block_count", int, "num_layers"),
        num_attention_heads=num_heads, num_key_value_heads=g("llama.attention.head_count_kv", int, "num_kv_heads",
                                                             num_heads),
        head_dim=g("llama.rope.dimension_count", int, "head_dim", max(hidden // num_heads, 1)),
        rms_norm_eps=g("llama.attention.layer_norm_rms_epsilon", float, default=1e-5),
        rope_parameters=dict(rope_type="default", rope_theta=g("llama.rope.freq_base", float, default=10000.0)),
        max_position_embeddings=g("llama.context_length", int, "max_position_embeddings", 2048),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=g("tokenizer.ggml.bos_token_id", int, default=None, low=0),
        eos_token_id=g("tokenizer.ggml.eos_token_id", int, default=None, low=0))


# GGUF block types held quantized (codec.from_gguf_blocks) and the canonical kind each becomes.
KEPT_QUANTIZED = {"Q4_0": "int4", "Q4_1": "int4", "Q8_0": "int8"}


class GGUFSource:
    """A GGUF file's tensors under Garrison's names. With `keep_quantized`, Q4_0, Q4_1 and Q8_0 tensors are
    read as canonical quantized tensors (`garrison_workers.quant`: `<name>_int4|int8`, `_scale`, `_zero`)
    straight from their blocks, with no float copy; every other type is dequantized to float32."""

    def __init__(self, reader: Any, path: Path, config: ModelConfig, keep_quantized: bool = True) -> None:
        self.path, self.config = path, config
        self._tensors: dict[str, tuple[Any, str]] = {}  # our name -> (GGUF tensor, part: weight|payload|scale|zero)
        for tensor in reader.tensors:
            name = _our_name(tensor.name)
            if name is None:
                continue
            kind = KEPT_QUANTIZED.get(tensor.tensor_type.name) if keep_quantized else None
            if kind is None:
                self._tensors[name] = (tensor, "weight")
                continue
            parts = {f"{name}_{kind}": "payload", f"{name}_scale": "scale"}
            if tensor.tensor_type.name == "Q4_1":
                parts[f"{name}_zero"] = "zero"
            for part_name, part in parts.items():
                self._tensors[part_name] = (tensor, part)
        self._decoded: tuple[str, tuple[torch.Tensor, ...]] | None = None  # the last tensor's parts

    def names(self) -> Iterable[str]:
        return self._tensors.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        tensor, part = self._tensors[name]
        rows, cols = (int(n) for n in reversed(tensor.shape)) if len(tensor.shape) == 2 else (0, 0)
        if part == "weight":
            return tuple(int(n) for n in reversed(tensor.shape))
        if part == "payload":
            return (rows, cols // 2 if KEPT_QUANTIZED[tensor.tensor_type.name] == "int4" else cols)
        return (rows, cols // QK)

    def where(self, name: str) -> str:
        return f"{self.path} (stored as {self._tensors[name][0].name})"

    def read(self, name: str, index: Any = None) -> torch.Tensor:
        tensor, part = self._tensors[name]
        if part == "weight":
            weights = self._dequantized(tensor)
        else:
            weights = self._quantized(tensor)[("payload", "scale", "zero").index(part)]
        if name.startswith("model.layers.") and ".q_proj." in name:
            weights = _unpermute(weights, self.config.num_heads)
        elif name.startswith("model.layers.") and ".k_proj." in name:
            weights = _unpermute(weights, self.config.num_kv_heads)
        if index is not None:  # quantized rows are decoded whole; shards are cut afterwards
            weights = weights[index]
        # Copied out of the read-only memory map: the model owns its parameters.
        return torch.from_numpy(np.require(weights, None, ["C_CONTIGUOUS", "WRITEABLE"]))

    def _dequantized(self, tensor: Any) -> np.ndarray:
        from gguf import dequantize

        try:
            weights = dequantize(tensor.data, tensor.tensor_type)
            return np.reshape(weights, tuple(int(n) for n in reversed(tensor.shape))).astype(np.float32, copy=False)
        except (ValueError, NotImplementedError) as err:
            raise ModelLoadError(f"{self.path}: cannot dequantize tensor {tensor.name} ({err})") from None

    def _quantized(self, tensor: Any) -> tuple[np.ndarray, ...]:
        """(payload, scale, zero) of a kept-quantized tensor; the last one decoded is kept, as its parts are read
        one after another."""
        if self._decoded is None or self._decoded[0] != tensor.name:
            rows, cols = (int(n) for n in reversed(tensor.shape))
            try:
                parts = from_gguf_blocks(tensor.tensor_type.name, np.asarray(tensor.data), rows, cols)
            except ValueError as err:
                raise ModelLoadError(f"{self.path}: tensor {tensor.name} has malformed blocks ({err})") from None
            self._decoded = (tensor.name, tuple(None if p is None else p.numpy() for p in parts))
        return self._decoded[1]


def _our_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    match = _LAYER.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def _unpermute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (made for its interleaved RoPE) to get HF's rotate-half layout."""
    half_dim = weights.shape[0] // num_heads // 2
    return weights.reshape(num_heads, half_dim, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)
