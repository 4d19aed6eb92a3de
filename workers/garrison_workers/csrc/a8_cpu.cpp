// a8_mm: y[T, N] = x[T, K] @ W.T (float32) for int4 or int8 weights with group scales, on CPUs with AVX512-VNNI
// (Intel Cascade Lake and later, AMD Zen 4 and later). llama.cpp's arithmetic (its Q4/Q8 x Q8_0 dot products):
//
//   each block of 32 inputs of a row of x is rounded to int8 with its own scale d = max|x| / 127, and the weights'
//   unsigned codes u multiply those int8 values with VPDPBUSD, 64 products per instruction, summed exactly in int32;
//   with w = u s + o for a group of the weight (o = z - 8 s for int4 codes 0..15 read as u - 8, o = z - 128 s for
//   int8 stored as u = q + 128), a group contributes
//       s * sum_b d_b * sum(u * xq)  +  o * sum_b d_b * sum(xq)
//   (the second term from each block's sum of its int8 values), accumulated in float32.
//
// Why: on this class of CPU a 512-bit vector instruction is the unit of cost, and PyTorch's packed int4 kernel
// spends ~5 of them per 16 weights (widen each code to float32, scale it, one float FMA); here 64 int4 weights cost
// ~2.5 (unpack two nibble planes, one VPDPBUSD per row). The price is llama.cpp's: activations (bf16 or float32)
// rounded to 8 bits per block of 32.
//
// Layouts (tile_codes in kernels.py), for 16 output features (a tile): int8, 64 bytes per 4 inputs, byte 4 r + j
// holding row r's code of input j; int4, 64 bytes per 8 inputs, byte 4 r + j holding row r's code of input j in its
// low nibble and of input 4 + j in its high nibble. Either way each 64-byte operand has a row per 32-bit lane, as
// VPDPBUSD wants. Scales and offsets are [N / 16, K / group, 16]: a tile's own, one after the other.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "ops.h"
#include "simd.h"

namespace garrison {
namespace {

constexpr int64_t kTile = 16;   // output features per tile: one 32-bit lane each
constexpr int64_t kBlock = 32;  // inputs per activation scale
constexpr int64_t kRows = 8;    // activation rows that share each unpacked operand
// Codes are requested this many bytes ahead of use: a decode step reads every weight once, from memory or the
// last-level cache, and the hardware prefetcher alone kept SmolLM2's 80 MB at ~19 GB/s here, this at ~30.
constexpr int64_t kPrefetch = 4096;

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni")

// x's rows rounded to int8, a scale per block of 32 and each block's scale times the sum of its int8 values.
struct Activations {
  int8_t* q;       // [T, K]
  float* scale;    // [T, K / 32]
  float* sum;      // [T, K / 32]
};

template <typename T>
void quantize_row(const T* x, int64_t k, int8_t* q, float* scale, float* sum) {
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const __m512 lo = load16(x + b * kBlock), hi = load16(x + b * kBlock + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    // A NaN input (max may drop it) makes the block's scale NaN, and an infinite one makes it infinite: either way
    // the row's outputs are not finite, as a float matmul's would not be, rather than quietly rounded values.
    if (_mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q)) amax = NAN;
    const float d = amax / 127.0f;
    // A block whose largest value is below 2^-100 (subnormals included) is scaled up by 2^100, exactly, first:
    // 127 / amax would overflow to inf and round every value of the block to garbage.
    const float lift = amax < 0x1p-100f ? 0x1p100f : 1.0f;
    const float inverse = amax > 0.0f ? 127.0f / (amax * lift) : 0.0f;
    const __m512 up = _mm512_set1_ps(lift), factor = _mm512_set1_ps(inverse);  // nearest, ties to even:
    const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(lo, up), factor));
    const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(hi, up), factor));
    _mm_storeu_si128((__m128i*)(q + b * kBlock), _mm512_cvtsepi32_epi8(qlo));
    _mm_storeu_si128((__m128i*)(q + b * kBlock + 16), _mm512_cvtsepi32_epi8(qhi));
    scale[b] = d;
    sum[b] = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi)));
  }
}

struct Problem {
  Activations x;
  const uint8_t* codes;   // a tile's codes, tile after tile (see the layouts above)
  const void* scales;     // [N / 16, K / group, 16]
  const void* offsets;    // [N / 16, K / group, 16]
  bool half;              // scales and offsets are float16 (a GGUF file's, exactly), else float32
  float* y;               // [T, N]
  int64_t k, n, group;
};

__m512 load_scales(const void* base, int64_t at, bool half) {
  if (half) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)base + at)));
  return _mm512_loadu_ps((const float*)base + at);
}

// The 8 operands of one block of 32 inputs (operand i: inputs 4 i .. 4 i + 3 of each row), from 4 (int4) or 8
// (int8) 64-byte chunks.
template <int Bits>
struct Operands {
  __m512i v[8];
  explicit Operands(const uint8_t* chunk) {
    if constexpr (Bits == 8) {
      for (int i = 0; i < 8; ++i) v[i] = _mm512_loadu_si512(chunk + 64 * i);
    } else {
      const __m512i nibble = _mm512_set1_epi8(0x0F);
      for (int c = 0; c < 4; ++c) {
        const __m512i codes = _mm512_loadu_si512(chunk + 64 * c);
        v[2 * c] = _mm512_and_si512(codes, nibble);
        v[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(codes, 4), nibble);
      }
    }
  }
};

