// Matrix-vector products for one-token decode on CPU, as XLA FFI custom calls. Each reads every weight
// byte once, converts it in registers and sums in float32; rows are split over XLA's own CPU thread
// pool. The instruction set is the compiler's target: CMakeLists.txt builds this file once per level
// (`native.LEVELS`: AMX, AVX-512, AVX2 + FMA, portable scalar loops for any CPU, aarch64 included), each
// into a library of its own whose handlers carry the level in their names (GPTOSS_LEVEL), and
// `native` loads the best one this CPU runs (cpu_level.cc).
//
// Both take a parameter stacked over layers plus the layer to use (and the MXFP4 one, the experts to
// use), so a decode step hands them the stacks as they are: slicing a layer out in XLA would make it
// copy the slice into a buffer of its own before every call (~100 MB per gpt-oss-20b layer and token).
//
// GptossMxfp4Matvec: y[p, r] = sum_c W[layer, expert[p]][r, c] * x[p, c], W given packed: blocks
//   [L, E, R, C/32, 16] (two E2M1 codes per byte, low nibble first) and E8M0 scales [L, E, R, C/32].
//   On x86, x is rounded to int16 per block and a block is an integer dot product in 256-bit registers
//   (`Activations`; AVX-512 levels too: on Sapphire Rapids this ran 1.4x the rate of decoding to float32
//   with vpermps in 512-bit registers, and of vpdpbusd on bytes, with the weights in cache). Nothing
//   dequantized is written to memory.
// GptossBf16Matvec: y[r] = sum_c W[layer][r, c] * x[c] for bfloat16 W [L, R, C] (a bfloat16 is the top
//   half of a float32, so widening is a shift).
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
using gptoss::InRange;
using gptoss::LayerIndex;
using gptoss::kBlock;
using gptoss::kBytesPerBlock;
using gptoss::kFp4;
using gptoss::ParallelFor;
using gptoss::Prefetch;
using gptoss::ScaleToFloat;

static_assert(kBytesPerBlock == 16, "Block decodes one block's bytes in one 128-bit register");

#if defined(__AVX2__) && defined(__FMA__)
#define GPTOSS_AVX2 1
inline float Sum8(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  return _mm_cvtss_f32(_mm_add_ss(sum, _mm_movehdup_ps(sum)));
}
#endif

#if defined(GPTOSS_AVX2)
// AVX2 has no 16-entry float lookup, and decoding codes to float32 made the kernel compute-bound (7 GB/s
// of packed weights where bf16 rows stream at 24). So each pair's x is rounded to int16 per block of 32
// (step max|x| / 32767: off by at most half a step, 2^-16 of the block's largest value, far below the
// bfloat16 activations the reference multiplies) and a block is an integer dot product: a byte shuffle
// turns codes into twice their value, vpmaddwd multiplies and sums pairs, exactly, in int32.
class Activations {
 public:
  static constexpr int16_t kLargest = 32767;

  Activations(const float* x, int64_t pairs, int64_t groups)
      : groups_(groups), values_(pairs * groups * kBlock), steps_(pairs * groups) {
    for (int64_t b = 0; b < pairs * groups; ++b) {
      const float* block = x + b * kBlock;
      float largest = 0.0f;
      bool finite = true;
      for (int64_t i = 0; i < kBlock; ++i) {
        largest = std::max(largest, std::fabs(block[i]));
        finite = finite && std::isfinite(block[i]);
      }
      const float step = largest / kLargest;
      // The codes decode to twice their value; a block holding inf or NaN makes its rows' sums NaN.
      steps_[b] = finite ? step / 2 : std::numeric_limits<float>::quiet_NaN();
      const bool zero = step == 0.0f || !finite;
      int16_t* even = values_.data() + b * kBlock;  // [even 16, odd 16]: low nibbles meet even elements
      for (int64_t i = 0; i < kBlock; ++i) {
        even[(i % 2) * kBytesPerBlock + i / 2] = zero ? 0 : static_cast<int16_t>(std::nearbyint(block[i] / step));
      }
    }
  }

