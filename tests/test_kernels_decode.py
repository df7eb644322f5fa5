"""Split-K decode attention with sinks (interpret mode) equals the model's reference `attend`.

Caches are laid out as the model lays them out: full caches with slot = position, rings built by
`kv_cache.ring_plan` (read before write, so the new key is appended after the `window` slots). Tiny
shapes with odd N, G and head_dim, S not a multiple of the tile, and `block_k=16` so that rows span
several tiles and splits; lowering for H100 is checked at the real gpt-oss-20b shapes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowering import assert_lowers

from gptoss_jax.kv_cache import ring_plan
from gptoss_jax.attention import attend
from pallas_kernels.decode_attention import H100_SMS, decode_attention, default_k_splits

# float32: kernel and reference do the same float32 math in a different summation order (tiles,
# splits, the sink added last); measured max error 3.0e-7 on outputs of size ~1.
F32_ATOL = 2e-6
# bfloat16, against float32 attention on the same bf16-rounded inputs: the output is rounded to bf16
# (half an ulp, 2^-9 relative) and the unnormalized probabilities are rounded to bf16 before the PV dot
# (2^-9 relative per term, at most 2^-9 * max|v| ~ 2^-7 on normal values). Measured max 6.9e-3 on
# outputs up to 2.4; the model's own bf16 `attend` is further off (8.7e-3).
BF16_ATOL, BF16_RTOL = 2**-7, 2**-8


def _qkv(seed: int, B: int, S: int, N: int, G: int, D: int, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, N, G, D)), dtype)
    k = jnp.asarray(rng.normal(size=(B, S, N, D)), dtype)
    v = jnp.asarray(rng.normal(size=(B, S, N, D)), dtype)
    sinks = jnp.asarray(rng.normal(size=(N, G)), jnp.float32)
    return q, k, v, sinks


def _full_cache(seed: int, B: int, S: int) -> tuple[jax.Array, jax.Array]:
    """Slot = position; random per-row lengths, including a first step and a full cache."""
    lengths = np.random.default_rng(seed).integers(1, S + 1, B)
    lengths[:2] = 1, S
    return jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)), jnp.asarray(lengths - 1, jnp.int32)


def _ring_cache(lengths: list[int], window: int) -> tuple[jax.Array, jax.Array]:
    """Key positions of a decode step on a ring of `window` slots after `lengths` tokens, as the model reads them."""
    lengths_B = jnp.asarray(lengths, jnp.int32)
    plan = ring_plan(lengths_B, jnp.ones_like(lengths_B), num_new=1, slots=window)
    return plan.key_positions, lengths_B


@jax.jit(static_argnames="window")  # one compile instead of eager einsums
def _reference(q, k, v, sinks, k_pos, q_pos, window):
    return attend(q[:, None], k, v, q_pos[:, None], k_pos, sinks, window)[:, 0]


def _as_f32(*arrays):
    return [a.astype(jnp.float32) for a in arrays]


@pytest.mark.parametrize(
    "S, N, G, D, window, k_splits",
    [
        (45, 3, 5, 24, None, 1),  # one split walks all 3 tiles; ragged tail of 13 keys
        (100, 2, 3, 16, 7, 3),  # a window on a full cache: tiles before it are skipped too
        (100, 1, 8, 64, None, 16),  # more splits than the 7 tiles: most splits are empty
        (45, 3, 1, 16, 1, 3),  # window 1: only the key at the query's own position
    ],
)
def test_full_cache_f32(S, N, G, D, window, k_splits):
    q, k, v, sinks = _qkv(0, 5, S, N, G, D)
    k_pos, q_pos = _full_cache(1, 5, S)
    out = decode_attention(q, k, v, sinks, k_pos, q_pos, window=window, k_splits=k_splits, block_k=16, interpret=True)
    np.testing.assert_allclose(out, _reference(q, k, v, sinks, k_pos, q_pos, window), atol=F32_ATOL, rtol=0)


def test_tiles_without_visible_keys_are_not_read():
    """NaN in every tile outside [first, last visible slot] would reach the output if such a tile were
    read (p = 0 times NaN is NaN); the same shapes as a case above, so no extra compilation."""
    B, S, window, block_k = 5, 100, 7, 16
    q, k, v, sinks = _qkv(0, B, S, 2, 3, 16)
    k_pos, q_pos = _full_cache(1, B, S)
    tile_BS = jnp.arange(S) // block_k
    first_visible_tile = jnp.maximum(q_pos - window + 1, 0) // block_k
    skipped_BS = (tile_BS > q_pos[:, None] // block_k) | (tile_BS < first_visible_tile[:, None])
    assert int(skipped_BS.sum()) > 0
    poisoned = [jnp.where(skipped_BS[:, :, None, None], jnp.nan, x) for x in (k, v)]
    out = decode_attention(q, *poisoned, sinks, k_pos, q_pos, window=window, k_splits=3, block_k=block_k, interpret=True)
    np.testing.assert_allclose(out, _reference(q, k, v, sinks, k_pos, q_pos, window), atol=F32_ATOL, rtol=0)


@pytest.mark.parametrize("window, N, G, D", [(1, 3, 5, 24), (5, 1, 3, 16), (7, 2, 4, 16), (128, 3, 2, 16)])
def test_ring_cache_f32(window, N, G, D):
    """Rows early (empty slots), exactly full, and wrapped several times (slots out of position order)."""
    k_pos, q_pos = _ring_cache([0, window // 2, window, 3 * window + 2], window)
    q, k, v, sinks = _qkv(2, 4, window + 1, N, G, D)
    out = decode_attention(q, k, v, sinks, k_pos, q_pos, window=window, k_splits=3, block_k=16, interpret=True)
    np.testing.assert_allclose(out, _reference(q, k, v, sinks, k_pos, q_pos, window), atol=F32_ATOL, rtol=0)


@pytest.mark.parametrize("layout", ["full", "ring"])
def test_bf16_with_default_tiles_and_splits(layout):
    """gpt-oss head shapes (G=8, D=64) with the default block_k and k_splits."""
    if layout == "full":
        k_pos, q_pos = _full_cache(3, 4, 100)
        window = None
    else:
        k_pos, q_pos = _ring_cache([0, 3, 128, 300], 128)
        window = 128
    q, k, v, sinks = _qkv(4, 4, k_pos.shape[1], 2, 8, 64, jnp.bfloat16)
    out = decode_attention(q, k, v, sinks, k_pos, q_pos, window=window, interpret=True)
    assert out.dtype == jnp.bfloat16
    exact = _reference(*_as_f32(q, k, v), sinks, k_pos, q_pos, window)
    np.testing.assert_allclose(out.astype(jnp.float32), exact, atol=BF16_ATOL, rtol=BF16_RTOL)


def test_rows_without_visible_keys_give_zero():
    """Empty slots only, keys all in the future, and keys all outside the window: exactly 0, no NaN.

    Also the poison check: interpret mode fills unwritten outputs with NaN and the combine reads every
    partial (o, m, l) of every split, so a split that skipped its store (here 8 splits share at most 3
    tiles, and three rows have no tile at all) would turn the output NaN.
    """
    q, k, v, sinks = _qkv(8, 4, 45, 3, 5, 24)
    positions = jnp.arange(45, dtype=jnp.int32)
    k_pos = jnp.stack([jnp.full(45, -1, jnp.int32), positions + 10, positions, positions])
    q_pos = jnp.asarray([44, 9, 60, 30], jnp.int32)  # row 2: window 5 ends at 56 > 44; row 3 sees keys
    out = decode_attention(q, k, v, sinks, k_pos, q_pos, window=5, k_splits=8, block_k=16, interpret=True)
    assert np.all(np.asarray(out[:3]) == 0)
    np.testing.assert_allclose(out, _reference(q, k, v, sinks, k_pos, q_pos, 5), atol=F32_ATOL, rtol=0)


# The next two tests share one compilation.
WINDOW = 9
SHARED_CALL = dict(window=WINDOW, k_splits=3, block_k=16, interpret=True)


def test_slot_order_does_not_matter():
    """Any ring layout: permuting slots (keys, values and positions together) leaves the output unchanged."""
    q, k, v, sinks = _qkv(5, 3, 45, 2, 3, 16)
    k_pos, q_pos = _full_cache(6, 3, 45)
    k_pos = k_pos.at[:, 40:].set(-1)  # some empty slots, which end up anywhere
    perm = np.random.default_rng(7).permutation(45)
    out = decode_attention(q, k, v, sinks, k_pos, q_pos, **SHARED_CALL)
    shuffled = decode_attention(q, k[:, perm], v[:, perm], sinks, k_pos[:, perm], q_pos, **SHARED_CALL)
    np.testing.assert_allclose(shuffled, out, atol=F32_ATOL, rtol=0)
    np.testing.assert_allclose(out, _reference(q, k, v, sinks, k_pos, q_pos, WINDOW), atol=F32_ATOL, rtol=0)


def test_extreme_sinks():
    """Sink 30 takes all the mass (keys' logits are ~N(0, 1)); sink -30 leaves plain softmax attention."""
    q, k, v, _ = _qkv(9, 3, 45, 2, 3, 16)
    k_pos, q_pos = _full_cache(10, 3, 45)
    drowned = decode_attention(q, k, v, jnp.full((2, 3), 30.0, jnp.float32), k_pos, q_pos, **SHARED_CALL)
    # Each key keeps at most exp(max logit - 30) < 1e-10 of the mass; values are ~N(0, 1). Measured 4e-12.
    assert float(jnp.abs(drowned).max()) < 1e-8
    plain = decode_attention(q, k, v, jnp.full((2, 3), -30.0, jnp.float32), k_pos, q_pos, **SHARED_CALL)
    no_sink = jnp.full((2, 3), -jnp.inf, jnp.float32)  # the reference's softmax without the extra column
    np.testing.assert_allclose(plain, _reference(q, k, v, no_sink, k_pos, q_pos, WINDOW), atol=F32_ATOL, rtol=0)


def test_default_k_splits_fill_the_gpu():
    """Long rows use >= 2 programs per SM; short rows still give each split at least 2 tiles."""
    for batch in (1, 8):
        assert batch * 8 * default_k_splits(131072, batch, 8) >= 2 * H100_SMS
    assert default_k_splits(129, 1, 8) == 1  # 2 tiles of 128
    assert default_k_splits(4096, 1, 8) == 16  # 32 tiles, 2 per split


@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("S, window", [(4096, None), (131072, None), (129, 128)], ids=["4k", "128k", "ring"])
def test_lowers_for_h100(B, S, window):
    N, G, D = 8, 8, 64  # gpt-oss-20b
    bf16 = jnp.bfloat16
    args = (
        jax.ShapeDtypeStruct((B, N, G, D), bf16),
        jax.ShapeDtypeStruct((B, S, N, D), bf16),
        jax.ShapeDtypeStruct((B, S, N, D), bf16),
        jax.ShapeDtypeStruct((N, G), jnp.float32),
        jax.ShapeDtypeStruct((B, S), jnp.int32),
        jax.ShapeDtypeStruct((B,), jnp.int32),
    )
    assert_lowers(decode_attention, *args, platform="cuda", window=window)
