"""Flash attention with sinks for prefill and training on H100 (Pallas Triton backend), forward and backward.

FlashAttention-2 (one program per query tile, online softmax over key tiles) with the changes gpt-oss needs:
- the sink, one float32 logit per query head with no value, is the first column of the online softmax
  (running max starts at the sink, running sum at 1), so a row that sees no key outputs 0 and the saved
  log-sum-exp includes it (KERNELS.md section 8);
- GQA without repeating K/V: a program owns the G query heads of one kv head, flattened into the rows of
  its tile (row = t * Gp + g), so each K/V tile is read once for the whole group and dK/dV come out
  summed over the group;
- positions: query t of row b sits at `q_start[b] + t`, key s at `k_start[b] + s` (chunked prefill against
  cached keys); key visible iff 0 <= kpos <= qpos and, with a window, qpos - kpos < window;
- band skipping: each program loops only over the tiles that can hold visible keys (or, for dK/dV, queries),
  so a sliding layer costs O(T * window), not O(T^2).

Softmax runs in base 2 (logits pre-multiplied by log2(e)), as FlashAttention kernels do: exp2 is one SFU
instruction. The saved `lse2` is therefore in base 2. Ragged sequence tails, head counts and head dims
that are not powers of two are handled with masked loads (Triton blocks must hold 2^k elements); stores
of ragged output blocks are bounded by Pallas itself.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

LOG2_E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Static sizes shared by the three kernels; `Gp`, `Dp` are the power-of-two padded group and head dim."""

    T: int
    S: int
    G: int
    D: int
    window: int | None
    block_q: int  # query positions per tile; the tile has block_q * Gp rows
    block_k: int  # keys per tile

    @property
    def Gp(self) -> int:
        return pl.next_power_of_2(self.G)

    @property
    def Dp(self) -> int:
        return max(16, pl.next_power_of_2(self.D))  # Triton's dot needs K >= 16

    @property
    def logit_scale(self) -> float:
        return self.D**-0.5 * LOG2_E


def _load(ref, start, size: int, limits: tuple[int, ...]) -> jax.Array:
    """`ref[start:start+size]`, zero wherever an index reaches its axis's unpadded `limits` (axis 0 counts
    from the ref's own start). Masks every padded element, which Triton would otherwise read as garbage."""
    shape = (size, *ref.shape[1:])
    mask = None
    for axis, limit in enumerate(limits):
        if axis and limit >= shape[axis]:
            continue
        index = jnp.arange(shape[axis]).reshape([-1 if a == axis else 1 for a in range(len(shape))])
        in_bounds = (index + start if axis == 0 else index) < limit
        mask = in_bounds if mask is None else mask & in_bounds
    return pltriton.load(ref.at[pl.ds(start, size)], mask=mask, other=0)


def _load_rows(ref, start, length, geo: _Geometry) -> jax.Array:
    """`block_q` query positions from `start` of a [length, Gp(, Dp)] ref as [block_q * Gp(, Dp)] rows."""
    tile = _load(ref, start, geo.block_q, (length, geo.G, geo.D)[: len(ref.shape)])
    return tile.reshape(geo.block_q * geo.Gp, *tile.shape[2:])


def _query_rows(geo: _Geometry, q_start, t0) -> tuple[jax.Array, jax.Array]:
    """Position and validity (inside T, a real head) of each row of the query tile starting at t0."""
    shape = (geo.block_q, geo.Gp)
    t = jnp.broadcast_to(jnp.arange(geo.block_q)[:, None], shape).reshape(-1) + t0
    g = jnp.broadcast_to(jnp.arange(geo.Gp)[None, :], shape).reshape(-1)
    return q_start + t, (t < geo.T) & (g < geo.G)


def _key_columns(geo: _Geometry, k_start, s0) -> tuple[jax.Array, jax.Array]:
    """Position and validity of each key of the tile starting at s0."""
    s = jnp.arange(geo.block_k) + s0
    return k_start + s, s < geo.S


def _logits2(q, k, rows, cols, geo: _Geometry) -> jax.Array:
    """Base-2 scaled logits [rows, keys] in float32, -inf where the key is not visible."""
    (q_pos, row_ok), (k_pos, col_ok) = rows, cols
    q_pos, k_pos = q_pos[:, None], k_pos[None, :]
    visible = row_ok[:, None] & col_ok[None, :] & (k_pos >= 0) & (k_pos <= q_pos)
    if geo.window is not None:
        visible &= q_pos - k_pos < geo.window
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return jnp.where(visible, s * geo.logit_scale, -jnp.inf)