  float Row(const uint8_t* blocks, const uint8_t* scales, int64_t pair) const {
    const int16_t* x = values_.data() + pair * groups_ * kBlock;
    const float* steps = steps_.data() + pair * groups_;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t first = 0; first < groups_; first += kChunk) {
      const int64_t count = std::min(kChunk, groups_ - first);
      acc = Blocks(blocks + kBytesPerBlock * first, scales + first, x + kBlock * first, steps + first, count, acc);
    }
    return Sum8(acc);
  }

 private:
  static constexpr int64_t kChunk = 256;  // blocks whose multipliers Blocks keeps on the stack

  // acc + the products of `count` blocks, each scaled by its multiplier (weight scale x activation
  // step), computed eight at a time: the scale byte shifted into float32's exponent field.
  static __m256 Blocks(const uint8_t* blocks, const uint8_t* scales, const int16_t* x, const float* steps,
                       int64_t count, __m256 acc) {
    float multipliers[kChunk];
    int64_t g = 0;
    for (; g + 8 <= count; g += 8) {
      const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(scales + g)));
      _mm256_storeu_ps(multipliers + g, _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(bytes, 23)), _mm256_loadu_ps(steps + g)));
    }
    for (; g < count; ++g) multipliers[g] = ScaleToFloat(scales[g]) * steps[g];
    // One accumulator per block of four: a single chain of dependent FMAs (4 cycles each) bounded
    // the loop well below what the shuffles and multiplies can issue.
    __m256 accs[4] = {acc, _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (g = 0; g + 4 <= count; g += 4) {
      for (int64_t k = 0; k < 4; ++k) accs[k] = Block(blocks, x, multipliers, g + k, accs[k]);
    }
    for (; g < count; ++g) accs[0] = Block(blocks, x, multipliers, g, accs[0]);
    return _mm256_add_ps(_mm256_add_ps(accs[0], accs[1]), _mm256_add_ps(accs[2], accs[3]));
  }

  // acc + block g's integer dot product times its multiplier.
  static __m256 Block(const uint8_t* blocks, const int16_t* x, const float* multipliers, int64_t g, __m256 acc) {
    const __m128i doubled = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);  // 2 x kFp4
    const __m128i nibble = _mm_set1_epi8(15);
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + kBytesPerBlock * g));
    const __m128i low = _mm_shuffle_epi8(doubled, _mm_and_si128(bytes, nibble));
    const __m128i high = _mm_shuffle_epi8(doubled, _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble));
    const __m256i* xg = reinterpret_cast<const __m256i*>(x + kBlock * g);
    const __m256i sums = _mm256_add_epi32(_mm256_madd_epi16(_mm256_cvtepi8_epi16(low), _mm256_loadu_si256(xg)),
                                          _mm256_madd_epi16(_mm256_cvtepi8_epi16(high), _mm256_loadu_si256(xg + 1)));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_broadcast_ss(multipliers + g), acc);
  }

  int64_t groups_;
  std::vector<int16_t> values_;  // [P, groups, {even, odd}, 16]
  std::vector<float> steps_;     // [P, groups]
};
#else
// x as float32, de-interleaved once per pair: even elements meet low nibbles, odd ones high nibbles.
class Activations {
 public:
  Activations(const float* x, int64_t pairs, int64_t groups) : cols_(kBlock * groups), split_(pairs * cols_) {
    for (int64_t p = 0; p < pairs; ++p) {
      float* even = split_.data() + p * cols_;
      for (int64_t c = 0; c < cols_ / 2; ++c) {
        even[c] = x[p * cols_ + 2 * c];
        even[cols_ / 2 + c] = x[p * cols_ + 2 * c + 1];
      }
    }
  }

  float Row(const uint8_t* blocks, const uint8_t* scales, int64_t pair) const {
    const float* x_even = split_.data() + pair * cols_;
    const float* x_odd = x_even + cols_ / 2;
    const int64_t groups = cols_ / kBlock;
    float acc = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
      float block = 0.0f;
      for (int64_t j = kBytesPerBlock * g; j < kBytesPerBlock * (g + 1); ++j) {
        uint8_t byte = blocks[j];
        block += kFp4[byte & 15] * x_even[j] + kFp4[byte >> 4] * x_odd[j];
      }
      acc += block * ScaleToFloat(scales[g]);
    }
    return acc;
  }

 private:
  int64_t cols_;
  std::vector<float> split_;  // [P, {even [C/2], odd [C/2]}]
};
#endif

// Packed rows are prefetched kAhead rows before they are read: the hardware's prefetchers, left to
// themselves, kept each core's stream of packed rows below what the decode can take.
constexpr int64_t kAhead = 2;

