// The number formats the C++ CPU kernels read: MXFP4 as defined in pallas_kernels/mxfp4_format.py
// (tests/test_native.py checks these literals against it) and bfloat16.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

namespace gptoss {

constexpr int64_t kBlock = 32;                  // values sharing one scale
constexpr int64_t kBytesPerBlock = kBlock / 2;  // two E2M1 codes per byte, low nibble first
constexpr int kScaleBias = 127;                 // E8M0 byte s means 2^(s - kScaleBias)
constexpr float kFp4[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                            -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
static_assert(kScaleBias == std::numeric_limits<float>::max_exponent - 1, "ScaleToFloat needs float32's bias");

// 2^(s - 127): the E8M0 byte is float32's biased exponent field.
inline float ScaleToFloat(uint8_t s) {
  const uint32_t bits = static_cast<uint32_t>(s) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// A bfloat16 is the top half of a float32.
inline float Bf16ToFloat(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof(value));
  return value;
}

// The top half of a float32 whose low half is zero (a decoded MXFP4 value: two significant bits).
inline uint16_t Bf16Bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace gptoss
