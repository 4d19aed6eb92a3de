"""Hugging Face checkpoints: config.json plus one `model.safetensors` or shards with an index."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError, safe_open

from garrison_workers.errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Llama4ForConditionalGeneration nests the text model; its vision tower is not served.
_PREFIXES = ("language_model.",)
_SKIPPED = ("vision_model.", "multi_modal_projector.", "model.vision_model.", "model.multi_modal_projector.")
_DENSE_MLP = re.compile(r"^(model\.layers\.\d+\.)mlp\.")


class SafetensorsSource:
    def __init__(self, directory: Path, dense_llama: bool) -> None:
        self.directory = directory
        self._location = self._index(directory, dense_llama)  # our name -> (file, checkpoint name)

    def names(self) -> Iterable[str]:
        return self._location.keys()

    def read(self, name: str, index: Any = None) -> torch.Tensor:
        file, stored = self._location[name]
        try:
            with safe_open(file, framework="pt") as handle:
                if index is None:
                    return handle.get_tensor(stored)
                # get_slice reads only the requested part of the file: a rank's shard, one expert.
                return handle.get_slice(stored)[index]
        except (SafetensorError, OSError, RuntimeError) as err:
            raise ModelLoadError(f"cannot read tensor {stored} from {file}: {err}") from None

    @staticmethod
    def _index(directory: Path, dense_llama: bool) -> dict[str, tuple[Path, str]]:
        files = _weight_files(directory)
        location: dict[str, tuple[Path, str]] = {}
        for file in files:
            for stored in _tensor_names(file):
                name = _our_name(stored, dense_llama)
                if name is not None:
                    location[name] = (file, stored)
        return location


def _weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {err}") from None
        files = sorted({directory / shard for shard in weight_map.values()})
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise ModelLoadError(f"{index} names shard(s) {', '.join(absent)} that are missing from {directory}")
        return files
    if (directory / SINGLE_FILE).exists():
        return [directory / SINGLE_FILE]
    raise ModelLoadError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _tensor_names(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"{file} is not a readable safetensors file ({err}); re-download or re-export it") from None


def _our_name(stored: str, dense_llama: bool) -> str | None:
    for prefix in _PREFIXES:
        if stored.startswith(prefix):
            stored = stored[len(prefix):]
    if stored.startswith(_SKIPPED):
        return None
    if dense_llama:
        stored = _DENSE_MLP.sub(r"\1feed_forward.", stored)
    return stored
