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
MAX_INDEX_BYTES = 64 << 20  # an index lists tensor names; a larger one is not an index
# Llama4ForConditionalGeneration nests the text model; its vision tower is not served.
_PREFIXES = ("language_model.",)
_SKIPPED = ("vision_model.", "multi_modal_projector.", "model.vision_model.", "model.multi_modal_projector.")
_DENSE_MLP = re.compile(r"^(model\.layers\.\d+\.)mlp\.")


class SafetensorsSource:
    def __init__(self, directory: Path, dense_llama: bool) -> None:
        self.directory = directory
        self._location: dict[str, tuple[Path, str]] = {}  # our name -> (file, checkpoint name)
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in _weight_files(directory):
            for stored, shape in _tensor_shapes(file).items():
                name = _our_name(stored, dense_llama)
                if name is not None:
                    self._location[name], self._shapes[name] = (file, stored), shape

    def names(self) -> Iterable[str]:
        return self._location.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def where(self, name: str) -> str:
        file, stored = self._location[name]
        return str(file) if stored == name else f"{file} (stored as {stored})"

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


def _weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(_small_text(index))["weight_map"]
        except (ValueError, KeyError, TypeError, RecursionError) as err:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {err}") from None
        shards = weight_map.values() if isinstance(weight_map, dict) else [None]
        bad = [shard for shard in shards
               if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", "..")]
        if bad:  # a shard is a file of this directory: never a path elsewhere
            raise ModelLoadError(f"{index}: weight_map must map tensor names to file names in {directory}, not "
                                 f"{str(bad[0])[:60]!r}")
        files = sorted({directory / shard for shard in shards})
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise ModelLoadError(f"{index} names shard(s) {', '.join(absent)} that are missing from {directory}")
        return files
    if (directory / SINGLE_FILE).exists():
        return [directory / SINGLE_FILE]
    raise ModelLoadError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _small_text(path: Path, limit: int = MAX_INDEX_BYTES) -> str:
    if path.stat().st_size > limit:
        raise ValueError(f"it is over {limit >> 20} MiB")
    return path.read_text()


def _tensor_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, from the header (safetensors checks that each shape fits its byte range)."""
    try:
        with safe_open(file, framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
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