def _tile_range(lo, hi, length: int, block: int) -> tuple[jax.Array, jax.Array]:
    """[first, end) of the tiles of `block` covering indices lo..hi clipped to [0, length); empty if hi < lo."""
    lo, hi = jnp.maximum(lo, 0), jnp.minimum(hi, length - 1)
    first = lax.div(lo, block)  # lax.div truncates; lo >= 0, and hi >= 0 where its quotient is used
    return first, jnp.where(hi >= lo, lax.div(hi + block, block), first)


def _key_tiles(geo: _Geometry, q_start, k_start, t0):
    """The key tiles that can be visible to queries t0 .. t0 + block_q - 1 (band skipping)."""
    q_first, q_last = q_start + t0, q_start + jnp.minimum(t0 + geo.block_q, geo.T) - 1
    k_first = 0 if geo.window is None else jnp.maximum(q_first - geo.window + 1, 0)
    return _tile_range(k_first - k_start, q_last - k_start, geo.S, geo.block_k)


def _query_tiles(geo: _Geometry, q_start, k_start, s0):
    """The query tiles that can see keys s0 .. s0 + block_k - 1 (band skipping)."""
    k_first, k_last = k_start + s0, k_start + jnp.minimum(s0 + geo.block_k, geo.S) - 1
    q_last = geo.T - 1 + q_start if geo.window is None else k_last + geo.window - 1
    q_last = jnp.where(k_last >= 0, q_last, -1)  # every key of the tile absent: no query sees it
    return _tile_range(jnp.maximum(k_first, 0) - q_start, q_last - q_start, geo.T, geo.block_q)


def _forward_kernel(q_start_ref, k_start_ref, sinks_ref, q_ref, k_ref, v_ref, o_ref, lse2_ref, *, geo: _Geometry):
    q_start, k_start, t0 = q_start_ref[()], k_start_ref[()], pl.program_id(0) * geo.block_q
    q = _load_rows(q_ref, 0, geo.T - t0, geo)  # the ref holds this program's tile only
    rows = _query_rows(geo, q_start, t0)
    sinks2 = _load(sinks_ref, 0, geo.Gp, (geo.G,)).astype(jnp.float32) * LOG2_E
    m = jnp.broadcast_to(sinks2[None, :], (geo.block_q, geo.Gp)).reshape(-1)  # the sink is the first column
    l = jnp.ones_like(m)  # exp2(sink - m)

    def step(j, carry):
        o, m, l = carry
        s0 = j * geo.block_k
        k = _load(k_ref, s0, geo.block_k, (geo.S, geo.D))
        v = _load(v_ref, s0, geo.block_k, (geo.S, geo.D))
        s = _logits2(q, k, rows, _key_columns(geo, k_start, s0), geo)
        m_next = jnp.maximum(m, s.max(axis=1))
        correction = jnp.exp2(m - m_next)
        p = jnp.exp2(s - m_next[:, None])
        o = o * correction[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return o, m_next, l * correction + p.sum(axis=1)

    o = jnp.zeros((geo.block_q * geo.Gp, geo.Dp), jnp.float32)
    o, m, l = lax.fori_loop(*_key_tiles(geo, q_start, k_start, t0), step, (o, m, l))
    o_ref[...] = (o / l[:, None]).reshape(o_ref.shape).astype(o_ref.dtype)
    lse2_ref[...] = (m + jnp.log2(l)).reshape(lse2_ref.shape)


def _dq_kernel(q_start_ref, k_start_ref, q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, dq_ref, *, geo: _Geometry):
    q_start, k_start, t0 = q_start_ref[()], k_start_ref[()], pl.program_id(0) * geo.block_q
    q, do, lse2, delta = (_load_rows(ref, 0, geo.T - t0, geo) for ref in (q_ref, do_ref, lse2_ref, delta_ref))
    rows = _query_rows(geo, q_start, t0)

    def step(j, dq):
        s0 = j * geo.block_k
        k = _load(k_ref, s0, geo.block_k, (geo.S, geo.D))
        v = _load(v_ref, s0, geo.block_k, (geo.S, geo.D))
        p = jnp.exp2(_logits2(q, k, rows, _key_columns(geo, k_start, s0), geo) - lse2[:, None])
        dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = jnp.zeros((geo.block_q * geo.Gp, geo.Dp), jnp.float32)
    dq = lax.fori_loop(*_key_tiles(geo, q_start, k_start, t0), step, dq)
    dq_ref[...] = (dq * geo.D**-0.5).reshape(dq_ref.shape).astype(dq_ref.dtype)


def _dkv_kernel(
    q_start_ref, k_start_ref, q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, dk_ref, dv_ref, *, geo: _Geometry
):
    q_start, k_start, s0 = q_start_ref[()], k_start_ref[()], pl.program_id(0) * geo.block_k
    k = _load(k_ref, 0, geo.block_k, (geo.S - s0, geo.D))
    v = _load(v_ref, 0, geo.block_k, (geo.S - s0, geo.D))
    cols = _key_columns(geo, k_start, s0)

    def step(i, carry):
        dk, dv = carry
        t0 = i * geo.block_q
        q, do, lse2, delta = (_load_rows(ref, t0, geo.T, geo) for ref in (q_ref, do_ref, lse2_ref, delta_ref))
        p = jnp.exp2(_logits2(q, k, _query_rows(geo, q_start, t0), cols, geo) - lse2[:, None])
        dv += jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32), dv

    dkv = jnp.zeros((geo.block_k, geo.Dp), jnp.float32)
    dk, dv = lax.fori_loop(*_query_tiles(geo, q_start, k_start, s0), step, (dkv, dkv))
    dk_ref[...] = (dk * geo.D**-0.5).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# Block specs; grid = (tile, b, n): the tile axis varies fastest, so programs sharing a kv head's K/V
