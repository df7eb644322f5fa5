// Prefill's products on CPU with Intel's AMX, as XLA FFI custom calls: the experts' (rows sorted by
// expert, each times its expert's packed MXFP4 matrix) and the projections' (bfloat16). XLA:CPU
// multiplies bfloat16 at 100-200 GFLOP/s and writes every decoded expert to memory first; AMX multiplies
// tiles of bfloat16 at several times that, and here a decoded panel of weights lives in L2 only.
//
// GptossBf16Gemm: y[p, r] = sum_c W[layer][r, c] * x[p, c], all bfloat16 (x [P, C], W [L, R, C]): the
//   projections of a prefill step, the same tiles fed from copied rather than decoded panels.
// GptossMxfp4GroupedGemm: y[p, r] = sum_c W[layer, e][r, c] * x[p, c] for the rows p that expert e owns:
//   expert e owns rows [start_e, start_e + counts[e]) with start_e the running sum of counts; rows past
//   the last expert's are zero. x [P, C] bfloat16, blocks [L, E, R, C/32, 16], scales [L, E, R, C/32],
//   layer a scalar, counts [E] int32; y [P, R] float32.
//
// Work items are (expert, panel of 32 weight rows). An item decodes its panel once into bfloat16,
// exactly `mxfp4.dequantize`'s values (a code times 2^(s - 127), two significant bits), then multiplies
// it with each tile of 32 of the expert's rows. The weights are AMX's A operand, so a decoded block is
// a tile row as it stands (a byte's two codes are adjacent elements), and x is the B operand, repacked
// once per call into AMX's pairs-of-K layout. Without AMX, the same panels and tiles meet a scalar
// multiply (correct everywhere, and how the tests cover the indexing on any CPU; the model uses this
// kernel only where AMX runs it).
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <vector>

#include "gptoss_jax/native/formats.h"
#include "gptoss_jax/native/parallel.h"

