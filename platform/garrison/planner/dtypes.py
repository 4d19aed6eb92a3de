"""Bytes per parameter of each weight data type and per element of each KV-cache data type.

The one table the memory model reads. When the workers' quantization formats land (issue 17), this must read
their format table instead (bytes per parameter including group scales), so that the planner and the loader
can never disagree about what a format weighs.
"""

from __future__ import annotations

from garrison_workers.errors import InvalidRequestError

# int4: 4-bit weights plus one bf16 scale per group of 128 (compressed-tensors' pack-quantized default).
INT4_GROUP_SIZE = 128
WEIGHT_BYTES: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int4": 0.5 + 2 / INT4_GROUP_SIZE}
KV_BYTES: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0}
# Which peak-FLOPS figure of the hardware a weight type computes at (int4 weights are widened to bf16 on the fly).
COMPUTE_DTYPE: dict[str, str] = {"fp32": "fp32", "bf16": "bf16", "fp16": "bf16", "fp8": "fp8", "int4": "bf16"}


def weight_bytes(dtype: str) -> float:
    if dtype not in WEIGHT_BYTES:
        raise InvalidRequestError(f"unknown weight dtype {dtype!r}; choose one of {', '.join(WEIGHT_BYTES)}")
    return WEIGHT_BYTES[dtype]


def kv_bytes(dtype: str) -> float:
    if dtype not in KV_BYTES:
        raise InvalidRequestError(f"unknown KV-cache dtype {dtype!r}; choose one of {', '.join(KV_BYTES)}")
    return KV_BYTES[dtype]
