// What Garrison's CPU kernels share: 16-lane float32 loads from float32 or bfloat16, and the CPU checks.
#pragma once

#include <c10/util/BFloat16.h>

#include <immintrin.h>

namespace garrison {

#pragma GCC push_options
#pragma GCC target("avx512f")

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

// bfloat16 is float32's upper half: widen each to 32 bits and shift it into place.
inline __m512 load16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

#pragma GCC pop_options

inline bool cpu_supports_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

inline bool cpu_supports_avx512_vnni() { return cpu_supports_avx512() && __builtin_cpu_supports("avx512vnni"); }

}  // namespace garrison
