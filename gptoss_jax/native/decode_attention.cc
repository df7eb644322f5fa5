// One new token per row attending to a KV cache on CPU, as an XLA FFI custom call: attention with
// sinks (SPEC 2.3) for decode. XLA:CPU runs this step as small GEMMs at ~2 GB/s of cache (4.4 ms per
// full gpt-oss-20b layer at 4096 keys); this reads each cached key and value once.
//
// GptossDecodeAttention: o[b, n, g] = softmax over {sink[n, g]} and the visible keys s of
//   (q[b, n, g] . k[b, s, n]) / sqrt(D), applied to v[b, s, n] (the sink has no value and no scale).
//   Key s is visible iff 0 <= k_pos[b, s] <= q_pos[b] and, when window > 0, q_pos[b] - k_pos[b, s] < window,
//   so a full cache and a sliding ring (any slot order, empty slots at -1) are read alike.
//   q [B, N, G, D] float32, k and v [B, S, N, D] bfloat16, q_pos [B], k_pos [B, S] int32, sinks [N, G]
//   float32; o [B, N, G, D] float32. Logits and sums in float32, keys in order.
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "gptoss_jax/native/formats.h"
#include "gptoss_jax/native/parallel.h"

namespace {

using gptoss::Bf16ToFloat;

constexpr int64_t kLanes = 8;  // partial sums per dot product: one AVX2 register, which the compiler fills

// e^x for x <= 0 (logits minus their maximum) in float32, within ~2 ulp: 2^n e^r with n = round(x / ln 2)
// and |r| <= ln 2 / 2 (Cephes' expf polynomial). Branch-free, so a loop of it vectorizes (std::exp is a
// call per element, and was most of this kernel's time). Below -87.3 it returns ~1e-38 rather than 0.
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.3f);
  const float n = static_cast<float>(static_cast<int32_t>(x * 1.44269504088896341f - 0.5f));  // nearest, for x <= 0
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float power;
  std::memcpy(&power, &bits, sizeof(power));
  return (p * r * r + r + 1.0f) * power;
}

// x[i] = e^x[i] for n values <= 0: `ExpNonPositive`, eight at a time where AVX2 has the registers.
inline void ExpNonPositiveAll(float* x, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_max_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(-87.3f));
    const __m256 k = _mm256_cvtepi32_ps(_mm256_cvttps_epi32(_mm256_fmsub_ps(v, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f))));
    const __m256 r = _mm256_fmadd_ps(k, _mm256_set1_ps(2.12194440e-4f), _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), v));
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f}) {
      p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    const __m256 er = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
    const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    _mm256_storeu_ps(x + i, _mm256_mul_ps(er, _mm256_castsi256_ps(power)));
  }
#endif
  for (; i < n; ++i) x[i] = ExpNonPositive(x[i]);
}

// lanes[j] = sum over d of key[d] * q[d * stride + j], j < kLanes: the logits of kLanes query heads
// (q transposed, scaled). Four chains of multiply-adds over d, so none waits on the one before.
inline void Logits(const float* key, const float* q, int64_t D, int64_t stride, float* lanes) {
#if defined(__AVX2__) && defined(__FMA__)
  __m256 chains[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    for (int64_t c = 0; c < 4; ++c) chains[c] = _mm256_fmadd_ps(_mm256_set1_ps(key[d + c]), _mm256_loadu_ps(q + (d + c) * stride), chains[c]);
  }
  for (; d < D; ++d) chains[0] = _mm256_fmadd_ps(_mm256_set1_ps(key[d]), _mm256_loadu_ps(q + d * stride), chains[0]);
  _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(chains[0], chains[1]), _mm256_add_ps(chains[2], chains[3])));
#else
  std::fill(lanes, lanes + kLanes, 0.0f);
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] += key[d] * q[d * stride + j];
  }
#endif
}

// out[d] += sum over c < count of weights[c] * values[c * stride + d], d < D: a group of keys' values
// added to one head's output, which is loaded and stored once per group.
inline void AddWeighted(const float* values, int64_t stride, const float* weights, int64_t count, int64_t D, float* out) {
  int64_t d = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; d + 8 <= D; d += 8) {
    __m256 sum = _mm256_loadu_ps(out + d);
    for (int64_t c = 0; c < count; ++c) sum = _mm256_fmadd_ps(_mm256_set1_ps(weights[c]), _mm256_loadu_ps(values + c * stride + d), sum);
    _mm256_storeu_ps(out + d, sum);
  }
#endif
  for (; d < D; ++d) {
    for (int64_t c = 0; c < count; ++c) out[d] += weights[c] * values[c * stride + d];
  }
}

constexpr int64_t kKeysPerPart = 512;  // keys of a row per task: every head reads them in one pass

// Softmax statistics of one part of a row's keys, per query head (N x G of them): the largest logit,
// the sum of e^(logit - largest) and the sum of those weights times the values.
struct Part {
  std::vector<float> largest, total, out;  // [H], [H], [H, D]
};