# (or Q) run together and hit L2.
def _query_tile(geo: _Geometry, tail: tuple[int, ...]) -> pl.BlockSpec:
    return pl.BlockSpec((None, geo.block_q, None, *tail), lambda i, b, n: (b, i, n, *[0] * len(tail)))


def _all_queries(geo: _Geometry, tail: tuple[int, ...]) -> pl.BlockSpec:
    return pl.BlockSpec((None, geo.T, None, *tail), lambda i, b, n: (b, 0, n, *[0] * len(tail)))


def _key_tile(geo: _Geometry) -> pl.BlockSpec:
    return pl.BlockSpec((None, geo.block_k, None, geo.Dp), lambda j, b, n: (b, j, n, 0))


def _all_keys(geo: _Geometry) -> pl.BlockSpec:
    return pl.BlockSpec((None, geo.S, None, geo.Dp), lambda i, b, n: (b, 0, n, 0))


_PER_ROW = pl.BlockSpec((None,), lambda i, b, n: (b,))  # q_start[b], k_start[b]


def _forward(geo: _Geometry, interpret: bool, q, k, v, sinks, q_start, k_start):
    B, _, N, _, _ = q.shape
    row, head = (geo.Gp,), (geo.Gp, geo.Dp)
    return pl.pallas_call(
        functools.partial(_forward_kernel, geo=geo),
        grid=(pl.cdiv(geo.T, geo.block_q), B, N),
        in_specs=[_PER_ROW, _PER_ROW, pl.BlockSpec((None, geo.Gp), lambda i, b, n: (n, 0)),
                  _query_tile(geo, head), _all_keys(geo), _all_keys(geo)],
        out_specs=[_query_tile(geo, head), _query_tile(geo, row)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32)],
        # 128 rows x 64 keys x head_dim 64 is the FA2 Triton tutorial's tile for head_dim 64 (4 warps,
        # 3 stages to overlap the next K/V load); not tuned on hardware here.
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name="flash_attention_sinks_fwd",
    )(q_start, k_start, sinks, q, k, v)


