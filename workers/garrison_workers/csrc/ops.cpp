// The ops' registration. GARRISON_NAMESPACE (garrison_<digest of these sources>, from native.py) passes through one
// more macro so that it is expanded before TORCH_LIBRARY pastes it into names.

#include <torch/library.h>

#include "ops.h"
#include "simd.h"

#define GARRISON_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define GARRISON_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

GARRISON_LIBRARY(GARRISON_NAMESPACE, m) {
  m.def("a8_mm(Tensor x, Tensor codes, Tensor scales, Tensor offsets, int group, int bits) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor mask, float scale) -> Tensor");
  m.def("a8_supported() -> bool", [] { return garrison::cpu_supports_avx512_vnni(); });
  m.def("decode_attention_supported() -> bool", [] { return garrison::cpu_supports_avx512(); });
}

GARRISON_LIBRARY_IMPL(GARRISON_NAMESPACE, CPU, m) {
  m.impl("a8_mm", garrison::a8_mm);
  m.impl("decode_attention", garrison::decode_attention);
}
