// One pass over each row of teacher logits: top-k (sorted) and log-partitions.
//
// Built and loaded by pipeline/teachers/native.py (g++ -O3, no torch headers, ctypes).
// Each row (V floats, a few tens of KB) is read from memory once; the passes that follow
// run on it while it sits in the core's cache:
//   1. block maxima: block b holds the columns b, b + B, ..., b + 7B (B = V / 8, so the
//      loads are contiguous), the columns past 8B are the tail; row max = max of both;
//   2. top-k threshold thr: at least k block maxima (so k entries) are >= thr, found by
//      bisection between a bound and the row max (block_threshold); every top-k entry is >= thr;
//   3. per temperature t: log sum exp(z / t) = m / t + log sum exp((z - m) / t), with an
//      AVX2 exp (degree-5 polynomial, relative error ~2e-7) and eight-lane float partial sums. The first of these
//      passes also collects the few entries >= thr (a compare per eight entries), which are
//      sorted by (value desc, column asc): ties go to the lower column, deterministically.
// Rows whose vocabulary has fewer than 2k blocks select from every column.
//
// Shapes: rows R, vocabulary V (row stride ld >= V), temperatures P, k selected.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KD_AVX2 1
#endif

namespace {

constexpr int64_t kBlock = 8;  // entries per block, as blocked_topk in extract.py

#ifdef KD_AVX2
// exp(x) for x <= 0 (every caller subtracts the row max first), for sums that the terms
// near 0 dominate. x = n ln2 + r, exp(r) = 1 + r + r^2 p(r) with p a cubic fitted to
// relative error 1.2e-7 on |r| <= ln2 / 2 (least squares on Chebyshev nodes, weighted
// by 1 / exp), 2^n by exponent bits; n = round(x / ln2) by the 1.5 * 2^23 trick (the sum's
// low mantissa bits hold n). x is clamped at -87.3: a masked (-inf) entry adds 1.2e-38,
// nothing to a sum >= 1. One-constant ln2 reduction: ~1e-7 more near 0, ~2e-6 at the clamp.
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147180559945f), x);
  __m256 y = _mm256_set1_ps(8.333837950e-3f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.189857794e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.666688638e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.999914257e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(t), 23), _mm256_set1_epi32(127 << 23));
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

// bm[b] = max over the 8 members of block b; returns the max over bm and the tail, NaN
// when the row holds a NaN (max instructions would drop it).
float block_maxima(const float* z, int64_t V, int64_t B, float* bm) {
  int64_t b = 0;
  bool nan = false;
#ifdef KD_AVX2
  __m256 unordered = _mm256_setzero_ps();
  for (; b + 8 <= B; b += 8) {
    __m256 m = _mm256_loadu_ps(z + b);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(m, m, _CMP_UNORD_Q));
    for (int64_t i = 1; i < kBlock; ++i) {
      const __m256 v = _mm256_loadu_ps(z + i * B + b);
      unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      m = _mm256_max_ps(m, v);
    }
    _mm256_storeu_ps(bm + b, m);
  }
  nan = _mm256_movemask_ps(unordered) != 0;
#endif
  for (; b < B; ++b) {
    float m = z[b];
    nan = nan || std::isnan(m);
    for (int64_t i = 1; i < kBlock; ++i) {
      const float v = z[i * B + b];
      nan = nan || std::isnan(v);
      m = std::max(m, v);
    }
    bm[b] = m;
  }
  float best = -INFINITY;
  for (int64_t j = 0; j < B; ++j) best = std::max(best, bm[j]);
  for (int64_t j = kBlock * B; j < V; ++j) {
    nan = nan || std::isnan(z[j]);
    best = std::max(best, z[j]);
  }
  return nan ? NAN : best;
}

// Sort key: descending key order = descending value, then ascending column.
inline uint64_t sort_key(float value, int64_t col) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);  // float order as unsigned order
  return (static_cast<uint64_t>(bits) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(col));
}

inline int32_t key_column(uint64_t key) { return static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(key)); }

// Sum over the row of exp((z - m) * inv_t). With kScan, also the sort keys of every entry
// >= thr: the top-k candidate scan rides on the same loads (a compare and a rarely taken
// branch per eight entries).
template <bool kScan>
float sum_exp(const float* z, int64_t V, float m, float inv_t, float thr, std::vector<uint64_t>& keys) {
  int64_t j = 0;
  float total = 0.0f;
#ifdef KD_AVX2
  const __m256 vs = _mm256_set1_ps(m * inv_t), vt = _mm256_set1_ps(inv_t);  // (z - m) / t as one fmsub
  const __m256 vthr = _mm256_set1_ps(thr);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; j + 16 <= V; j += 16) {
    const __m256 x0 = _mm256_loadu_ps(z + j), x1 = _mm256_loadu_ps(z + j + 8);
    a0 = _mm256_add_ps(a0, exp256(_mm256_fmsub_ps(x0, vt, vs)));
    a1 = _mm256_add_ps(a1, exp256(_mm256_fmsub_ps(x1, vt, vs)));
    if (kScan) {
      uint32_t mask = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(x0, vthr, _CMP_GE_OQ))) |
                      static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(x1, vthr, _CMP_GE_OQ))) << 8;
      while (mask) {
        const int i = __builtin_ctz(mask);
        mask &= mask - 1;
        keys.push_back(sort_key(z[j + i], j + i));
      }
    }
  }
  total = hsum(_mm256_add_ps(a0, a1));