template <int R, int Bits>
void tile_rows(const Problem& p, int64_t tile, int64_t row) {
  const int64_t blocks = p.k / kBlock, per_group = p.group / kBlock, groups = p.k / p.group;
  constexpr int64_t kBlockBytes = kBlock * kTile * Bits / 8;
  const uint8_t* chunk = p.codes + tile * blocks * kBlockBytes;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t at = (tile * groups + g) * kTile;
    const __m512 scale = load_scales(p.scales, at, p.half);
    float sum[R];
    for (int r = 0; r < R; ++r) sum[r] = 0.0f;
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b, chunk += kBlockBytes) {
      for (int64_t line = 0; line < kBlockBytes; line += 64)
        _mm_prefetch((const char*)chunk + kPrefetch + line, _MM_HINT_T0);
      const Operands<Bits> w(chunk);
      // One integer sum per row and operand chain: with 4 or more rows their chains interleave; fewer rows split
      // each into two (VPDPBUSD's result is not ready for the next one at once).
      constexpr int kChains = R >= 4 ? 1 : 2;
      __m512i dot[R][kChains];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < kChains; ++c) dot[r][c] = _mm512_setzero_si512();
      for (int i = 0; i < 8; ++i)
        for (int r = 0; r < R; ++r) {
          const int32_t* quads = (const int32_t*)(p.x.q + (row + r) * p.k + b * kBlock);
          dot[r][i % kChains] = _mm512_dpbusd_epi32(dot[r][i % kChains], w.v[i], _mm512_set1_epi32(quads[i]));
        }
      for (int r = 0; r < R; ++r) {
        const int64_t at_x = (row + r) * blocks + b;
        __m512i total = dot[r][0];
        if constexpr (kChains == 2) total = _mm512_add_epi32(total, dot[r][1]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(scale, _mm512_set1_ps(p.x.scale[at_x])),
                                 acc[r]);
        sum[r] += p.x.sum[at_x];
      }
    }
    const __m512 offset = load_scales(p.offsets, at, p.half);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(offset, _mm512_set1_ps(sum[r]), acc[r]);
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(p.y + (row + r) * p.n + tile * kTile, acc[r]);
}

template <int Bits>
void run(const Problem& p, int64_t rows) {
  // Tiles split among threads; each thread takes every row of its tiles, so a tile's codes come from memory once
  // per call and from cache for the rows after the first kRows. A thread gets at least ~64K products: waking
  // threads costs more than a small matrix.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / (kTile * p.k * std::max<int64_t>(rows, 1)));
  at::parallel_for(0, p.n / kTile, grain, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      int64_t row = 0;
      for (; row + kRows <= rows; row += kRows) tile_rows<kRows, Bits>(p, tile, row);
      if (rows - row >= 4) tile_rows<4, Bits>(p, tile, row), row += 4;
      if (rows - row >= 2) tile_rows<2, Bits>(p, tile, row), row += 2;
      if (rows - row >= 1) tile_rows<1, Bits>(p, tile, row);
    }
  });
}

#pragma GCC pop_options

}  // namespace

at::Tensor a8_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& offsets,
                 int64_t group, int64_t bits) {
  TORCH_CHECK(cpu_supports_avx512_vnni(), "a8_mm needs AVX512-VNNI, which this CPU lacks");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, not ", bits);
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "x must be [T, K] bfloat16 or float32");
  const int64_t rows = x.size(0), k = x.size(1), per_chunk = 512 / (kTile * bits);  // inputs per 64 bytes
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.size(2) == 64 &&
                  codes.size(1) * per_chunk == k,
              "codes must be [N / 16, K / ", per_chunk, ", 64] uint8 for ", k, " inputs of ", bits, " bits");
  TORCH_CHECK(group > 0 && group % kBlock == 0 && k % group == 0, "group ", group, " must be a multiple of ", kBlock,
              " that divides ", k);
  const int64_t n = codes.size(0) * kTile;
  for (const at::Tensor* t : {&scales, &offsets})
    TORCH_CHECK((t->scalar_type() == at::kFloat || t->scalar_type() == at::kHalf) &&
                    t->scalar_type() == scales.scalar_type() && t->dim() == 3 && t->size(0) == n / kTile &&
                    t->size(1) == k / group && t->size(2) == kTile,
                "scales and offsets must be [N / 16, K / group, 16], both float32 or both float16");
  const at::Tensor xc = x.contiguous(), cc = codes.contiguous(), sc = scales.contiguous(), oc = offsets.contiguous();
  at::Tensor q = at::empty({rows, k}, x.options().dtype(at::kChar));
  at::Tensor blocks = at::empty({2, rows, k / kBlock}, x.options().dtype(at::kFloat));
  float* per_block = blocks.data_ptr<float>();
  const Activations a{q.data_ptr<int8_t>(), per_block, per_block + rows * (k / kBlock)};
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int8_t* q_t = a.q + t * k;
      float *scale_t = a.scale + t * (k / kBlock), *sum_t = a.sum + t * (k / kBlock);
      if (xc.scalar_type() == at::kFloat) quantize_row(xc.data_ptr<float>() + t * k, k, q_t, scale_t, sum_t);
      else quantize_row(xc.data_ptr<c10::BFloat16>() + t * k, k, q_t, scale_t, sum_t);
    }
  });
  // float32, not x's dtype: the sums are float32, and a row-parallel layer's partial sums, rounded to bf16, would
  // move the next layer's int8 roundings on one rank count and not another.
  at::Tensor y = at::empty({rows, n}, x.options().dtype(at::kFloat));
  const Problem p{a, cc.data_ptr<uint8_t>(), sc.data_ptr(), oc.data_ptr(), scales.scalar_type() == at::kHalf,
                  y.data_ptr<float>(), k, n, group};
  if (bits == 4) run<4>(p, rows); else run<8>(p, rows);
  return y;
}

}  // namespace garrison
