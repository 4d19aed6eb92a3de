"""Bytes per parameter of each weight data type and per element of each KV-cache data type.

The one table the memory model reads. Quantized weights weigh what the workers store
(`garrison_workers.quant.formats.bytes_per_param`: codes plus their float32 scales, and zeros where the
format has them), so the planner and the loader cannot disagree about what a format weighs:
- fp8, int8: a scale per output channel, over Llama 4's 5120 inputs (Maverick's official FP8 checkpoint);
- int4: a scale and a zero per group of 128 inputs (`models import --quantize int4`, compressed-tensors'
  default group);
- q4_0, q4_1, q8_0: GGUF blocks of 32 kept quantized (one scale, plus a zero for q4_1).
"""

from __future__ import annotations

from garrison_workers.errors import InvalidRequestError
from garrison_workers.quant.formats import bytes_per_param

INT4_GROUP_SIZE = 128
CHANNEL_INPUTS = 5120  # the inputs a per-channel scale covers (Llama 4's hidden size)
WEIGHT_BYTES: dict[str, float] = {
    "fp32": 4.0, "bf16": 2.0, "fp16": 2.0,
    "fp8": bytes_per_param("fp8", CHANNEL_INPUTS), "int8": bytes_per_param("int8", CHANNEL_INPUTS),
    "int4": bytes_per_param("int4", INT4_GROUP_SIZE, has_zero=True),
    "q4_0": bytes_per_param("int4", 32), "q4_1": bytes_per_param("int4", 32, has_zero=True),
    "q8_0": bytes_per_param("int8", 32),
}
KV_BYTES: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0}
# Which peak-FLOPS figure of the hardware a weight type computes at (int4 weights are widened to bf16 on the fly).
COMPUTE_DTYPE: dict[str, str] = {"fp32": "fp32", "bf16": "bf16", "fp16": "bf16", "fp8": "fp8", "int8": "bf16",
                                 "int4": "bf16", "q4_0": "bf16", "q4_1": "bf16", "q8_0": "bf16"}


def weight_bytes(dtype: str) -> float:
    if dtype not in WEIGHT_BYTES:
        raise InvalidRequestError(f"unknown weight dtype {dtype!r}; choose one of {', '.join(WEIGHT_BYTES)}")
    return WEIGHT_BYTES[dtype]


def kv_bytes(dtype: str) -> float:
    if dtype not in KV_BYTES:
        raise InvalidRequestError(f"unknown KV-cache dtype {dtype!r}; choose one of {', '.join(KV_BYTES)}")
    return KV_BYTES[dtype]