namespace {

using gptoss::Bf16Bits;
using gptoss::Bf16ToFloat;
using gptoss::LayerIndex;
using gptoss::kBlock;
using gptoss::kFp4;
using gptoss::ParallelFor;
using gptoss::ScaleToFloat;

constexpr int64_t kPairs = gptoss::kBytesPerBlock;  // a block's bytes: pairs of adjacent values
constexpr int64_t kTile = 16;                       // rows of an AMX tile (and bfloat16 pairs across one)
constexpr int64_t kPanel = 2 * kTile;               // weight rows per work item; tokens per token tile

// One expert's run of rows [first, first + count), count <= kPanel.
struct TokenTile {
  int64_t expert, first, count;
};

// Decodes weight rows [r0, r0 + kPanel) of one expert (rows past `rows` are zero) into `panel`
// [groups][kPanel][kBlock] bfloat16: block g of the panel is the A tiles of K step g.
void DecodePanel(const uint8_t* blocks, const uint8_t* scales, int64_t rows, int64_t groups, int64_t r0, uint16_t* panel) {
  for (int64_t i = 0; i < kPanel; ++i) {
    const int64_t r = r0 + i;
    for (int64_t g = 0; g < groups; ++g) {
      uint16_t* out = panel + (g * kPanel + i) * kBlock;
      if (r >= rows) {
        std::fill(out, out + kBlock, uint16_t{0});
        continue;
      }
      const uint8_t* bytes = blocks + (r * groups + g) * kPairs;
      const float scale = ScaleToFloat(scales[r * groups + g]);
#if defined(__AVX512BF16__)
      // The 16 values times the scale, as bfloat16 in both halves of a register: a 32-entry table that
      // vpermw reads by each index's low five bits. Lane j of the widened bytes is the index pair
      // (byte j, byte j >> 4): elements 2j and 2j + 1.
      const __m512 values = _mm512_mul_ps(_mm512_loadu_ps(kFp4), _mm512_set1_ps(scale));
      __m512bh packed = _mm512_cvtne2ps_pbh(values, values);
      const __m512i table = reinterpret_cast<const __m512i&>(packed);
      const __m512i widened = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
      _mm512_storeu_si512(out, _mm512_permutexvar_epi16(_mm512_or_si512(widened, _mm512_slli_epi32(widened, 12)), table));
#else
      for (int64_t j = 0; j < kPairs; ++j) {
        out[2 * j] = Bf16Bits(kFp4[bytes[j] & 15] * scale);
        out[2 * j + 1] = Bf16Bits(kFp4[bytes[j] >> 4] * scale);
      }
#endif
    }
  }
}

// x's rows of one token tile as B operands: [groups][2 halves of kTile tokens][kPairs][kTile][2]
// bfloat16, pairs of adjacent columns; columns past `cols` and tokens past the tile's count are zero.
void RepackTokens(const uint16_t* x, int64_t cols, int64_t groups, const TokenTile& tile, uint16_t* out) {
  std::fill(out, out + groups * kPanel * kBlock, uint16_t{0});
  for (int64_t t = 0; t < tile.count; ++t) {
    const uint16_t* row = x + (tile.first + t) * cols;
    for (int64_t g = 0; g < groups; ++g) {
      uint16_t* pairs = out + ((g * 2 + t / kTile) * kPairs * kTile + t % kTile) * 2;  // pair j at pairs + 2 kTile j
      const int64_t width = std::min(kBlock, cols - g * kBlock);
      for (int64_t c = 0; c < width; c += 2) std::copy_n(row + g * kBlock + c, std::min<int64_t>(2, width - c), pairs + kTile * c);
    }
  }
}

// Copies rows [r0, r0 + kPanel) of a bfloat16 matrix [rows, cols] into `panel` [groups][kPanel][kBlock]
// (what DecodePanel makes of packed rows), zero past the matrix's rows and columns.
void CopyPanel(const uint16_t* w, int64_t rows, int64_t cols, int64_t groups, int64_t r0, uint16_t* panel) {
  for (int64_t i = 0; i < kPanel; ++i) {
    for (int64_t g = 0; g < groups; ++g) {
      uint16_t* out = panel + (g * kPanel + i) * kBlock;
      const int64_t width = r0 + i < rows ? std::clamp<int64_t>(cols - g * kBlock, 0, kBlock) : 0;
      std::copy_n(w + (r0 + i) * cols + g * kBlock, width, out);
      std::fill(out + width, out + kBlock, uint16_t{0});
    }
  }
}

// out[i][t] = panel row i . token t over all groups, for the kPanel x kPanel tile.
#if defined(__AMX_BF16__)
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3 accumulate out (weight half a, token half b at 2a + b), 4-5 hold weight halves, 6-7 token halves.
// Linux grants AMX's tile state to a process that asks: `native` runs the amx level only once
// cpu_level.cc's request was granted in this process.
class TileScope {
 public:
  TileScope() {
    TileConfig config;
    for (int t = 0; t < 8; ++t) config.bytes_per_row[t] = 64, config.rows[t] = kTile;
    _tile_loadconfig(&config);
  }
  ~TileScope() { _tile_release(); }
};

void MultiplyTile(const uint16_t* panel, const uint16_t* tokens, int64_t groups, float* out) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t g = 0; g < groups; ++g) {
    const uint16_t* a = panel + g * kPanel * kBlock;
    const uint16_t* b = tokens + g * kPanel * kBlock;
    _tile_loadd(4, a, 64);
    _tile_loadd(5, a + kTile * kBlock, 64);
    _tile_loadd(6, b, 64);
    _tile_loadd(7, b + kPairs * kTile * 2, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  // out [kPanel weight rows][kPanel tokens]: tile 2a + b at rows 16a, columns 16b.
  _tile_stored(0, out, kPanel * 4);
  _tile_stored(1, out + kTile, kPanel * 4);
  _tile_stored(2, out + kTile * kPanel, kPanel * 4);
  _tile_stored(3, out + kTile * kPanel + kTile, kPanel * 4);
}

#else
struct TileScope {};

void MultiplyTile(const uint16_t* panel, const uint16_t* tokens, int64_t groups, float* out) {
  std::fill(out, out + kPanel * kPanel, 0.0f);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t i = 0; i < kPanel; ++i) {
      const uint16_t* w = panel + (g * kPanel + i) * kBlock;
      for (int64_t t = 0; t < kPanel; ++t) {
        const uint16_t* pairs = tokens + ((g * 2 + t / kTile) * kPairs * kTile + t % kTile) * 2;
        float sum = 0.0f;
        for (int64_t j = 0; j < kPairs; ++j) {
          sum += Bf16ToFloat(w[2 * j]) * Bf16ToFloat(pairs[j * kTile * 2]) + Bf16ToFloat(w[2 * j + 1]) * Bf16ToFloat(pairs[j * kTile * 2 + 1]);
        }
        out[i * kPanel + t] += sum;
      }
    }
  }
}
#endif

