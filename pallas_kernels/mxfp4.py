"""MXFP4 decode inside Pallas kernels, and a plain dequantization kernel.

The checkpoint stores a weight `[..., N, K]` as `blocks uint8 [..., N, K/32, 16]` (two E2M1 codes per
byte, low nibble = even element) and `scales uint8 [..., N, K/32]` (E8M0: 2^(s - 127)); the format's
constants live in `mxfp4_format`.

`decode` turns packed bytes into floats with integer arithmetic only (KERNELS.md 7.3): no lookup
table (Pallas Triton has no gather) and no pointwise math on 8-bit types (Triton rejects it), so
bytes are widened to int32 first. The block scale is folded into the float32 exponent, so every
value is one multiply of normal floats (no subnormals that TPU/GPU could flush), exact for scales
2..252 like the XLA reference.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.mxfp4_format import BLOCK, BYTES_PER_BLOCK


def _decode_nibbles(codes: jax.Array, scales: jax.Array) -> jax.Array:
    """int32 E2M1 codes and same-shape int32 E8M0 scales -> float32 code_value * 2^(scale - 127)."""
    exponent = (codes >> 1) & 3
    mantissa = jnp.where(exponent > 0, 2 + (codes & 1), codes & 1).astype(jnp.float32)  # 0, 1 or 2, 3
    # 2^(max(e, 1) - 2 + s - 127): the value is mantissa * pow2, a normal float (s >= 2).
    pow2 = jax.lax.bitcast_convert_type((jnp.maximum(exponent, 1) + scales - 2) << 23, jnp.float32)
    magnitude = jax.lax.bitcast_convert_type(mantissa * pow2, jnp.int32)
    return jax.lax.bitcast_convert_type(magnitude | ((codes & 8) << 28), jnp.float32)


def decode(packed: jax.Array, scales: jax.Array) -> jax.Array:
    """`packed [R, C/2]` bytes and `scales [R, C/32]` (any int type) -> float32 weights `[R, C]`.

    C/32 must be a power of two on GPU (Triton tensors have power-of-two sizes).
    """
    rows, num_bytes = packed.shape
    packed = packed.astype(jnp.int32)
    per_byte = jnp.broadcast_to(scales.astype(jnp.int32)[:, :, None], (rows, scales.shape[1], BYTES_PER_BLOCK))
    per_byte = per_byte.reshape(rows, num_bytes)
    low = _decode_nibbles(packed & 0xF, per_byte)
    high = _decode_nibbles(packed >> 4, per_byte)
    return jnp.stack([low, high], axis=-1).reshape(rows, 2 * num_bytes)  # low nibble = even element


def platform(backend: str | None) -> str:
    """"gpu" or "tpu": the kernel flavour to build; None follows `jax.default_backend()` (CPU -> gpu)."""
    backend = backend or jax.default_backend()
    if backend in ("gpu", "cuda", "rocm", "cpu"):
        return "gpu"
    if backend == "tpu":
        return "tpu"
    raise ValueError(f"no Pallas kernel for backend {backend!r}")


def largest_pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap dividing n."""
    return math.gcd(n & -n, cap)


def _dequantize_kernel(blocks_ref, scales_ref, out_ref):
    out_ref[...] = decode(blocks_ref[...], scales_ref[...]).astype(out_ref.dtype)


def dequantize(
    blocks: jax.Array,
    scales: jax.Array,
    dtype: jnp.dtype = jnp.bfloat16,
    *,
    backend: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """`blocks [..., N, K/32, 16]`, `scales [..., N, K/32]` uint8 -> weights `[..., N, K]` in `dtype`.

    Bit-identical to `gptoss_jax.mxfp4.dequantize`. Memory bound (reads 17 bytes, writes 32 values per
    block), so tiles are simply large: on GPU 64 rows x up to 256 values (a power of two dividing K),
    on TPU 32 rows x the whole K (full-extent lane blocks satisfy Mosaic's tiling for any K).
    """
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BYTES_PER_BLOCK:
        raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not match")
    *lead, groups = scales.shape
    rows = math.prod(lead)
    packed = blocks.reshape(rows, groups * BYTES_PER_BLOCK)
    scales = scales.reshape(rows, groups)
    if platform(backend) == "gpu":
        block_rows, block_groups = 64, largest_pow2_divisor(groups, 8)
        compiler_params = pltriton.CompilerParams(num_warps=4, num_stages=2)
    else:
        block_rows, block_groups = 32, groups
        compiler_params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
    out = pl.pallas_call(
        _dequantize_kernel,
        out_shape=jax.ShapeDtypeStruct((rows, groups * BLOCK), dtype),
        grid=(pl.cdiv(rows, block_rows), groups // block_groups),
        in_specs=[
            pl.BlockSpec((block_rows, block_groups * BYTES_PER_BLOCK), lambda r, g: (r, g)),
            pl.BlockSpec((block_rows, block_groups), lambda r, g: (r, g)),
        ],
        out_specs=pl.BlockSpec((block_rows, block_groups * BLOCK), lambda r, g: (r, g)),
        compiler_params=compiler_params,
        interpret=interpret,
    )(packed, scales)
    return out.reshape(*lead, groups * BLOCK)
