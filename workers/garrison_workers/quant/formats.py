"""The quantized formats Garrison holds, what each weighs, and how a source's names declare them.

One table (`FORMATS`) says what a parameter of each format costs in bytes, scales included: the
planner's memory model reads it, so the planner and the loader cannot disagree about a format's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Protocol

import torch

from garrison_workers.errors import LayoutError, ModelLoadError


@dataclass(slots=True, frozen=True)
class Format:
    """A payload kind: its stored dtype, codes per stored element, and code bits."""

    name: str
    dtype: torch.dtype
    codes_per_element: int
    bits: int


FORMATS = {f.name: f for f in (
    Format("int4", torch.uint8, 2, 4),
    Format("int8", torch.int8, 1, 8),
    Format("fp8", torch.float8_e4m3fn, 1, 8),
    Format("fp8_dynamic", torch.float8_e4m3fn, 1, 8),
)}
SCALE_BYTES = 4  # canonical scales and zeros are float32 (exact for fp16 and bf16 checkpoint scales)


def bytes_per_param(kind: str, group_size: int, has_zero: bool = False, scale_bytes: int = SCALE_BYTES) -> float:
    """Stored bytes per weight element of a format, its per-group scale (and zero) included."""
    fmt = FORMATS[kind]
    return fmt.bits / 8 + scale_bytes * (2 if has_zero else 1) / group_size


@dataclass(slots=True, frozen=True)
class WeightFormat:
    """How one weight (a linear's [N, K], or fused experts' [E, N, K]) is stored.

    `group_size` input features share a scale; per-channel is group_size == K, per-tensor scales are
    canonically broadcast to per-channel."""

    kind: str
    group_size: int
    has_zero: bool
    out_features: int  # N
    in_features: int  # K

    @property
    def format(self) -> Format:
        return FORMATS[self.kind]

    @property
    def per_channel(self) -> bool:
        """One scale per output row: every shard of the inputs keeps it whole."""
        return self.group_size == self.in_features

    def payload_name(self, weight: str) -> str:
        return f"{weight}_{self.kind}"

    def check_shard(self, what: str, in_features: int) -> None:
        """Refuse a row-parallel shard of `in_features` inputs that would cut a group (or a packed byte) in two."""
        if (not self.per_channel and in_features % self.group_size) or in_features % self.format.codes_per_element:
            raise LayoutError(
                f"{what} is quantized in groups of {self.group_size} input features, which do not divide this "
                f"rank's {in_features} features: a group's scale would be split across ranks; choose a tp that "
                f"leaves a multiple of {self.group_size} features per rank")


class Names(Protocol):
    def names(self) -> Iterable[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def where(self, name: str) -> str: ...


def find_format(source: Names, weight: str, available: set[str]) -> WeightFormat | None:
    """The format of `weight` (e.g. `model.layers.0.self_attn.q_proj.weight`) when the source holds it
    quantized, checked against its scales; None when it is stored in float."""
    kinds = [kind for kind in FORMATS if f"{weight}_{kind}" in available]
    if not kinds:
        return None
    kind = kinds[0]
    payload, scale, zero = f"{weight}_{kind}", f"{weight}_scale", f"{weight}_zero"
    if scale not in available:
        raise ModelLoadError(f"{source.where(payload)}: quantized weight {payload} has no scales ({scale})")
    shape, scale_shape = tuple(source.shape(payload)), tuple(source.shape(scale))
    fmt = FORMATS[kind]
    out_features, in_features = shape[-2], shape[-1] * fmt.codes_per_element
    groups = scale_shape[-1] if scale_shape else 0
    if len(scale_shape) != len(shape) or scale_shape[:-1] != shape[:-1] or not groups or in_features % groups:
        raise ModelLoadError(
            f"{source.where(scale)}: scales of shape {scale_shape} do not match the quantized weight {payload} of "
            f"{shape[:-1] + (in_features,)} elements: expected {shape[:-1]} + (groups,) with groups dividing "
            f"{in_features}; the checkpoint is corrupt or was written for another model")
    has_zero = zero in available
    if has_zero and tuple(source.shape(zero)) != scale_shape:
        raise ModelLoadError(f"{source.where(zero)}: zero points of shape {tuple(source.shape(zero))} do not match "
                             f"the scales' {scale_shape}")
    if has_zero and kind != "int4":
        raise ModelLoadError(f"{source.where(zero)}: zero points are supported for int4 weights only, not {kind}")
    return WeightFormat(kind, in_features // groups, has_zero, out_features, in_features)


def holds_quantized(names: Iterable[str]) -> bool:
    suffixes = tuple(f"_{kind}" for kind in FORMATS)
    return any(name.endswith(suffixes) for name in names)


def num_codes(shape: tuple[int, ...], kind: str) -> int:
    return math.prod(shape) * FORMATS[kind].codes_per_element
