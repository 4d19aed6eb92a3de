// decode_attention: one query token per sequence over that sequence's keys, read in place from the paged KV cache
// (CPUs with AVX512F).
//
//   out[b, h] = sum_l p[l] v[slots[b, l], h / G],  p = softmax over the keys with mask[b, l] of scale * q[b, h] . k
//
// for H query heads over KV cache heads (G = H / KV query heads share a cache head, as sdpa's enable_gqa does).
//
// Why: the padded path gathered every row's keys and values into new tensors (index_select) and then ran sdpa over
// the copies: with 32 sequences SmolLM2's decode step spent ~13 ms of ~43 in those two, writing and reading again
// bytes the cache already holds. Here each key and value is read once, where it lies; sums and the softmax are
// float32 whatever the cache's dtype.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "ops.h"
#include "simd.h"

namespace garrison {
namespace {

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")

// e^x: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so n ln2 is exact), e^r by its Taylor series to r^6
// (relative error below 2e-7), times 2^n. Inputs below -104 give 0 (e^-104 is below float32's smallest value); NaN
// stays NaN (MAXPS returns its second operand when either is NaN).
__m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

struct Problem {
  const void* q;                 // [B, H, D]
  const void* k;                 // [S, KV, D]
  const void* v;                 // [S, KV, D]
  const int64_t* slots;          // [B, L]
  const bool* mask;              // [B, L], true: the row attends to the key
  float* out;                    // [B, H, D]
  int64_t heads, kv_heads, dim, keys, cache_slots;
  float scale;
  std::atomic<bool>* bad_slot;   // set when a slot lies outside the cache (the key is skipped, the call fails)
};

// r[i] = the sum of a[i]'s 16 lanes: 16 horizontal sums in 45 instructions rather than ~8 each. Lanes are added
// pairwise within 128-bit quarters (unpack, then shuffle), then across quarters.
__m512 sum16(const __m512* a) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // quarter q of u[i]: the quarter-q sums of a[4 i] .. a[4 i + 3]
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// acc[g, offset .. offset + 15] = sum over the keys of p[g, l] v[l, offset ..] for NG query heads, the sums held in
// registers (NG is a template argument so that they can be).
template <int NG, typename KV>
void weigh_values(const float* p, int64_t stride, const KV* const* values, int64_t keys, int64_t offset,
                  float* acc, int64_t dim) {
  __m512 sum[NG];
  for (int g = 0; g < NG; ++g) sum[g] = _mm512_setzero_ps();
  for (int64_t l = 0; l < keys; ++l) {
    if (!values[l]) continue;  // weighs 0
    const __m512 v = load16(values[l] + offset);
    for (int g = 0; g < NG; ++g) sum[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * stride + l]), v, sum[g]);
  }
  for (int g = 0; g < NG; ++g) _mm512_storeu_ps(acc + g * dim + offset, sum[g]);
}

template <typename KV>
void weigh_values(int heads, const float* p, int64_t stride, const KV* const* values, int64_t keys, int64_t offset,
                  float* acc, int64_t dim) {
  switch (heads) {
    case 1: return weigh_values<1>(p, stride, values, keys, offset, acc, dim);
    case 2: return weigh_values<2>(p, stride, values, keys, offset, acc, dim);
    case 3: return weigh_values<3>(p, stride, values, keys, offset, acc, dim);
    case 4: return weigh_values<4>(p, stride, values, keys, offset, acc, dim);
    case 5: return weigh_values<5>(p, stride, values, keys, offset, acc, dim);
    case 6: return weigh_values<6>(p, stride, values, keys, offset, acc, dim);
    case 7: return weigh_values<7>(p, stride, values, keys, offset, acc, dim);
    default: return weigh_values<8>(p, stride, values, keys, offset, acc, dim);
  }
}

struct Work {
  std::vector<float> floats;
  std::vector<const void*> rows;
};

