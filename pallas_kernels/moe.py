"""The MoE experts (SPEC 2.4 steps 4-8) as two grouped MXFP4 matmuls.

The caller sorts each token's K (token, expert) copies by expert (`order_C`, `group_sizes_E`: the
routing sort, written once in `gptoss_jax.moe.sort_by_expert`), so every expert sees one contiguous run
of rows; mlp1 (+ bias + clamped SwiGLU) and mlp2 (+ bias, times the routing weight) run as grouped
matmuls over those runs; the copies are then put back in token order and summed over k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import grouped_matmul


def experts_mlp(
    x_MH: jax.Array,
    weights_MK: jax.Array,
    order_C: jax.Array,
    group_sizes_E: jax.Array,
    mlp1_blocks: jax.Array,
    mlp1_scales: jax.Array,
    mlp1_bias: jax.Array,
    mlp2_blocks: jax.Array,
    mlp2_scales: jax.Array,
    mlp2_bias: jax.Array,
    *,
    alpha: float,
    limit: float,
    backend: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Σ_k w_k · (W2[e_k] · swiglu(W1[e_k] · x + b1[e_k]) + b2[e_k]) for every token; `[M, H]` in x's dtype.

    mlp1 is `[E, 2I, H]` packed (gate/linear interleaved), mlp2 `[E, H, I]` packed, as in the checkpoint.
    `order_C` lists the C = M*K copies (token-major) grouped by expert; `group_sizes_E` counts each group.
    """
    num_tokens, top_k = weights_MK.shape
    tokens_C = order_C // top_k
    kernels = dict(backend=backend, interpret=interpret)
    act_CI = grouped_matmul(
        x_MH[tokens_C], group_sizes_E, mlp1_blocks, mlp1_scales, mlp1_bias,
        epilogue="swiglu", alpha=alpha, limit=limit, **kernels,
    )
    y_CH = grouped_matmul(
        act_CI, group_sizes_E, mlp2_blocks, mlp2_scales, mlp2_bias, weights_MK.reshape(-1)[order_C],
        epilogue="scale", **kernels,
    )
    y_MKH = y_CH[jnp.argsort(order_C)].reshape(num_tokens, top_k, -1)  # back to token order
    return jnp.sum(y_MKH.astype(jnp.float32), axis=1).astype(x_MH.dtype)
