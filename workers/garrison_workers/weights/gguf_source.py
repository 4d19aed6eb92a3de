"""GGUF files (llama.cpp's format): config from metadata, tensors dequantized with the `gguf` package."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from garrison_workers.config import ModelConfig, from_hf_config
from garrison_workers.errors import ModelLoadError

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

    try:
        return GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as err:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({err}); re-download or re-convert it") from None


def field(reader: Any, key: str, default: Any = None) -> Any:
    entry = reader.fields.get(key)
    return default if entry is None else entry.contents()


def config_from_gguf(reader: Any, path: Path) -> ModelConfig:
    return from_hf_config(hf_config_from_gguf(reader, path))


def hf_config_from_gguf(reader: Any, path: Path) -> dict[str, Any]:
    """The file's metadata as a transformers config.json dict (what the encrypted store keeps)."""
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported; Garrison reads dense "
                             "'llama' GGUF files (use HF safetensors for Llama 4)")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ModelLoadError(f"{path}: GGUF rope_freqs (Llama 3.1 RoPE scaling) is not supported; use the HF checkpoint")
    g = lambda key, default=None: field(reader, f"llama.{key}", default)  # noqa: E731
    num_heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    return dict(
        model_type="llama", vocab_size=int(g("vocab_size", len(field(reader, "tokenizer.ggml.tokens", [])))),
        hidden_size=hidden, intermediate_size=int(g("feed_forward_length")), num_hidden_layers=int(g("block_count")),
        num_attention_heads=num_heads, num_key_value_heads=int(g("attention.head_count_kv", num_heads)),
        head_dim=int(g("rope.dimension_count", hidden // num_heads)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_parameters=dict(rope_type="default", rope_theta=float(g("rope.freq_base", 10000.0))),
        max_position_embeddings=int(g("context_length", 2048)), tie_word_embeddings="output.weight" not in names,
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"), eos_token_id=None if eos is None else int(eos))


class GGUFSource:
    def __init__(self, reader: Any, path: Path, config: ModelConfig) -> None:
        self.path, self.config = path, config
        self._tensors = {}
        for tensor in reader.tensors:
            name = _our_name(tensor.name)
            if name is not None:
                self._tensors[name] = tensor

    def names(self) -> Iterable[str]:
        return self._tensors.keys()

    def read(self, name: str, index: Any = None) -> torch.Tensor:
        from gguf import dequantize

        tensor = self._tensors[name]
        try:
            weights = dequantize(tensor.data, tensor.tensor_type)
            weights = np.reshape(weights, tuple(int(n) for n in reversed(tensor.shape)))
        except (ValueError, NotImplementedError) as err:
            raise ModelLoadError(f"{self.path}: cannot dequantize tensor {tensor.name} ({err})") from None
        if name.endswith("q_proj.weight"):
            weights = _unpermute(weights, self.config.num_heads)
        elif name.endswith("k_proj.weight"):
            weights = _unpermute(weights, self.config.num_kv_heads)
        if index is not None:  # quantized rows are dequantized whole; shards are cut afterwards
            weights = weights[index]
        # Copied out of the read-only memory map: the model owns its parameters.
        return torch.from_numpy(np.require(weights, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))


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