// out[p] = W_e @ x[p] for the rows p each group e owns (counts in order; rows past them zero), W_e's
// rows coming panel by panel from fill_panel(e, r0, panel).
template <typename FillPanel>
ffi::Error GroupedProduct(ffi::ThreadPool& pool, const uint16_t* x, int64_t pairs, int64_t cols, int64_t rows,
                          const std::vector<int64_t>& counts, const FillPanel& fill_panel, float* out) {
  std::vector<TokenTile> tiles;
  int64_t owned = 0;
  for (int64_t e = 0; e < static_cast<int64_t>(counts.size()); ++e) {
    if (counts[e] < 0 || owned + counts[e] > pairs) return ffi::Error::InvalidArgument("counts must be >= 0 and sum to at most P");
    for (int64_t first = owned; first < owned + counts[e]; first += kPanel) tiles.push_back({e, first, std::min(kPanel, owned + counts[e] - first)});
    owned += counts[e];
  }
  std::fill(out + owned * rows, out + pairs * rows, 0.0f);

  const int64_t groups = (cols + kBlock - 1) / kBlock, tile_words = groups * kPanel * kBlock;
  std::vector<uint16_t> tokens(tiles.size() * tile_words);
  ParallelFor(pool, static_cast<int64_t>(tiles.size()), 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) RepackTokens(x, cols, groups, tiles[t], tokens.data() + t * tile_words);
  });

  // Items (group, panel), groups with rows only; a group's tiles are consecutive in `tiles`.
  struct Item {
    int64_t group, r0, first_tile, end_tile;
  };
  std::vector<Item> items;
  for (int64_t t = 0; t < static_cast<int64_t>(tiles.size());) {
    int64_t end = t;
    while (end < static_cast<int64_t>(tiles.size()) && tiles[end].expert == tiles[t].expert) ++end;
    for (int64_t r0 = 0; r0 < rows; r0 += kPanel) items.push_back({tiles[t].expert, r0, t, end});
    t = end;
  }
  ParallelFor(pool, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    TileScope scope;
    std::vector<uint16_t> panel(groups * kPanel * kBlock);
    alignas(64) float product[kPanel * kPanel];
    for (int64_t i = begin; i < end; ++i) {
      const Item& item = items[i];
      fill_panel(item.group, item.r0, panel.data());
      const int64_t panel_rows = std::min(kPanel, rows - item.r0);
      for (int64_t t = item.first_tile; t < item.end_tile; ++t) {
        MultiplyTile(panel.data(), tokens.data() + t * tile_words, groups, product);
        for (int64_t token = 0; token < tiles[t].count; ++token) {
          float* row = out + (tiles[t].first + token) * rows + item.r0;
          for (int64_t r = 0; r < panel_rows; ++r) row[r] = product[r * kPanel + token];
        }
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Mxfp4GroupedGemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::U8> blocks,
                                ffi::Buffer<ffi::U8> scales, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> counts,
                                ffi::ResultBuffer<ffi::F32> y) {
  auto bdims = blocks.dimensions();
  if (bdims.size() != 5 || bdims[4] != kPairs) return ffi::Error::InvalidArgument("blocks must be [L, E, R, C/32, 16]");
  const int64_t layers = bdims[0], experts = bdims[1], rows = bdims[2], groups = bdims[3], cols = kBlock * groups;
  auto xdims = x.dimensions();
  if (xdims.size() != 2 || xdims[1] != cols) return ffi::Error::InvalidArgument("x must be [P, C]");
  if (scales.element_count() != layers * experts * rows * groups) return ffi::Error::InvalidArgument("scales must be [L, E, R, C/32]");
  if (counts.element_count() != experts) return ffi::Error::InvalidArgument("counts must be [E]");
  const ffi::ErrorOr<int64_t> layer_index = LayerIndex(layer, layers);
  if (layer_index.has_error()) return layer_index.error();
  const int64_t l = *layer_index;
  const int64_t matrix = rows * groups;  // scale bytes per expert's matrix
  auto decode = [&](int64_t e, int64_t r0, uint16_t* panel) {
    const int64_t at = (l * experts + e) * matrix;
    DecodePanel(blocks.typed_data() + at * kPairs, scales.typed_data() + at, rows, groups, r0, panel);
  };
  return GroupedProduct(pool, reinterpret_cast<const uint16_t*>(x.typed_data()), xdims[0], cols, rows,
                        std::vector<int64_t>(counts.typed_data(), counts.typed_data() + experts), decode, y->typed_data());
}

ffi::Error Bf16GemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                        ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y) {
  auto wdims = w.dimensions();
  if (wdims.size() != 3) return ffi::Error::InvalidArgument("w must be [L, R, C]");
  const int64_t layers = wdims[0], rows = wdims[1], cols = wdims[2];
  auto xdims = x.dimensions();
  if (xdims.size() != 2 || xdims[1] != cols) return ffi::Error::InvalidArgument("x must be [P, C]");
  const ffi::ErrorOr<int64_t> layer_index = LayerIndex(layer, layers);
  if (layer_index.has_error()) return layer_index.error();
  const int64_t l = *layer_index;
  const auto* matrix = reinterpret_cast<const uint16_t*>(w.typed_data()) + l * rows * cols;
  const int64_t groups = (cols + kBlock - 1) / kBlock;
  auto copy = [&](int64_t, int64_t r0, uint16_t* panel) { CopyPanel(matrix, rows, cols, groups, r0, panel); };
  return GroupedProduct(pool, reinterpret_cast<const uint16_t*>(x.typed_data()), xdims[0], cols, rows,
                        std::vector<int64_t>{xdims[0]}, copy, y->typed_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GPTOSS_NAME(GptossMxfp4GroupedGemm, GPTOSS_LEVEL), Mxfp4GroupedGemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GPTOSS_NAME(GptossBf16Gemm, GPTOSS_LEVEL), Bf16GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
