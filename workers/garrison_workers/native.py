"""Garrison's own CPU kernels (C++ in `csrc/`), compiled on first use in each environment and loaded as torch ops.

- `a8_mm` (csrc/a8_cpu.cpp) multiplies int4 or int8 weights by activations rounded to int8, with AVX512-VNNI
  (`available()`); without it the quantized layers use PyTorch's kernels.
- `decode_attention` (csrc/attention_cpu.cpp) attends one query token per sequence over its keys where they lie
  in the paged KV cache, with AVX512 (`attention_available()`); without it decode rows gather their keys and
  use sdpa.

They are built with PyTorch's extension builder into its cache (~/.cache/torch_extensions, or
$TORCH_EXTENSIONS_DIR), once per machine image: about 15 s, the first time a process needs one; concurrent ranks
wait on the builder's lock. Where they cannot be built (no C++ compiler), or with GARRISON_NATIVE_KERNELS=0,
neither is available; a failed build says why in the log, once per process.

The ops' namespace carries a digest of the sources and flags (`garrison_<digest>::a8_mm`): torch.compile's
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

CSRC = Path(__file__).parent / "csrc"
SOURCES = sorted(CSRC.glob("*.cpp"))
ENV = "GARRISON_NATIVE_KERNELS"
FLAGS = ["-O3", "-fopenmp"]
NAMESPACE = "garrison_" + hashlib.sha256(b"".join(path.read_bytes() for path in sorted(CSRC.glob("*.[ch]*")))
                                         + " ".join(FLAGS).encode()).hexdigest()[:12]


def available() -> bool:
    """Whether a8_mm can run in this process (built, loaded, and this CPU has AVX512-VNNI)."""
    return os.environ.get(ENV, "1") != "0" and _loaded() and _supported("a8_supported")


def attention_available() -> bool:
    """Whether decode_attention can run in this process (built, loaded, and this CPU has AVX512)."""
    return os.environ.get(ENV, "1") != "0" and _loaded() and _supported("decode_attention_supported")


def ops() -> Any:
    """The loaded ops (`ops().a8_mm(...)`, `ops().decode_attention(...)`); only after one is available."""
    return getattr(torch.ops, NAMESPACE)


@functools.cache
def _supported(check: str) -> bool:
    if getattr(ops(), check)():
        return True
    log.info("this CPU cannot run %s: using PyTorch's kernels instead",
             "a8_mm (AVX512-VNNI)" if check == "a8_supported" else "decode_attention (AVX512)")
    return False


@functools.cache
def _loaded() -> bool:
    try:
        from torch.utils.cpp_extension import load

        log.info("loading garrison's CPU kernels (compiled on first use, ~15 s)")
        load(name=NAMESPACE, sources=[str(path) for path in SOURCES],
             extra_cflags=[*FLAGS, f"-DGARRISON_NAMESPACE={NAMESPACE}"], extra_ldflags=["-fopenmp"],
             is_python_module=False)
    except Exception as exc:  # no compiler, a read-only cache directory, ...
        log.warning("garrison's CPU kernels could not be built (%s); using PyTorch's kernels",
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        return False

    @torch.library.register_fake(f"{NAMESPACE}::a8_mm")
    def _(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group: int, bits: int
          ) -> torch.Tensor:
        return x.new_empty((x.shape[0], codes.shape[0] * 16), dtype=torch.float32)

    @torch.library.register_fake(f"{NAMESPACE}::decode_attention")
    def _(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
          scale: float) -> torch.Tensor:
        return q.new_empty(q.shape, dtype=torch.float32)

    return True