#endif
  for (; j < V; ++j) {
    total += std::exp((z[j] - m) * inv_t);
    if (kScan && z[j] >= thr) keys.push_back(sort_key(z[j], j));
  }
  return total;
}

// How many block maxima are >= t.
int64_t count_at_least(const float* bm, int64_t B, float t) {
  int64_t n = 0, b = 0;
#ifdef KD_AVX2
  const __m256 vt = _mm256_set1_ps(t);
  for (; b + 8 <= B; b += 8)
    n += __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(bm + b), vt, _CMP_GE_OQ)));
#endif
  for (; b < B; ++b) n += bm[b] >= t;
  return n;
}

// A threshold with at least k block maxima (so at least k entries) at or above it, and few
// more: bisection on the value between a bound known to have k maxima above it (the smallest
// of k strided group maxima) and the row max, stopping once k <= count <= k + k / 8.
float block_threshold(const float* bm, int64_t B, int64_t k, float row_max, std::vector<float>& group) {
  if (count_at_least(bm, B, row_max) >= k) return row_max;  // ties at the top
  const int64_t g = B / k;
  group.assign(bm, bm + k);
  for (int64_t j = 1; j < g; ++j)  // contiguous in q: vectorizes
    for (int64_t q = 0; q < k; ++q) group[q] = std::max(group[q], bm[j * k + q]);
  float lo = *std::min_element(group.begin(), group.end()), hi = row_max;
  if (!std::isfinite(lo)) return lo;  // masked (-inf) entries among the bound's groups: take every entry
  for (int it = 0; it < 32; ++it) {
    const float mid = lo + (hi - lo) * 0.5f;
    if (!(mid > lo && mid < hi)) break;
    const int64_t n = count_at_least(bm, B, mid);
    if (n < k) {
      hi = mid;
    } else {
      lo = mid;
      if (n <= k + k / 8) break;
    }
  }
  return lo;
}

// The k largest of the candidate keys, sorted, in keys[0:k].
void sort_candidates(std::vector<uint64_t>& keys, int64_t k) {
  if (static_cast<int64_t>(keys.size()) > 4 * k)
    std::partial_sort(keys.begin(), keys.begin() + k, keys.end(), std::greater<uint64_t>());
  else
    std::sort(keys.begin(), keys.end(), std::greater<uint64_t>());
}

}  // namespace

extern "C" {

// z: rows x ld floats (the first V columns used). inv_temps[P] = 1 / t.
// Out: lse[rows, P]; when k > 0, logprob[rows, k] = z - lse at t = 1 (inv_temps[0] must be 1)
// and ids[rows, k], sorted by value. Returns 0, or 1 when a row holds a NaN (its outputs are NaN).
int kd_topk_lse(const float* z, int64_t rows, int64_t V, int64_t ld, const float* inv_temps, int64_t P,
                int64_t k, float* lse, float* logprob, int32_t* ids) {
  const int64_t B = V / kBlock;
  std::vector<float> bm(std::max<int64_t>(B, 1));
  std::vector<float> scratch;
  std::vector<uint64_t> keys;
  keys.reserve(static_cast<size_t>(std::max<int64_t>(4 * k, 64)));
  int status = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* zr = z + r * ld;
    const float m = block_maxima(zr, V, B, bm.data());
    if (std::isnan(m)) {  // NaN out (the caller raises); a NaN would break the sort's ordering
      status = 1;
      std::fill(lse + r * P, lse + (r + 1) * P, NAN);
      std::fill(logprob + r * k, logprob + (r + 1) * k, NAN);
      std::fill(ids + r * k, ids + (r + 1) * k, 0);
      continue;
    }
    // every top-k entry is >= thr (with at least k block maxima >= thr); all columns for small vocabularies
    const float thr = k == 0 ? INFINITY : B >= 2 * k ? block_threshold(bm.data(), B, k, m, scratch) : -INFINITY;
    const float shift = std::isinf(m) ? 0.0f : m;  // an all -inf row gives -inf, a +inf entry +inf (as torch)
    keys.clear();
    for (int64_t p = 0; p < P; ++p) {
      const float sum = p == 0 && k > 0 ? sum_exp<true>(zr, V, shift, inv_temps[p], thr, keys)
                                        : sum_exp<false>(zr, V, shift, inv_temps[p], thr, keys);
      lse[r * P + p] = std::isinf(m) ? m : m * inv_temps[p] + std::log(sum);
    }
    if (k == 0) continue;
    sort_candidates(keys, k);
    for (int64_t j = 0; j < k; ++j) {
      const int32_t col = key_column(keys[j]);
      logprob[r * k + j] = zr[col] - lse[r * P];
      ids[r * k + j] = col;
    }
  }
  return status;
}

}  // extern "C"
