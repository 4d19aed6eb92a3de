"""Open a model (HF directory, .gguf file, or the encrypted store) and build it, weights in place, on one device.

Nothing is allocated for a model until its files are known to fit together: the config's values are
typed and bounded (garrison_workers.config), a GGUF header's counts are checked against the file, and
every parameter's shape, as its loader would cut it, is checked against the stored tensor's shape on
meta tensors (weights.source.check_parameters). Each refusal is a ModelLoadError naming the file and the
key or tensor.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from garrison_workers.config import ModelConfig, from_hf_config
from garrison_workers.errors import ModelLoadError
from garrison_workers.fusion import fuse_projections
from garrison_workers.model import CausalLM, MoE
from garrison_workers.parallel.context import ParallelContext
from garrison_workers.parallel.moe import ParallelMoE
from garrison_workers.quant.formats import holds_quantized
from garrison_workers.quant.layers import adopt_quantized, cast_floats, prepare_kernels, tie_head
from garrison_workers.tokenizer import Tokenizer
from garrison_workers.weights.compressed_tensors_source import CompressedTensorsSource, parse_quantization_config
from garrison_workers.weights.encrypted_source import EncryptedSource
from garrison_workers.weights.gguf_source import GGUFSource, config_from_gguf, open_reader
from garrison_workers.weights.safetensors_source import SafetensorsSource
from garrison_workers.weights.source import WeightSource, check_parameters, fill_parameters
from garrison_workers.weights.store_format import StoreModel

# Where a model is: a path, or a model of the encrypted store with its unwrapped data key. A
# StoreModel reaches each worker rank in its Ray actor arguments, in memory only: the platform
# unwrapped the data key with its KEK provider, and nothing writes or logs it (its repr hides the key).
# With Ray's GCS fault tolerance on, actor arguments persist in the GCS's Redis: give it TLS and auth.
ModelLocation = str | Path | StoreModel
MAX_CONFIG_BYTES = 16 << 20  # a config.json is a few kB; a larger one is not a config


@dataclass(slots=True)
class ModelFiles:
    """A model's configuration, tokenizer (None for test models saved without one) and weights."""

    config: ModelConfig
    tokenizer: Tokenizer | None
    source: WeightSource


def open_model_files(path: ModelLocation, keep_quantized: bool = True) -> ModelFiles:
    """`keep_quantized` False reads a GGUF file's quantized blocks as float (what `models import --quantize`
    re-quantizes)."""
    if isinstance(path, StoreModel):
        source = EncryptedSource(path)
        return ModelFiles(source.config(), _tokenizer(lambda: source.tokenizer(), str(path.directory)), source)
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist; pass an HF model directory or a .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; pass a .gguf file or an HF model directory")
        reader = open_reader(path)
        config = config_from_gguf(reader, path)
        return ModelFiles(config, _tokenizer(lambda: Tokenizer.from_gguf(reader), f"{path} (tokenizer.ggml.*)"),
                          GGUFSource(reader, path, config, keep_quantized))
    raw = _read_json(path / "config.json")
    config = from_hf_config(raw, source=str(path / "config.json"))
    source: WeightSource = SafetensorsSource(path, dense_llama=config.architecture == "llama")
    if isinstance(raw, dict) and raw.get("quantization_config") is not None:
        quantization = parse_quantization_config(raw["quantization_config"], str(path / "config.json"))
        source = CompressedTensorsSource(source, quantization)  # type: ignore[arg-type]
    return ModelFiles(config, _tokenizer(lambda: Tokenizer.from_pretrained_dir(path), f"the tokenizer files of {path}"),
                      source)


def _read_json(file: Path) -> Any:
    if not file.is_file():
        raise ModelLoadError(f"{file.parent} has no config.json; is it a Hugging Face model directory?")
    try:
        if file.stat().st_size > MAX_CONFIG_BYTES:
            raise ModelLoadError(f"{file} is over {MAX_CONFIG_BYTES >> 20} MiB: not a model config")
        return json.loads(file.read_bytes())
    except OSError as err:
        raise ModelLoadError(f"cannot read {file}: {err.strerror}") from None
    except (ValueError, RecursionError) as err:
        raise ModelLoadError(f"{file} is not valid JSON: {err}") from None


def _tokenizer(load: Callable[[], Tokenizer | None], where: str) -> Tokenizer | None:
    """The model's tokenizer; a malformed one is the model's fault, said as such (never a traceback)."""
    try:
        return load()
    except ModelLoadError as err:
        raise ModelLoadError(f"{where}: {err}") from None
    except Exception as err:  # the tokenizers library and the metadata it is built from raise anything
        raise ModelLoadError(f"{where}: the tokenizer cannot be built ({type(err).__name__}: {str(err)[:200]})") \
            from None


def build_model(config: ModelConfig, source: WeightSource, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", par: ParallelContext | None = None,
                kernel_dtype: torch.dtype | None = None) -> CausalLM:
    """This rank's part of the model, holding (and reading) only the weights `par` assigns it; its quantized
    matmuls take `kernel_dtype` activations (default `dtype`)."""
    par = par or ParallelContext.single()
    par.dims.validate(config)
    moe_cls = MoE if par.dims.world_size == 1 else ParallelMoE
    # Built on the meta device so that no memory is spent on random init the checkpoint overwrites, and so that
    # the checkpoint's shapes are checked against the parameters before their memory exists.
    with torch.device("meta"):
        model = CausalLM(config, par, moe_cls)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    adopt_quantized(model, source)
    check_parameters(model, source)
    model = model.to_empty(device=device)
    cast_floats(model, dtype)
    if config.tie_word_embeddings:  # to_empty gives the tied pair two separate tensors
        tie_head(model)
    fill_parameters(model, source)
    prepare_kernels(model, kernel_dtype or dtype, dtype)
    fuse_projections(model)
    return model.eval()


def compute_dtype(requested: torch.dtype | str, source: WeightSource) -> tuple[torch.dtype, torch.dtype | None]:
    """(model dtype, quantized matmuls' activation dtype) for an engine's `dtype`. `auto` keeps the model in
    float32 and feeds a quantized checkpoint's low-bit kernels low-precision activations, which they are fast
    with: int8 per block of 32 where a8_mm runs (it rounds them itself, from float32), else bfloat16 (PyTorch's
    packed kernels; `quant.kernels.activation_dtype`): only the matmul inputs are rounded, not the residual
    stream, the norms, attention or the KV cache (a whole-bf16 model moves SmolLM2's log-probabilities by ~0.1).
    The kernels are chosen on each rank, by what its CPU can run."""
    if requested != "auto":
        return requested, None  # type: ignore[return-value]
    return torch.float32, torch.int8 if holds_quantized(source.names()) else None
