"""MXFP4 (OCP microscaling FP4 E2M1 with E8M0 block scales), exactly as the checkpoints store it.

A weight `[..., R, C]` is stored as `blocks uint8 [..., R, C/32, 16]` (two 4-bit codes per byte, low
nibble first) and `scales uint8 [..., R, C/32]` (value = code_value * 2^(scale - 127)), SPEC 4.3.
`dequantize` is the reference every kernel and fast path is tested against (`decode_bits` is the
fast XLA path); `quantize` (numpy, round to nearest) writes fixtures and packs dense checkpoints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 32  # values sharing one scale
SCALE_BIAS = 127
# E2M1 code -> value; bit 3 is the sign.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def scale_to_float32(scales: jax.Array) -> jax.Array:
    """2^(s - 127) exactly: the E8M0 byte is the float32 biased exponent field.

    Exact for s = 1..254 (no `exp2`, whose accuracy is backend-defined); s = 0 gives 0 and
    s = 255 (E8M0's NaN) gives inf, which the converter rejects before it gets here.
    """
    return jax.lax.bitcast_convert_type(scales.astype(jnp.uint32) << 23, jnp.float32)


def unpack_codes(blocks: jax.Array) -> jax.Array:
    """`[..., C/32, 16]` bytes -> `[..., C/32, 32]` codes, low nibble first."""
    low, high = blocks & 0x0F, blocks >> 4
    return jnp.stack([low, high], axis=-1).reshape(*blocks.shape[:-1], BLOCK)


def dequantize(blocks: jax.Array, scales: jax.Array, dtype: jnp.dtype = jnp.bfloat16) -> jax.Array:
    """`blocks [..., R, C/32, 16]`, `scales [..., R, C/32]` -> weights `[..., R, C]` in `dtype`.

    The product is formed in float32, where it is exact (at most 2 significant bits), then cast.
    Exact for scales 2..252: beyond them values leave the normal range
    (XLA on CPU flushes subnormals to zero) or overflow. Released checkpoints stay far inside.
    """
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not match")
    values = jnp.asarray(FP4_VALUES, jnp.float32)[unpack_codes(blocks)]
    weights = values * scale_to_float32(scales)[..., None]
    return weights.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK).astype(dtype)


def decode_bits(blocks: jax.Array, scales: jax.Array, dtype: jnp.dtype = jnp.bfloat16) -> jax.Array:
    """`dequantize` by integer arithmetic: each code's sign, exponent and mantissa bits are moved into a
    bfloat16's, with the scale added to its exponent field. No table lookup and no multiply: XLA:CPU
    decodes ~2 G values/s this way, against ~0.5 with the lookup.

    Bit-identical to `dequantize` for scales 1..252 (bfloat16 and float32 share float32's exponent
    range; other dtypes are cast from bfloat16, exactly: a value has at most 2 significant bits).
    """
    codes = unpack_codes(blocks).astype(jnp.uint16)
    exponent = ((scales.astype(jnp.uint16) - 1) << 7)[..., None]  # bfloat16 field of 2^(s-128), s >= 1
    magnitude = codes & 7  # E2M1 without the sign: eem
    # eem << 6 puts e into the exponent field's low bits and m into the mantissa's top bit: for e > 0
    # that is 2^(e-1) * (1 + m/2) once the scale's exponent is added; code 1 (0.5) is 2^(s-128) alone.
    normal = jnp.where(magnitude > 1, (magnitude << 6) + exponent, jnp.where(magnitude == 1, exponent, 0))
    bits = normal | ((codes & 8) << 12)
    weights = jax.lax.bitcast_convert_type(bits, jnp.bfloat16)
    return weights.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK).astype(dtype)


_MAGNITUDES = np.asarray(FP4_VALUES[:8], np.float32)
_MIDPOINTS = (_MAGNITUDES[1:] + _MAGNITUDES[:-1]) / 2


def quantize(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float weights `[..., R, C]` -> (`blocks`, `scales`), rounding each value to the nearest code.

    Each block takes the smallest scale whose range (6 * 2^(s-127)) covers its largest magnitude;
    ties between two codes go to the smaller magnitude.
    """
    weights = np.asarray(weights, np.float32)
    if weights.shape[-1] % BLOCK:
        raise ValueError(f"last axis {weights.shape[-1]} is not a multiple of {BLOCK}")
    grouped = weights.reshape(*weights.shape[:-1], weights.shape[-1] // BLOCK, BLOCK)
    amax = np.abs(grouped).max(axis=-1)
    with np.errstate(divide="ignore"):
        exponent = np.ceil(np.log2(amax / _MAGNITUDES[-1]))
    exponent = np.where(amax > 0, exponent, 0)
    scales = np.clip(exponent + SCALE_BIAS, 1, 254).astype(np.uint8)
    scaled = grouped / np.ldexp(np.float32(1), scales.astype(np.int32) - SCALE_BIAS)[..., None]
    magnitude_code = np.searchsorted(_MIDPOINTS, np.minimum(np.abs(scaled), _MAGNITUDES[-1]), side="left")
    sign = np.where((scaled < 0) & (magnitude_code > 0), 8, 0)
    codes = (magnitude_code + sign).astype(np.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, scales
