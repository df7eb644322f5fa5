"""Attention with sinks on TPU: JAX's splash attention behind `flash_attention`'s signature.

Splash (jax.experimental.pallas.ops.tpu.splash_attention) already has per-head sinks, GQA, sliding
windows as `LocalMask` and a backward pass (KERNELS.md sections 3 and 4.1); this module only adapts
layouts, the 1/sqrt(D) scale (splash does not scale) and sequence padding. It covers what the model runs
on TPU without a cache: training and uncached prefill, where queries and keys are the same positions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash


@functools.lru_cache(maxsize=32)
def _kernel(T: int, heads: int, window: int | None, block_q: int, block_k: int, interpret: bool):
    """The splash kernel for one sequence of length T (cached: building it walks the mask block by block)."""
    if window is None:
        mask = splash.CausalMask((T, T))
    else:  # key kept iff 0 <= q - k <= window - 1, gpt-oss's band
        mask = splash.LocalMask((T, T), window_size=(window - 1, 0), offset=0)
    blocks = splash.BlockSizes(
        block_q=block_q, block_kv=block_k, block_kv_compute=block_k,
        block_q_dkv=block_q, block_kv_dkv=block_k, block_kv_dkv_compute=block_k,
        block_q_dq=block_q, block_kv_dq=block_k,
    )
    return splash.make_splash_mha_single_device(splash.MultiHeadMask([mask] * heads), block_sizes=blocks,
                                                interpret=interpret)


@functools.partial(jax.jit, static_argnames=("window", "block_q", "block_k", "interpret"))
def splash_attention(
    q_BTNGD: jax.Array,
    k_BSND: jax.Array,
    v_BSND: jax.Array,
    sinks_NG: jax.Array,
    q_start_B: jax.Array,
    k_start_B: jax.Array,
    *,
    window: int | None,
    block_q: int = 128,
    block_k: int = 128,
    interpret: bool = False,
) -> jax.Array:
    """`pallas_kernels.flash_attention.flash_attention` on TPU, for S == T and q_start_B == k_start_B >= 0.

    Only relative positions matter then, so the starts are not read (they keep the signature shared);
    other offsets (chunked prefill against a cache) need `flash_attention`. T is padded to a multiple
    of both blocks; padded keys come after every real query, so the causal mask hides them. Blocks of
    128 match the TPU lanes and cover the window-128 band with two key blocks per query block; they
    are not tuned on hardware.
    """
    del q_start_B, k_start_B
    B, T, N, G, D = q_BTNGD.shape
    if k_BSND.shape != (B, T, N, D) or v_BSND.shape != k_BSND.shape or sinks_NG.shape != (N, G):
        raise ValueError(f"shapes q {q_BTNGD.shape}, k {k_BSND.shape}, v {v_BSND.shape}, sinks {sinks_NG.shape}")
    padded = -(-T // max(block_q, block_k)) * max(block_q, block_k)
    if padded % block_q or padded % block_k:
        raise ValueError(f"block sizes must divide each other, got {block_q=}, {block_k=}")

    def heads_first(x):  # [B, T, heads, D] -> [B, heads, padded T, D], splash's layout
        return jnp.pad(x, ((0, 0), (0, padded - T), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    # Splash takes logits as q . k; scale q in float32 (exact for head_dim 64: 1/8) before the cast back.
    q = (q_BTNGD.astype(jnp.float32) * D**-0.5).astype(q_BTNGD.dtype).reshape(B, T, N * G, D)
    kernel = _kernel(padded, N * G, window, block_q, block_k, interpret)
    sinks_H = sinks_NG.reshape(N * G).astype(jnp.float32)  # q head n * G + g reads kv head n, as in splash
    o_BHTD = jax.vmap(lambda q, k, v: kernel(q, k, v, sinks=sinks_H))(
        heads_first(q), heads_first(k_BSND), heads_first(v_BSND)
    )
    return o_BHTD[:, :, :T].transpose(0, 2, 1, 3).reshape(B, T, N, G, D)
