"""Open a model (HF directory, .gguf file, or the encrypted store) and build it, weights in place, on one device."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from garrison_workers.config import ModelConfig, from_hf_config
from garrison_workers.errors import ModelLoadError
from garrison_workers.model import CausalLM, MoE
from garrison_workers.parallel.context import ParallelContext
from garrison_workers.parallel.moe import ParallelMoE
from garrison_workers.tokenizer import Tokenizer
from garrison_workers.weights.encrypted_source import EncryptedSource
from garrison_workers.weights.gguf_source import GGUFSource, config_from_gguf, open_reader
from garrison_workers.weights.safetensors_source import SafetensorsSource
from garrison_workers.weights.source import WeightSource, fill_parameters
from garrison_workers.weights.store_format import StoreModel

# Where a model is: a path, or a model of the encrypted store with its unwrapped data key. A
# StoreModel reaches each worker rank in its Ray actor arguments, in memory only: the platform
# unwrapped the data key with its KEK provider, and nothing writes or logs it (its repr hides the key).
# With Ray's GCS fault tolerance on, actor arguments persist in the GCS's Redis: give it TLS and auth.
ModelLocation = str | Path | StoreModel


@dataclass(slots=True)
class ModelFiles:
    """A model's configuration, tokenizer (None for test models saved without one) and weights."""

    config: ModelConfig
    tokenizer: Tokenizer | None
    source: WeightSource


def open_model_files(path: ModelLocation) -> ModelFiles:
    if isinstance(path, StoreModel):
        source = EncryptedSource(path)
        return ModelFiles(source.config(), source.tokenizer(), source)
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist; pass an HF model directory or a .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; pass a .gguf file or an HF model directory")
        reader = open_reader(path)
        config = config_from_gguf(reader, path)
        return ModelFiles(config, Tokenizer.from_gguf(reader), GGUFSource(reader, path, config))
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"{path} has no config.json; is it a Hugging Face model directory?")
    try:
        raw = json.loads(config_file.read_text())
    except ValueError as err:
        raise ModelLoadError(f"{config_file} is not valid JSON: {err}") from None
    config = from_hf_config(raw)
    return ModelFiles(config, Tokenizer.from_pretrained_dir(path),
                      SafetensorsSource(path, dense_llama=config.architecture == "llama"))


def build_model(config: ModelConfig, source: WeightSource, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", par: ParallelContext | None = None) -> CausalLM:
    """This rank's part of the model, holding (and reading) only the weights `par` assigns it."""
    par = par or ParallelContext.single()
    par.dims.validate(config)
    moe_cls = MoE if par.dims.world_size == 1 else ParallelMoE
    # Built on the meta device so that no memory is spent on random init the checkpoint overwrites.
    with torch.device("meta"):
        model = CausalLM(config, par, moe_cls)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_word_embeddings:  # to_empty gives the tied pair two separate tensors
        model.lm_head.weight = model.model.embed_tokens.weight
    fill_parameters(model, source)
    return model.eval()
