"""Attention with sinks (SPEC 2.3) in XLA: `attend`, the reference formulation, and `attend_long`, the
same numbers for long inputs at the cost the math needs.

`attend` holds [B, heads, S, T] float32 logits: fine for a decode step or a short chunk, but 4096 keys
x 256 queries x 64 heads is 268 MB per layer (twice, with the probabilities), and without a cache a
sliding layer computes every key of a long input only to mask all but `window` of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KEY_CHUNK = 512  # keys per online-softmax step in `attend_long`


def attend(
    q_BTNGD: jax.Array,
    k_BSND: jax.Array,
    v_BSND: jax.Array,
    q_pos_BT: jax.Array,
    k_pos_BS: jax.Array,
    sinks_NG: jax.Array,
    window: int | None,
) -> jax.Array:
    """Reference attention with sinks: the sink is one extra logit column with no value (REF `sdpa`).

    Key j is visible to query i iff 0 <= j <= i and, on sliding layers, i - j < window. Logits,
    softmax and the sink are float32; the sink is not multiplied by the 1/sqrt(D) scale.
    Keys are the logits' major axis ([B, N, S, G, T]): XLA:CPU's GEMM writes them that way, and with
    keys last the mask, softmax and bf16 cast each transposed [S, G*T] (2x slower at 4096 keys).
    """
    scale = q_BTNGD.shape[-1] ** -0.5
    logits = jnp.einsum("btngd,bsnd->bnsgt", q_BTNGD, k_BSND, preferred_element_type=jnp.float32) * scale
    q_pos, k_pos = q_pos_BT[:, None, :], k_pos_BS[:, :, None]
    visible_BST = (k_pos >= 0) & (k_pos <= q_pos)
    if window is not None:
        visible_BST &= q_pos - k_pos < window
    logits = jnp.where(visible_BST[:, None, :, None, :], logits, -jnp.inf)
    B, N, _, G, T = logits.shape
    sink = jnp.broadcast_to(sinks_NG.astype(jnp.float32)[None, :, None, :, None], (B, N, 1, G, T))
    probs = jax.nn.softmax(jnp.concatenate([logits, sink], axis=2), axis=2)[:, :, :-1]
    return jnp.einsum("bnsgt,bsnd->btngd", probs.astype(v_BSND.dtype), v_BSND)


def attend_long(
    q_BTNGD: jax.Array,
    k_BSND: jax.Array,
    v_BSND: jax.Array,
    q_pos_BT: jax.Array,
    k_pos_BS: jax.Array,
    sinks_NG: jax.Array,
    window: int | None,
    *,
    same_positions: bool,
    key_chunk: int = KEY_CHUNK,
) -> jax.Array:
    """`attend`, by the cheapest of three formulations:
    - a sliding layer whose keys are its queries (`same_positions`: no cache, positions consecutive along
      T): query blocks of `window` attend to their own block and the one before, O(T x 2 window) logits;
    - more than `key_chunk` keys: chunks of keys with an online softmax (the sink is the softmax's
      starting point), holding [B, heads, key_chunk, T] logits; chunks no query sees are skipped;
    - else `attend` itself.
    """
    T, S = q_BTNGD.shape[1], k_BSND.shape[1]
    if window is not None and same_positions and T > 2 * window:
        return _banded(q_BTNGD, k_BSND, v_BSND, q_pos_BT, sinks_NG, window)
    if S > key_chunk:
        return _in_key_chunks(q_BTNGD, k_BSND, v_BSND, q_pos_BT, k_pos_BS, sinks_NG, window, key_chunk)
    return attend(q_BTNGD, k_BSND, v_BSND, q_pos_BT, k_pos_BS, sinks_NG, window)


def _pad_to(x: jax.Array, length: int, fill) -> jax.Array:
    """`x [B, n, ...]` padded with `fill` to `length` along axis 1."""
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=fill)


def _banded(q_BTNGD, k_BTND, v_BTND, pos_BT, sinks_NG, window: int) -> jax.Array:
    """Query block i (positions [iW, iW + W)) sees keys in (iW - W, iW + W): blocks i - 1 and i."""
    B, T = q_BTNGD.shape[:2]
    blocks = -(-T // window)
    length = blocks * window

    def in_blocks(x_BT, fill):  # [B, T, ...] -> [B, blocks, W, ...]
        return _pad_to(x_BT, length, fill).reshape(B, blocks, window, *x_BT.shape[2:])

    def with_previous(x_BKW, fill):  # keys of block i: block i - 1 (nothing before block 0), then block i
        previous = jnp.pad(x_BKW[:, :-1], [(0, 0), (1, 0)] + [(0, 0)] * (x_BKW.ndim - 2), constant_values=fill)
        return jnp.concatenate([previous, x_BKW], axis=2)

    # Padding queries continue the positions (so they see a key and stay finite); padding keys are -1, unseen.
    q_pos = jnp.concatenate([pos_BT, pos_BT[:, -1:] + 1 + jnp.arange(length - T)], axis=1).reshape(B, blocks, window)
    k_pos = with_previous(in_blocks(pos_BT, -1), -1)
    keys, values = with_previous(in_blocks(k_BTND, 0), 0), with_previous(in_blocks(v_BTND, 0), 0)
    flat = lambda x: x.reshape(B * blocks, *x.shape[2:])  # noqa: E731
    o = attend(flat(in_blocks(q_BTNGD, 0)), flat(keys), flat(values), flat(q_pos), flat(k_pos), sinks_NG, window)
    return o.reshape(B, length, *o.shape[2:])[:, :T]


def _in_key_chunks(q_BTNGD, k_BSND, v_BSND, q_pos_BT, k_pos_BS, sinks_NG, window, chunk: int) -> jax.Array:
    """`attend` over keys in chunks: running max `m`, normalizer `l` and unnormalized output, which
    start as the sink alone (one logit, no value).

    Each step slices its chunk out of the keys as they are (a KV cache is never padded or reordered,
    which would copy all of it every decode step); the last chunk starts at `S - chunk`, its keys
    before `i * chunk` already counted and masked.
    """
    B, T, N, G, D = q_BTNGD.shape
    S = k_BSND.shape[1]
    scale = D**-0.5
    m_BNGT = jnp.broadcast_to(sinks_NG.astype(jnp.float32)[None, :, :, None], (B, N, G, T))

    def finite(m):  # the running max, but 0 while it is -inf (a -inf sink and nothing seen yet)
        return jnp.where(jnp.isneginf(m), 0.0, m)

    def step(i, carry):
        first = i * chunk
        start = jnp.minimum(first, S - chunk)
        k_BCND, v_BCND, k_pos_BC = (jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1) for x in (k_BSND, v_BSND, k_pos_BS))
        new_C = start + jnp.arange(chunk) >= first
        visible_BCT = (new_C[None, :, None] & (k_pos_BC[:, :, None] >= 0)) & (k_pos_BC[:, :, None] <= q_pos_BT[:, None, :])
        if window is not None:
            visible_BCT &= q_pos_BT[:, None, :] - k_pos_BC[:, :, None] < window

        def attend_chunk(carry):
            m, l, acc = carry
            logits = jnp.einsum("btngd,bcnd->bncgt", q_BTNGD, k_BCND, preferred_element_type=jnp.float32) * scale
            logits = jnp.where(visible_BCT[:, None, :, None, :], logits, -jnp.inf)
            m_new = jnp.maximum(m, logits.max(axis=2))
            p = jnp.exp(logits - finite(m_new)[:, :, None])
            rescale = jnp.exp(m - finite(m_new))
            pv = jnp.einsum("bncgt,bcnd->bngtd", p.astype(v_BCND.dtype), v_BCND, preferred_element_type=jnp.float32)
            return m_new, l * rescale + p.sum(axis=2), acc * rescale[..., None] + pv

        return jax.lax.cond(visible_BCT.any(), attend_chunk, lambda carry: carry, carry)

    carry = (m_BNGT, jnp.exp(m_BNGT - finite(m_BNGT)), jnp.zeros((B, N, G, T, D), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, -(-S // chunk), step, carry)
    return jnp.einsum("bngtd->btngd", acc / l[..., None]).astype(v_BSND.dtype)