// One sequence and cache head: its G query heads over its keys (scores, then softmax, then the weighted values).
template <typename Q, typename KV>
void attend(const Problem& p, int64_t b, int64_t h, Work& work) {
  const int64_t G = p.heads / p.kv_heads, D = p.dim, L = p.keys, chunks = D / 16;
  const int64_t L16 = (L + 15) / 16 * 16;
  work.floats.resize(G * D + G * L16 + G * D);
  float* qf = work.floats.data();    // [G, D], scaled
  float* s = qf + G * D;             // [G, L16]: scores, then weights
  float* acc = s + G * L16;          // [G, D]
  work.rows.assign(2 * L16, nullptr);
  const KV** keys = reinterpret_cast<const KV**>(work.rows.data());  // [L16], null: not attended
  const KV** values = keys + L16;                                     // [L16]
  const Q* q = static_cast<const Q*>(p.q) + (b * p.heads + h * G) * D;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < chunks; ++c)
      _mm512_storeu_ps(qf + g * D + 16 * c, _mm512_mul_ps(load16(q + g * D + 16 * c), _mm512_set1_ps(p.scale)));
  const int64_t* slots = p.slots + b * L;
  const bool* mask = p.mask + b * L;
  for (int64_t l = 0; l < L; ++l) {
    if (!mask[l]) continue;
    if (slots[l] < 0 || slots[l] >= p.cache_slots) {
      p.bad_slot->store(true, std::memory_order_relaxed);
      continue;
    }
    keys[l] = static_cast<const KV*>(p.k) + (slots[l] * p.kv_heads + h) * D;
    values[l] = static_cast<const KV*>(p.v) + (slots[l] * p.kv_heads + h) * D;
  }
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t block = 0; block < L16; block += 16) {
    __mmask16 live = 0;
    for (int i = 0; i < 16; ++i) live |= static_cast<__mmask16>(keys[block + i] != nullptr) << i;
    for (int64_t g = 0; g < G; ++g) {
      __m512 dots[16];
      for (int i = 0; i < 16; ++i) {
        dots[i] = _mm512_setzero_ps();
        if (const KV* key = keys[block + i])
          for (int64_t c = 0; c < chunks; ++c)
            dots[i] = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * D + 16 * c), load16(key + 16 * c), dots[i]);
      }
      _mm512_storeu_ps(s + g * L16 + block, _mm512_mask_mov_ps(minus_inf, live, sum16(dots)));
    }
  }
  // Softmax per query head; keys not attended weigh exactly 0, and a row without a key to attend gets zeros.
  std::vector<float> total(G);
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * L16;
    __m512 top = minus_inf;
    for (int64_t l = 0; l < L16; l += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(sg + l));
    const float m = _mm512_reduce_max_ps(top);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t l = 0; l < L16; l += 16) {
      const __m512 x = _mm512_loadu_ps(sg + l);
      // NaN counts as live: a NaN score (a NaN in the query or an attended key) makes the row's output NaN, as
      // sdpa's would be, so the sampler fails that sequence instead of it quietly attending to the others.
      const __mmask16 live = _mm512_cmp_ps_mask(x, minus_inf, _CMP_NEQ_UQ);
      const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(x, _mm512_set1_ps(m))));
      _mm512_storeu_ps(sg + l, e);
      sum = _mm512_add_ps(sum, e);
    }
    total[g] = _mm512_reduce_add_ps(sum);
  }
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t g = 0; g < G; g += 8)
      weigh_values<KV>(static_cast<int>(std::min<int64_t>(8, G - g)), s + g * L16, L16, values, L, 16 * c,
                       acc + g * D, D);
  float* out = p.out + (b * p.heads + h * G) * D;
  for (int64_t g = 0; g < G; ++g) {
    const __m512 inverse = _mm512_set1_ps(total[g] > 0.0f ? 1.0f / total[g] : 0.0f);
    for (int64_t c = 0; c < chunks; ++c)
      _mm512_storeu_ps(out + g * D + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(acc + g * D + 16 * c), inverse));
  }
}

template <typename Q, typename KV>
void run(const Problem& p, int64_t rows) {
  at::parallel_for(0, rows * p.kv_heads, 1, [&](int64_t begin, int64_t end) {
    Work work;
    for (int64_t task = begin; task < end; ++task) attend<Q, KV>(p, task / p.kv_heads, task % p.kv_heads, work);
  });
}

#pragma GCC pop_options

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& slots, const at::Tensor& mask, double scale) {
  TORCH_CHECK(cpu_supports_avx512(), "decode_attention needs AVX512, which this CPU lacks");
  TORCH_CHECK(q.dim() == 3 && (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "q must be [B, H, D] float32 or bfloat16");
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  TORCH_CHECK(dim % 16 == 0, "the head dimension must be a multiple of 16, not ", dim);
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes() && k_cache.size(2) == dim &&
                  k_cache.scalar_type() == v_cache.scalar_type() &&
                  (k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16),
              "the caches must be [S, KV, D] float32 or bfloat16, both alike, with q's D");
  const int64_t kv_heads = k_cache.size(1);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, heads, " query heads do not group over ", kv_heads,
              " cache heads");
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == rows && slots.scalar_type() == at::kLong,
              "slots must be [B, L] int64");
  TORCH_CHECK(mask.sizes() == slots.sizes() && mask.scalar_type() == at::kBool, "mask must be [B, L] bool");
  const at::Tensor qc = q.contiguous(), kc = k_cache.contiguous(), vc = v_cache.contiguous();
  const at::Tensor sc = slots.contiguous(), mc = mask.contiguous();
  std::atomic<bool> bad_slot{false};
  at::Tensor out = at::empty({rows, heads, dim}, q.options().dtype(at::kFloat));
  const Problem p{qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), sc.data_ptr<int64_t>(), mc.data_ptr<bool>(),
                  out.data_ptr<float>(), heads, kv_heads, dim, sc.size(1), kc.size(0), static_cast<float>(scale),
                  &bad_slot};
  const bool q32 = qc.scalar_type() == at::kFloat, kv32 = kc.scalar_type() == at::kFloat;
  if (q32 && kv32) run<float, float>(p, rows);
  else if (q32) run<float, c10::BFloat16>(p, rows);
  else if (kv32) run<c10::BFloat16, float>(p, rows);
  else run<c10::BFloat16, c10::BFloat16>(p, rows);
  TORCH_CHECK(!bad_slot.load(), "a slot of an attended key lies outside the cache's ", kc.size(0), " slots");
  return out;
}

}  // namespace garrison