ffi::Error Mxfp4MatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> blocks,
                           ffi::Buffer<ffi::U8> scales, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> expert,
                           ffi::ResultBuffer<ffi::F32> y) {
  auto bdims = blocks.dimensions();
  if (bdims.size() != 5 || bdims[4] != kBytesPerBlock) return ffi::Error::InvalidArgument("blocks must be [L, E, R, C/32, 16]");
  const int64_t layers = bdims[0], experts = bdims[1], rows = bdims[2], groups = bdims[3], cols = kBlock * groups;
  const int64_t pairs = expert.element_count();
  if (x.element_count() != pairs * cols) return ffi::Error::InvalidArgument("x must be [P, C]");
  if (scales.element_count() != layers * experts * rows * groups) return ffi::Error::InvalidArgument("scales must be [L, E, R, C/32]");
  const ffi::ErrorOr<int64_t> layer_index = LayerIndex(layer, layers);
  if (layer_index.has_error()) return layer_index.error();
  const int64_t l = *layer_index;
  const int32_t* ids = expert.typed_data();
  for (int64_t p = 0; p < pairs; ++p) {
    if (!InRange(ids[p], experts)) return ffi::Error::InvalidArgument("expert id out of range");
  }

  const Activations activations(x.typed_data(), pairs, groups);
  const int64_t matrix_rows = rows * groups;  // scale bytes per matrix (and block bytes / 16)
  auto row_at = [&](int64_t i) { return (l * experts + ids[i / rows]) * matrix_rows + i % rows * groups; };  // in scale bytes
  ParallelFor(pool, pairs * rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (i + kAhead < end) {
        const int64_t ahead = row_at(i + kAhead);
        Prefetch(blocks.typed_data() + ahead * kBytesPerBlock, groups * kBytesPerBlock);
        Prefetch(scales.typed_data() + ahead, groups);
      }
      const int64_t row = row_at(i);
      y->typed_data()[i] = activations.Row(blocks.typed_data() + row * kBytesPerBlock, scales.typed_data() + row, i / rows);
    }
  });
  return ffi::Error::Success();
}

inline float Bf16Row(const uint16_t* w, const float* x, int64_t cols) {
  int64_t c = 0;
  float tail = 0.0f;
  // Four accumulators: one chain of dependent FMAs (4 cycles each) held the AVX2 loop to ~75% of the
  // read bandwidth on 2 cores.
#if defined(__AVX512F__)
  auto fma = [&](int64_t at, __m512 acc) {
    __m512i widened = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + at))), 16);
    return _mm512_fmadd_ps(_mm512_castsi512_ps(widened), _mm512_loadu_ps(x + at), acc);
  };
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (; c + 64 <= cols; c += 64) {
    for (int64_t k = 0; k < 4; ++k) acc[k] = fma(c + 16 * k, acc[k]);
  }
  for (; c + 16 <= cols; c += 16) acc[0] = fma(c, acc[0]);
  tail = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
#elif defined(GPTOSS_AVX2)
  auto fma = [&](int64_t at, __m256 acc) {
    __m256i widened = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + at))), 16);
    return _mm256_fmadd_ps(_mm256_castsi256_ps(widened), _mm256_loadu_ps(x + at), acc);
  };
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (; c + 32 <= cols; c += 32) {
    for (int64_t k = 0; k < 4; ++k) acc[k] = fma(c + 8 * k, acc[k]);
  }
  for (; c + 8 <= cols; c += 8) acc[0] = fma(c, acc[0]);
  tail = Sum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
#endif
  for (; c < cols; ++c) tail += Bf16ToFloat(w[c]) * x[c];
  return tail;
}

ffi::Error Bf16MatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                          ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y) {
  auto wdims = w.dimensions();
  if (wdims.size() != 3) return ffi::Error::InvalidArgument("w must be [L, R, C]");
  const int64_t layers = wdims[0], rows = wdims[1], cols = wdims[2];
  if (x.element_count() != cols) return ffi::Error::InvalidArgument("x must be [C]");
  const ffi::ErrorOr<int64_t> layer_index = LayerIndex(layer, layers);
  if (layer_index.has_error()) return layer_index.error();
  const int64_t l = *layer_index;
  const auto* weights = reinterpret_cast<const uint16_t*>(w.typed_data()) + l * rows * cols;
  ParallelFor(pool, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (r + 1 < end) Prefetch(weights + (r + 1) * cols, cols * sizeof(uint16_t));
      y->typed_data()[r] = Bf16Row(weights + r * cols, x.typed_data(), cols);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GPTOSS_NAME(GptossMxfp4Matvec, GPTOSS_LEVEL), Mxfp4MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GPTOSS_NAME(GptossBf16Matvec, GPTOSS_LEVEL), Bf16MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
