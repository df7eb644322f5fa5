"""`gptoss_jax.mxfp4` and the format it re-exports from `pallas_kernels.mxfp4_format`, against
independent decoders: ml_dtypes' E2M1 and E8M0 types, transformers' MXFP4 decode and a numpy table."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from gptoss_jax import mxfp4


def _random_packed(seed: int, scale_range: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Bytes covering all 256 (low, high) code pairs and every scale in `scale_range`."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (3, 40, 4, 16), dtype=np.uint8)
    blocks.reshape(-1)[:256] = np.arange(256, dtype=np.uint8)
    scales = rng.integers(scale_range[0], scale_range[1] + 1, (3, 40, 4), dtype=np.uint8)
    scales.reshape(-1)[: scale_range[1] - scale_range[0] + 1] = np.arange(scale_range[0], scale_range[1] + 1)
    return blocks, scales


def _float64_reference(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The plain table decode of SPEC 4.3 in numpy float64: `FP4_VALUES[code] * 2^(s - 127)`."""
    codes = np.stack([blocks & 0xF, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    values = np.ldexp(np.asarray(mxfp4.FP4_VALUES, np.float64)[codes], scales.astype(np.int64)[..., None] - 127)
    return values.reshape(*scales.shape[:-1], -1)


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def test_format_matches_ml_dtypes():
    """The one definition against ml_dtypes' own float4_e2m1fn and float8_e8m0fnu (signed zeros too)."""
    assert (mxfp4.BLOCK, mxfp4.BYTES_PER_BLOCK) == (32, 16)
    e2m1 = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(_bits(np.asarray(mxfp4.FP4_VALUES, np.float32)), _bits(e2m1))
    e8m0 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(np.float64)
    np.testing.assert_array_equal(e8m0[: mxfp4.SCALE_NAN], np.ldexp(1.0, np.arange(mxfp4.SCALE_NAN) - mxfp4.SCALE_BIAS))
    assert mxfp4.SCALE_NAN == 255 and np.isnan(e8m0[mxfp4.SCALE_NAN])


# Scales 2..252 keep every decoded value a normal bf16 number (the exactness range of SPEC 4.3);
# released checkpoints sit well inside it.
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dequantize_is_bit_identical_to_transformers(dtype):
    blocks, scales = _random_packed(0, (2, 252))
    torch_dtype = {jnp.bfloat16: torch.bfloat16, jnp.float32: torch.float32}[dtype]
    theirs = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch_dtype)
    theirs = theirs.transpose(1, 2).float().numpy()  # they return HF's [E, in, out]
    ours = np.asarray(mxfp4.dequantize(jnp.asarray(blocks), jnp.asarray(scales), dtype)).astype(np.float32)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    np.testing.assert_array_equal(_bits(ours), _bits(theirs))  # bitwise, signed zeros too


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dequantize_is_bit_identical_to_a_numpy_table(dtype):
    """Every byte under every scale 2..252 and a random weight, against the table decode in float64
    rounded once to `dtype` (exact: the values have at most 2 significant bits)."""
    scales = np.repeat(np.arange(2, 253, dtype=np.uint8)[:, None], 16, axis=1)
    blocks = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(1, 16, 16), (*scales.shape, 16))
    for b, s in ((blocks, scales), _random_packed(1, (2, 252))):
        ours = np.asarray(mxfp4.dequantize(jnp.asarray(b), jnp.asarray(s), dtype))
        table = _float64_reference(b, s).astype(ours.dtype)
        assert ours.shape == table.shape
        np.testing.assert_array_equal(_bits(ours), _bits(table))


def test_dequantize_flushes_scale_1_halves_to_zero():
    """The docstring's edge: at s = 1 the codes +-0.5 give 2^-127, a subnormal, returned as +-0."""
    blocks = np.zeros((1, 1, 16), np.uint8)
    blocks[0, 0, :2] = (0x91, 0xA2)  # 0.5, -0.5, 1.0, -1.0
    decoded = np.asarray(mxfp4.dequantize(jnp.asarray(blocks), jnp.ones((1, 1), jnp.uint8), jnp.float32))
    np.testing.assert_array_equal(_bits(decoded[0, :4]), _bits(np.float32([0.0, -0.0, 2**-126, -(2**-126)])))


def test_low_nibble_is_the_first_element():
    blocks = np.zeros((1, 1, 16), np.uint8)
    blocks[0, 0, 0] = 0x72  # low nibble 2 (1.0), high nibble 7 (6.0)
    scales = np.full((1, 1), 128, np.uint8)  # x2
    decoded = np.asarray(mxfp4.dequantize(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32))
    assert decoded[0, :3].tolist() == [2.0, 12.0, 0.0]


def test_quantize_round_trips_representable_values():
    blocks, scales = _random_packed(2, (100, 150))
    dense = _float64_reference(blocks, scales)
    re_blocks, re_scales = mxfp4.quantize(dense)
    np.testing.assert_array_equal(_float64_reference(re_blocks, re_scales), dense)


def test_quantize_rounds_to_nearest():
    rng = np.random.default_rng(3)
    dense = rng.standard_normal((64, 256)).astype(np.float32) * np.exp(rng.uniform(-8, 8, (64, 1)))
    blocks, scales = mxfp4.quantize(dense)
    decoded = _float64_reference(blocks, scales)
    # Rounding to nearest: the error is at most half the gap to the next code, which is at most
    # 1 (between 4 and 6) in units of the block's scale.
    unit = np.ldexp(1.0, scales.astype(np.int64) - 127).repeat(32, axis=-1)
    assert np.all(np.abs(decoded - dense) <= unit + 1e-12 * np.abs(dense))
    # ...and no code is closer than the chosen one.
    grid = np.asarray(mxfp4.FP4_VALUES[:8])
    distances = np.abs(np.abs(dense / unit)[..., None] - grid)
    assert np.all(np.abs(np.abs(decoded / unit) - np.abs(dense / unit)) <= distances.min(-1) + 1e-9)


def test_mismatched_shapes_are_an_error():
    with pytest.raises(ValueError, match="do not match"):
        mxfp4.dequantize(jnp.zeros((2, 3, 16), jnp.uint8), jnp.zeros((2, 4), jnp.uint8))
