"""Quantized weights: one canonical form for every low-bit format, and the kernels that compute with it.

Every quantized checkpoint (compressed-tensors FP8 and INT4, GGUF Q4_0/Q4_1/Q8_0, `models import --quantize`)
is read into the same canonical tensors, under Garrison's parameter names (`formats`):

    <weight>_int4   uint8 [N, K/2]  two 4-bit codes per byte, element 2j in the low nibble; w = (q - 8) * s + z
    <weight>_int8   int8  [N, K]                                                              w = q * s
    <weight>_fp8    float8_e4m3fn [N, K], weight-only                                         w = q * s
    <weight>_fp8_dynamic   the same, activations quantized to FP8 per token at run time
    <weight>_scale  float32 [N, K / group]   one scale per group of `group` input features
    <weight>_zero   float32 [N, K / group]   int4 only, optional: the float offset z of each group

A linear weight is [N out, K in]; fused experts add a leading [E]. The canonical form is what the
encrypted store holds (quantized payloads and scales are records like any tensor) and what the
parallel layers shard (group scales are cut with their columns). Kernel layouts (packed tiles) are
derived from it once the weights are loaded (`kernels`), so the store never depends on a kernel.
"""
