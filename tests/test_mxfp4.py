import jax.numpy as jnp
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
    codes = np.stack([blocks & 0xF, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    values = np.ldexp(np.asarray(mxfp4.FP4_VALUES, np.float64)[codes], scales.astype(np.int64)[..., None] - 127)
    return values.reshape(*scales.shape[:-1], -1)


# Scales 2..252 keep every decoded value a normal bf16 number (the exactness range of SPEC 4.3);
# released checkpoints sit well inside it.
@pytest.mark.parametrize("decode", [mxfp4.dequantize, mxfp4.decode_bits], ids=["dequantize", "decode_bits"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dequantize_is_bit_identical_to_transformers(decode, dtype):
    blocks, scales = _random_packed(0, (2, 252))
    torch_dtype = {jnp.bfloat16: torch.bfloat16, jnp.float32: torch.float32}[dtype]
    theirs = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch_dtype)
    theirs = theirs.transpose(1, 2).float().numpy()  # they return HF's [E, in, out]
    ours = np.asarray(decode(jnp.asarray(blocks), jnp.asarray(scales), dtype)).astype(np.float32)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))  # bitwise, signed zeros too


def test_dequantize_is_exact_against_float64_ldexp():
    blocks, scales = _random_packed(1, (2, 252))
    ours = np.asarray(mxfp4.dequantize(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32), np.float64)
    np.testing.assert_array_equal(ours, _float64_reference(blocks, scales))


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