// Part [first, last) of row b's keys: each visible key's [N, D] values are read once, for every head.
Part AttendPart(const float* q, const uint16_t* k, const uint16_t* v, const int32_t* k_pos, int32_t q_pos,
                int64_t window, int64_t first, int64_t last, int64_t N, int64_t G, int64_t D) {
  const int64_t H = N * G, L = (G + kLanes - 1) / kLanes * kLanes;  // L: G padded to whole registers
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<int64_t> visible;
  for (int64_t s = first; s < last; ++s) {
    const int32_t p = k_pos[s];
    if (p >= 0 && p <= q_pos && (window <= 0 || q_pos - p < window)) visible.push_back(s);
  }
  const int64_t V = static_cast<int64_t>(visible.size());
  Part part{std::vector<float>(H, -std::numeric_limits<float>::infinity()), std::vector<float>(H, 0.0f),
            std::vector<float>(H * D, 0.0f)};
  // q as [N, D, L]: a kv head's G logits are then D multiply-adds of whole registers, with no sum across lanes.
  std::vector<float> q_ndl(N * D * L, 0.0f), row(N * D), weights(V * H);  // weights [V, H]
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t d = 0; d < D; ++d) q_ndl[(n * D + d) * L + g] = q[(n * G + g) * D + d] * scale;
    }
  }
  for (int64_t i = 0; i < V; ++i) {
    const uint16_t* key = k + visible[i] * N * D;
    for (int64_t j = 0; j < N * D; ++j) row[j] = Bf16ToFloat(key[j]);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t l = 0; l < L; l += kLanes) {
        float lanes[kLanes];  // logits of query heads l .. l + kLanes: one register
        Logits(row.data() + n * D, q_ndl.data() + n * D * L + l, D, L, lanes);
        for (int64_t g = l; g < std::min(G, l + kLanes); ++g) {
          weights[i * H + n * G + g] = lanes[g - l];
          part.largest[n * G + g] = std::max(part.largest[n * G + g], lanes[g - l]);
        }
      }
    }
  }
  for (int64_t i = 0; i < V; ++i) {
    for (int64_t h = 0; h < H; ++h) weights[i * H + h] -= part.largest[h];
  }
  ExpNonPositiveAll(weights.data(), V * H);
  // Values in groups of kGroup keys, so each head's output row is loaded and stored once per group.
  constexpr int64_t kGroup = 4;
  std::vector<float> rows(kGroup * N * D);
  for (int64_t i0 = 0; i0 < V; i0 += kGroup) {
    const int64_t count = std::min(kGroup, V - i0);
    for (int64_t c = 0; c < count; ++c) {
      const uint16_t* value = v + visible[i0 + c] * N * D;
      for (int64_t j = 0; j < N * D; ++j) rows[c * N * D + j] = Bf16ToFloat(value[j]);
    }
    for (int64_t h = 0; h < H; ++h) {
      float group_weights[kGroup];
      for (int64_t c = 0; c < count; ++c) part.total[h] += group_weights[c] = weights[(i0 + c) * H + h];
      AddWeighted(rows.data() + (h / G) * D, N * D, group_weights, count, D, part.out.data() + h * D);
    }
  }
  return part;
}

// The parts of one row merged, starting from the sink (a logit with no value): o [H, D].
void Merge(const Part* parts, int64_t count, const float* sinks, int64_t H, int64_t D, float* o) {
  for (int64_t h = 0; h < H; ++h) {
    float largest = sinks[h];
    for (int64_t p = 0; p < count; ++p) largest = std::max(largest, parts[p].largest[h]);
    // NaN if everything is -inf (a -inf sink and no visible key), as the reference's softmax gives.
    float total = std::exp(sinks[h] - largest);
    float* out = o + h * D;
    std::fill(out, out + D, 0.0f);
    for (int64_t p = 0; p < count; ++p) {
      const Part& part = parts[p];
      if (part.total[h] == 0.0f) continue;  // no visible key (its largest is -inf)
      const float rescale = std::exp(part.largest[h] - largest);
      total += part.total[h] * rescale;
      for (int64_t d = 0; d < D; ++d) out[d] += part.out[h * D + d] * rescale;
    }
    for (int64_t d = 0; d < D; ++d) out[d] /= total;
  }
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::BF16> k,
                               ffi::Buffer<ffi::BF16> v, ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> k_pos,
                               ffi::Buffer<ffi::F32> sinks, int64_t window, ffi::ResultBuffer<ffi::F32> o) {
  auto qdims = q.dimensions(), kdims = k.dimensions();
  if (qdims.size() != 4 || kdims.size() != 4) return ffi::Error::InvalidArgument("q must be [B, N, G, D] and k [B, S, N, D]");
  const int64_t B = qdims[0], N = qdims[1], G = qdims[2], D = qdims[3], S = kdims[1], H = N * G;
  if (kdims[0] != B || kdims[2] != N || kdims[3] != D || v.element_count() != k.element_count()) {
    return ffi::Error::InvalidArgument("k and v must be [B, S, N, D] for q [B, N, G, D]");
  }
  if (q_pos.element_count() != B || k_pos.element_count() != B * S || sinks.element_count() != H) {
    return ffi::Error::InvalidArgument("q_pos must be [B], k_pos [B, S] and sinks [N, G]");
  }
  const auto* keys = reinterpret_cast<const uint16_t*>(k.typed_data());
  const auto* values = reinterpret_cast<const uint16_t*>(v.typed_data());
  const int64_t per_row = std::max<int64_t>(1, (S + kKeysPerPart - 1) / kKeysPerPart);
  std::vector<Part> parts(B * per_row);
  gptoss::ParallelFor(pool, B * per_row, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / per_row, first = (t % per_row) * kKeysPerPart;
      parts[t] = AttendPart(q.typed_data() + b * H * D, keys + b * S * N * D, values + b * S * N * D, k_pos.typed_data() + b * S,
                            q_pos.typed_data()[b], window, first, std::min(S, first + kKeysPerPart), N, G, D);
    }
  });
  for (int64_t b = 0; b < B; ++b) Merge(parts.data() + b * per_row, per_row, sinks.typed_data(), H, D, o->typed_data() + b * H * D);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GPTOSS_NAME(GptossDecodeAttention, GPTOSS_LEVEL), DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());
