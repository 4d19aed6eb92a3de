// Garrison's CPU kernels, registered as torch ops in ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

namespace garrison {

// y[T, N] = x[T, K] @ W.T for int4 or int8 weights, x rounded to int8 per block of 32 (a8_cpu.cpp).
at::Tensor a8_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& offsets,
                 int64_t group, int64_t bits);

// One query token per sequence over its keys in the paged KV cache (attention_cpu.cpp).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& slots, const at::Tensor& mask, double scale);

}  // namespace garrison
