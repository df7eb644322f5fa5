"""The model's `pallas` implementations: which kernel of `pallas_kernels` serves which call, in the model's layouts.

Kernels run compiled on GPU (Pallas Triton) and TPU (Mosaic) and interpreted on CPU, where they are
slow and exist to be tested against the XLA path. Attention picks its kernel by the call:
- no cache (training, uncached prefill): flash attention; on TPU, JAX's splash attention;
- one new token against a cache (decode): split-K decode attention over the cache as stored, the
  sliding layers' ring included (its slots carry their own positions);
- several new tokens against a cache (chunked prefill): flash attention with position offsets; a
  ring is first rotated into position order, since flash attention wants keys at consecutive positions.
On TPU the two cached cases stay on the XLA path (`has_attention_kernel`): those kernels are Pallas
Triton, and the cache's per-kv-head blocks do not meet Mosaic's (8, 128) tiling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptoss_jax.kv_cache import WritePlan
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.moe import experts_mlp
from pallas_kernels.splash import splash_attention


def interpret() -> bool:
    """Pallas has no CPU backend: interpret the kernels there."""
    return jax.default_backend() == "cpu"


def has_attention_kernel(cached: bool) -> bool:
    return not cached or jax.default_backend() != "tpu"


def attend(
    q_BTNGD: jax.Array,
    k_BSND: jax.Array,
    v_BSND: jax.Array,
    q_pos_BT: jax.Array,
    plan: WritePlan | None,
    sinks_NG: jax.Array,
    window: int | None,
) -> jax.Array:
    """`model.attend` by kernels; keys are the new tokens' (`plan` None) or those `LayerCache.attend_to` returned."""
    q_start_B = q_pos_BT[:, 0]
    if plan is None:  # queries and keys are the same positions
        if jax.default_backend() == "tpu":
            return splash_attention(q_BTNGD, k_BSND, v_BSND, sinks_NG, q_start_B, q_start_B, window=window)
        return flash_attention(q_BTNGD, k_BSND, v_BSND, sinks_NG, q_start_B, q_start_B, window=window, interpret=interpret())
    if q_BTNGD.shape[1] == 1:
        o_BNGD = decode_attention(
            q_BTNGD[:, 0], k_BSND, v_BSND, sinks_NG, plan.key_positions, q_start_B, window=window, interpret=interpret()
        )
        return o_BNGD[:, None]
    k_start_B = jnp.zeros_like(q_start_B)  # a full cache holds position p in slot p
    if plan.ring:
        k_BSND, v_BSND, k_start_B = _ring_in_position_order(k_BSND, v_BSND, q_start_B, q_BTNGD.shape[1])
    return flash_attention(q_BTNGD, k_BSND, v_BSND, sinks_NG, q_start_B, k_start_B, window=window, interpret=interpret())


def _ring_in_position_order(k_BSND, v_BSND, lengths_B, num_new: int):
    """[ring, new] keys -> keys at consecutive positions starting at `lengths - slots` (negative = empty).

    Slot s of a ring of `slots` holds the newest position p < length with p % slots == s, so reading
    slots (length + i) % slots for i = 0.. gives positions length - slots + i.
    """
    slots = k_BSND.shape[1] - num_new
    index_BS = ((lengths_B[:, None] + jnp.arange(slots)) % slots)[:, :, None, None]

    def in_order(x_BSND):
        return jnp.concatenate([jnp.take_along_axis(x_BSND[:, :slots], index_BS, axis=1), x_BSND[:, slots:]], axis=1)

    return in_order(k_BSND), in_order(v_BSND), lengths_B - slots


def experts(experts, t_BTH: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array) -> jax.Array:
    """`moe.gather`'s math by the grouped MXFP4 kernels; `experts` is a `moe.Experts` of packed matrices."""
    B, T, H = t_BTH.shape
    out_MH = experts_mlp(
        t_BTH.reshape(B * T, H), experts_BTK.reshape(B * T, -1), weights_BTK.reshape(B * T, -1),
        experts.mlp1.blocks, experts.mlp1.scales, experts.mlp1_bias,
        experts.mlp2.blocks, experts.mlp2.scales, experts.mlp2_bias,
        alpha=experts.alpha, limit=experts.limit, interpret=interpret(),
    )
    return out_MH.reshape(B, T, H)
