"""Split-K decode attention with sinks (flash-decoding) for full caches and sliding-window rings.

One query position per row attends to a key cache whose slots carry absolute positions (`k_pos`, -1 =
empty), so the same kernel serves full caches (slot = position) and rings (any slot order). The grid
is (B, N, k_splits): each program reads one kv head's K/V tiles once for all G query heads of that kv
head, runs an online softmax over its share of the row's tiles and writes a partial (o, m, l); a jnp
combine merges the splits and adds the sink once (KERNELS.md section 8):
`l = sum_k exp(m_k - M) l_k + exp(sink - M)`, `M = max(sink, max_k m_k)`.

Work is skipped where it is cheap to know it is empty: the wrapper derives, per row, the first and last
slot holding a visible key (one pass over `k_pos`, 4 bytes per slot against 4*N*D bytes of K/V), and
the splits share only the tiles between them. A full cache with 4k of 128k slots filled reads 4k keys;
a ring, whose visible slots may sit anywhere, is still masked key by key from `k_pos`.

Targets H100 through the Pallas Triton backend. TPU is not supported, and a port would be a different
kernel: Mosaic rejects the per-kv-head K/V block (the cache is [B, S, N, D], so a block of one kv head
has a squeezed second-minor dim, against TPU's (8, 128) tiling rule; checked by lowering for TPU), and
its lowering of masked loads, which the ragged tiles rely on, raises NotImplementedError. TPU decode
can use splash or ragged paged attention, which take sinks or windows, instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# Imported for its side effect: Pallas imports `fuser` lazily on the first kernel call, and the import
# adds a flag to JAX's tracing context, so every function jitted before that call (a whole model step)
# would be traced and compiled again.
from jax.experimental.pallas import fuser  # noqa: F401
from jax.experimental.pallas import triton as pltriton

H100_SMS = 132
# Heuristics (untuned: no H100 was available). Decode attention is bandwidth bound, so the aim is to
# keep every SM streaming K/V: about two programs per SM (one waits on memory while the other
# computes) across B * N * k_splits programs. At batch 1 with 8 kv heads that is 33 splits; at batch 8,
# 5. Splits never outnumber half the tiles, so each program streams at least two tiles (256 keys,
# 64 KiB of bf16 K/V at D=64) against the 2 * G * D * 4 bytes of partial results it writes and the
# combine reads back (about 3% extra traffic at G=8).
PROGRAMS_PER_SM = 2
MIN_TILES_PER_SPLIT = 2
# 128 keys x 64 dims of bf16 K and V is 32 KiB per stage; 3 stages keep three tiles in flight per
# program (enough loads outstanding to hide HBM latency) within H100's 228 KiB of shared memory.
BLOCK_K = 128
NUM_WARPS, NUM_STAGES = 4, 3
# Triton's tensor-core dot needs each of M, N, K >= 16; query heads and head_dim are padded up to this.
MIN_DOT = 16


def default_k_splits(seq_len: int, batch: int, kv_heads: int, block_k: int = BLOCK_K) -> int:
    """Splits per row so that B * N * k_splits programs keep H100's SMs busy (see PROGRAMS_PER_SM)."""
    wanted = pl.cdiv(PROGRAMS_PER_SM * H100_SMS, batch * kv_heads)
    return max(1, min(wanted, pl.cdiv(seq_len, block_k) // MIN_TILES_PER_SPLIT))


@functools.partial(jax.jit, static_argnames=("window", "k_splits", "block_k", "interpret"))
def decode_attention(
    q_BNGD: jax.Array,
    k_BSND: jax.Array,
    v_BSND: jax.Array,
    sinks_NG: jax.Array,
    k_pos_BS: jax.Array,
    q_pos_B: jax.Array,
    *,
    window: int | None,
    k_splits: int | None = None,
    block_k: int = BLOCK_K,
    interpret: bool = False,
) -> jax.Array:
    """Attention of one query per row: out[b, n, g] over keys s with 0 <= k_pos[b, s] <= q_pos[b] (and
    q_pos[b] - k_pos[b, s] < window), logits float32 scaled by D**-0.5, the unscaled float32 sink in the
    denominator; a row with no visible key gives 0. `k_splits` defaults to `default_k_splits`.
    """
    B, N, G, D = q_BNGD.shape
    S = k_BSND.shape[1]
    if block_k < MIN_DOT or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= {MIN_DOT}, got {block_k}")
    if k_splits is None:
        k_splits = default_k_splits(S, B, N, block_k)
    first_tile_B, num_tiles_B = _visible_tiles(k_pos_BS, q_pos_B, window, block_k)
    kernel = functools.partial(
        _split_kernel, window=window, block_k=block_k, k_splits=k_splits, seq_len=S, heads=G, head_dim=D
    )
    G_pad, D_pad = _pow2_at_least(G, MIN_DOT), _pow2_at_least(D, MIN_DOT)
    S_pad = pl.cdiv(S, block_k) * block_k  # blocks past an array's end are masked by Pallas
    row = pl.BlockSpec((None,), lambda b, n, j: (b,))
    kv = pl.BlockSpec((None, S_pad, None, D_pad), lambda b, n, j: (b, 0, n, 0))
    partial = pl.BlockSpec((None, None, None, G_pad), lambda b, n, j: (b, n, j, 0))
    o_BNKGD, m_BNKG, l_BNKG = pl.pallas_call(
        kernel,
        grid=(B, N, k_splits),
        in_specs=[
            row, row, row,
            pl.BlockSpec((None, None, G_pad, D_pad), lambda b, n, j: (b, n, 0, 0)),
            kv, kv,
            pl.BlockSpec((None, S_pad), lambda b, n, j: (b, 0)),
        ],
        out_specs=[pl.BlockSpec((None, None, None, G_pad, D_pad), lambda b, n, j: (b, n, j, 0, 0)), partial, partial],
        out_shape=[
            jax.ShapeDtypeStruct((B, N, k_splits, G, D), jnp.float32),
            jax.ShapeDtypeStruct((B, N, k_splits, G), jnp.float32),
            jax.ShapeDtypeStruct((B, N, k_splits, G), jnp.float32),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name="decode_attention_split",
    )(q_pos_B.astype(jnp.int32), first_tile_B, num_tiles_B, q_BNGD, k_BSND, v_BSND, k_pos_BS.astype(jnp.int32))
    return _combine(o_BNKGD, m_BNKG, l_BNKG, sinks_NG).astype(v_BSND.dtype)


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << (n - 1).bit_length())


def _visible_tiles(
    k_pos_BS: jax.Array, q_pos_B: jax.Array, window: int | None, block_k: int
) -> tuple[jax.Array, jax.Array]:
    """Per row, the first tile and the number of tiles spanning every slot with a visible key (0 if none)."""
    slot = jnp.arange(k_pos_BS.shape[1], dtype=jnp.int32)
    visible_BS = _visible(k_pos_BS, q_pos_B[:, None], window)
    first = jnp.min(jnp.where(visible_BS, slot, k_pos_BS.shape[1]), axis=1)
    end = jnp.max(jnp.where(visible_BS, slot + 1, 0), axis=1)
    first_tile = first // block_k
    return first_tile.astype(jnp.int32), jnp.maximum(pl.cdiv(end, block_k) - first_tile, 0).astype(jnp.int32)


def _visible(k_pos: jax.Array, q_pos: jax.Array, window: int | None) -> jax.Array:
    visible = (k_pos >= 0) & (k_pos <= q_pos)
    if window is not None:
        visible &= q_pos - k_pos < window
    return visible


def _split_kernel(
    q_pos_ref, first_tile_ref, num_tiles_ref, q_ref, k_ref, v_ref, k_pos_ref,  # inputs
    o_ref, m_ref, l_ref,  # partial outputs of this split
    *, window: int | None, block_k: int, k_splits: int, seq_len: int, heads: int, head_dim: int,
):
    """Online softmax of G query heads over this split's share of the row's visible tiles."""
    G_pad, D_pad = q_ref.shape
    q_pos, num_tiles = q_pos_ref[()], num_tiles_ref[()]
    per_split = pl.cdiv(num_tiles, k_splits)
    split_first = pl.program_id(2) * per_split
    count = jnp.clip(num_tiles - split_first, 0, per_split)
    first_slot = (first_tile_ref[()] + split_first) * block_k
    in_dims = jnp.arange(D_pad) < head_dim
    # Masked loads give zeros past the array's ends (Pallas pads blocks with garbage or NaN otherwise).
    q = pltriton.load(q_ref, mask=(jnp.arange(G_pad) < heads)[:, None] & in_dims[None, :], other=0)
    scale = head_dim**-0.5

    def tile(i, carry):
        o, m, l = carry
        start = first_slot + i * block_k
        in_cache = start + jnp.arange(block_k) < seq_len
        kv_mask = in_cache[:, None] & in_dims[None, :]
        k = pltriton.load(k_ref.at[pl.ds(start, block_k), :], mask=kv_mask, other=0)
        v = pltriton.load(v_ref.at[pl.ds(start, block_k), :], mask=kv_mask, other=0)
        k_pos = pltriton.load(k_pos_ref.at[pl.ds(start, block_k)], mask=in_cache, other=-1)
        logits = _dot(q, k, contract=1) * scale  # [G_pad, block_k] float32
        logits = jnp.where(_visible(k_pos, q_pos, window)[None, :], logits, -jnp.inf)
        m_new = jnp.maximum(m, logits.max(axis=1))  # finite: m starts at the float32 minimum
        correction = jnp.exp(m - m_new)
        p = jnp.exp(logits - m_new[:, None])
        o = correction[:, None] * o + _dot(p.astype(v.dtype), v, contract=0)
        return o, m_new, correction * l + p.sum(axis=1)

    init = (
        jnp.zeros((G_pad, D_pad), jnp.float32),
        jnp.full((G_pad,), jnp.finfo(jnp.float32).min, jnp.float32),
        jnp.zeros((G_pad,), jnp.float32),
    )
    o, m, l = lax.fori_loop(0, count, tile, init)
    o_ref[...], m_ref[...], l_ref[...] = o, m, l


def _dot(a: jax.Array, b: jax.Array, *, contract: int) -> jax.Array:
    """a @ b (contract=0) or a @ b.T (contract=1), float32 accumulation; HIGHEST keeps float32 inputs off TF32."""
    return lax.dot_general(
        a, b, (((1,), (contract,)), ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )


def _combine(o_BNKGD: jax.Array, m_BNKG: jax.Array, l_BNKG: jax.Array, sinks_NG: jax.Array) -> jax.Array:
    """Merges the splits' partial softmaxes and adds the sink's exp(sink) to the denominator once."""
    sink = sinks_NG.astype(jnp.float32)[None]
    m_max = jnp.maximum(sink, m_BNKG.max(axis=2))  # [B, N, G]
    weight_BNKG = jnp.exp(m_BNKG - m_max[:, :, None])  # 0 for empty splits (m = float32 minimum)
    denominator = (weight_BNKG * l_BNKG).sum(axis=2) + jnp.exp(sink - m_max)
    return (weight_BNKG[..., None] * o_BNKGD).sum(axis=2) / denominator[..., None]
