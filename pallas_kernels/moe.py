"""The MoE experts (SPEC 2.4 steps 4-8) as two grouped MXFP4 matmuls, with their own backward.

The caller sorts each token's K (token, expert) copies by expert (`order_C`, `group_sizes_E`: the
routing sort, written once in `gptoss_jax.moe.sort_by_expert`), so every expert sees one contiguous run
of rows; mlp1 (+ bias + clamped SwiGLU) and mlp2 (+ bias, times the routing weight) run as grouped
matmuls over those runs; the copies are then put back in token order and summed over k.

The backward recomputes both pre-activations with the same kernels (nothing but the inputs is kept
from the forward) and takes the input gradients through `grouped_matmul_transposed`: the packed
weights stay frozen (no weight gradient) and are never dequantized to memory. Gradients flow to the
tokens, the routing weights and the biases.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import grouped_matmul, grouped_matmul_transposed, swiglu


class _Options(NamedTuple):
    alpha: float
    limit: float
    backend: str | None
    interpret: bool


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
    `order_C` lists the C = M*K copies (token-major) grouped by expert; `group_sizes_E` counts each group
    (copies past their sum belong to no expert and contribute nothing).
    """
    return _experts_mlp(
        _Options(alpha, limit, backend, interpret), x_MH, weights_MK, order_C, group_sizes_E,
        mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _experts_mlp(options: _Options, x_MH, weights_MK, order_C, group_sizes_E, mlp1_blocks, mlp1_scales, mlp1_bias,
                 mlp2_blocks, mlp2_scales, mlp2_bias) -> jax.Array:
    num_tokens, top_k = weights_MK.shape
    tokens_C = order_C // top_k
    kernels = dict(backend=options.backend, interpret=options.interpret)
    act_CI = grouped_matmul(
        x_MH[tokens_C], group_sizes_E, mlp1_blocks, mlp1_scales, mlp1_bias,
        epilogue="swiglu", alpha=options.alpha, limit=options.limit, **kernels,
    )
    y_CH = grouped_matmul(
        act_CI, group_sizes_E, mlp2_blocks, mlp2_scales, mlp2_bias, weights_MK.reshape(-1)[order_C],
        epilogue="scale", **kernels,
    )
    y_MKH = y_CH[jnp.argsort(order_C)].reshape(num_tokens, top_k, -1)  # back to token order
    return jnp.sum(y_MKH.astype(jnp.float32), axis=1).astype(x_MH.dtype)


def _experts_mlp_forward(options: _Options, *args):
    return _experts_mlp(options, *args), args


def _experts_mlp_backward(options: _Options, args, dout_MH: jax.Array):
    """With u = W1 x + b1, a = swiglu(u), y = W2 a + b2 per copy c (token t, weight w):
    dw = <dout_t, y>, dy = w dout_t, da = W2ᵀ dy, du = swiglu'(u) da, dx_t = Σ_c W1ᵀ du."""
    x_MH, weights_MK, order_C, group_sizes_E, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias = args
    num_tokens, top_k = weights_MK.shape
    tokens_C = order_C // top_k
    kernels = dict(backend=options.backend, interpret=options.interpret)
    ones_C = jnp.ones(order_C.shape, x_MH.dtype)  # the "scale" epilogue with unit scales: bias only
    u_CF = grouped_matmul(x_MH[tokens_C], group_sizes_E, mlp1_blocks, mlp1_scales, mlp1_bias, ones_C, epilogue="scale", **kernels)
    a_CI, swiglu_vjp = jax.vjp(
        lambda u: swiglu(u[:, 0::2], u[:, 1::2], options.alpha, options.limit), u_CF.astype(jnp.float32)
    )
    y_CH = grouped_matmul(a_CI.astype(x_MH.dtype), group_sizes_E, mlp2_blocks, mlp2_scales, mlp2_bias, ones_C, epilogue="scale", **kernels)

    dout_CH = dout_MH[tokens_C].astype(jnp.float32)
    dw_C = jnp.sum(dout_CH * y_CH.astype(jnp.float32), axis=1)
    dy_CH = dout_CH * weights_MK.reshape(-1)[order_C, None].astype(jnp.float32)
    da_CI = grouped_matmul_transposed(dy_CH.astype(x_MH.dtype), group_sizes_E, mlp2_blocks, mlp2_scales, **kernels)
    (du_CF,) = swiglu_vjp(da_CI.astype(jnp.float32))
    dx_CH = grouped_matmul_transposed(du_CF.astype(x_MH.dtype), group_sizes_E, mlp1_blocks, mlp1_scales, **kernels)

    # Each copy's expert; copies past the groups get E, which segment_sum drops.
    expert_C = jnp.searchsorted(jnp.cumsum(group_sizes_E), jnp.arange(order_C.shape[0]), side="right")
    per_expert = lambda d_C, bias: jax.ops.segment_sum(d_C, expert_C, bias.shape[0]).astype(bias.dtype)  # noqa: E731
    dx_MH = jnp.zeros(x_MH.shape, jnp.float32).at[tokens_C].add(dx_CH.astype(jnp.float32)).astype(x_MH.dtype)
    dweights_MK = jnp.zeros(order_C.shape, jnp.float32).at[order_C].set(dw_C).reshape(num_tokens, top_k)
    return (
        dx_MH, dweights_MK.astype(weights_MK.dtype), None, None,
        None, None, per_expert(du_CF, mlp1_bias), None, None, per_expert(dy_CH, mlp2_bias),
    )


_experts_mlp.defvjp(_experts_mlp_forward, _experts_mlp_backward)