def _backward(geo: _Geometry, interpret: bool, q, k, v, q_start, k_start, do, lse2, delta):
    B, _, N, _, _ = q.shape
    row, head = (geo.Gp,), (geo.Gp, geo.Dp)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, geo=geo),
        grid=(pl.cdiv(geo.T, geo.block_q), B, N),
        in_specs=[_PER_ROW, _PER_ROW, _query_tile(geo, head), _all_keys(geo), _all_keys(geo),
                  _query_tile(geo, head), _query_tile(geo, row), _query_tile(geo, row)],
        out_specs=_query_tile(geo, head),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name="flash_attention_sinks_dq",
    )(q_start, k_start, q, k, v, do, lse2, delta)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, geo=geo),
        grid=(pl.cdiv(geo.S, geo.block_k), B, N),
        in_specs=[_PER_ROW, _PER_ROW, _all_queries(geo, head), _key_tile(geo), _key_tile(geo),
                  _all_queries(geo, head), _all_queries(geo, row), _all_queries(geo, row)],
        out_specs=[_key_tile(geo), _key_tile(geo)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        # Two [block_k, Dp] float32 accumulators plus K and V stay live across the query loop: 8 warps
        # spread them over more registers.
        compiler_params=pltriton.CompilerParams(num_warps=8, num_stages=2),
        interpret=interpret,
        name="flash_attention_sinks_dkv",
    )(q_start, k_start, q, k, v, do, lse2, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(geo, interpret, q, k, v, sinks, q_start, k_start):
    return _forward(geo, interpret, q, k, v, sinks, q_start, k_start)[0]


def _flash_fwd(geo, interpret, q, k, v, sinks, q_start, k_start):
    o, lse2 = _forward(geo, interpret, q, k, v, sinks, q_start, k_start)
    return o, (q, k, v, sinks, q_start, k_start, o, lse2)


def _flash_bwd(geo, interpret, residuals, do):
    q, k, v, sinks, q_start, k_start, o, lse2 = residuals
    # FA2's D_i = do_i . o_i, the softmax-Jacobian term of every row; one fused XLA reduction.
    delta = jnp.einsum("btngd,btngd->btng", o.astype(jnp.float32), do.astype(jnp.float32))
    dq, dk, dv = _backward(geo, interpret, q, k, v, q_start, k_start, do, lse2, delta)
    # d out / d sink = -p_sink * out, with p_sink = exp(sink - lse) = exp2(sink * log2(e) - lse2).
    p_sink = jnp.exp2(sinks.astype(jnp.float32) * LOG2_E - lse2)
    d_sinks = -jnp.einsum("btng,btng->ng", p_sink, delta).astype(sinks.dtype)
    return dq, dk, dv, d_sinks, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.jit, static_argnames=("window", "block_q", "block_k", "interpret"))
def flash_attention(
    q_BTNGD: jax.Array,
    k_BSND: jax.Array,
    v_BSND: jax.Array,
    sinks_NG: jax.Array,
    q_start_B: jax.Array,
    k_start_B: jax.Array,
    *,
    window: int | None,
    block_q: int = 16,
    block_k: int = 64,
    interpret: bool = False,
) -> jax.Array:
    """Attention with sinks, `o_BTNGD`; the same numbers as `gptoss_jax.attention.attend` with query positions
    `q_start_B[:, None] + arange(T)` and key positions `k_start_B[:, None] + arange(S)` (negative = absent).

    Differentiable in q, k, v and sinks; sinks must be finite (each row's running max starts there).
    `block_q` counts query positions, so a tile has block_q * G rows (G padded to a power of two): the
    defaults give gpt-oss (G = 8, head_dim 64) 128 x 64 logit tiles, the FA2 tile for head_dim 64 on
    H100, and keep the window-128 band to three or four key tiles per query tile. Block sizes must be
    powers of two with at least 16 rows and 16 keys (Triton's dot minimum).
    """
    B, T, N, G, D = q_BTNGD.shape
    S = k_BSND.shape[1]
    if k_BSND.shape != (B, S, N, D) or v_BSND.shape != k_BSND.shape or sinks_NG.shape != (N, G):
        raise ValueError(f"shapes q {q_BTNGD.shape}, k {k_BSND.shape}, v {v_BSND.shape}, sinks {sinks_NG.shape}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    geo = _Geometry(T=T, S=S, G=G, D=D, window=window, block_q=block_q, block_k=block_k)
    for size in (block_q, block_k):
        if size != pl.next_power_of_2(size):
            raise ValueError(f"block sizes must be powers of two, got block_q={block_q}, block_k={block_k}")
    if block_q * geo.Gp < 16 or block_k < 16:
        raise ValueError(f"tiles need >= 16 rows and keys: block_q * {geo.Gp} = {block_q * geo.Gp}, {block_k=}")
    positions = (q_start_B.astype(jnp.int32), k_start_B.astype(jnp.int32))
    return _flash(geo, interpret, q_BTNGD, k_BSND, v_BSND, sinks_NG, *positions)
