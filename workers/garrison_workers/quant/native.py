"""Garrison's own CPU kernels (C++ in `csrc/`), compiled on first use in each environment and loaded as torch ops.

`a8_mm` (csrc/a8_cpu.cpp) multiplies int4 or int8 weights by activations rounded to int8, with AVX512-VNNI. It is
built with PyTorch's extension builder into its cache (~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR), once
per machine image: about 10 s, the first time a process loads a model that uses it; concurrent ranks wait on the
builder's lock. Where it cannot be built (no C++ compiler) or run (a CPU without AVX512-VNNI), or with
GARRISON_NATIVE_KERNELS=0, `available()` is False and the quantized layers use PyTorch's kernels; a failed build
says why in the log, once per process.

The ops' namespace carries a digest of the source and its flags (`garrison_<digest>::a8_mm`): torch.compile's
on-disk caches key a graph on the ops it calls, not on what they compute, so a changed kernel must not share a
name with the one a cached graph was compiled against.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "a8_cpu.cpp"
ENV = "GARRISON_NATIVE_KERNELS"
FLAGS = ["-O3", "-fopenmp"]
NAMESPACE = "garrison_" + hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:12]


def available() -> bool:
    """Whether a8_mm can run in this process (built, loaded, and this CPU has AVX512-VNNI)."""
    return os.environ.get(ENV, "1") != "0" and _loaded()


def ops() -> Any:
    """The loaded ops (`ops().a8_mm(x, codes, scales, offsets, group, bits)`); only after `available()`."""
    return getattr(torch.ops, NAMESPACE)


@functools.cache
def _loaded() -> bool:
    try:
        from torch.utils.cpp_extension import load

        log.info("loading garrison's int8-activation CPU kernel (compiled on first use, ~10 s)")
        load(name=NAMESPACE, sources=[str(SOURCE)], extra_cflags=[*FLAGS, f"-DGARRISON_NAMESPACE={NAMESPACE}"],
             extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as exc:  # no compiler, a read-only cache directory, ...
        log.warning("garrison's int8-activation CPU kernel could not be built (%s); using PyTorch's kernels",
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        return False
    if not ops().a8_supported():
        log.info("this CPU lacks AVX512-VNNI: using PyTorch's kernels for quantized weights")
        return False

    @torch.library.register_fake(f"{NAMESPACE}::a8_mm")
    def _(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group: int, bits: int
          ) -> torch.Tensor:
        return x.new_empty((x.shape[0], codes.shape[0] * 16), dtype=torch.float32)

    return True
