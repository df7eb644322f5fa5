"""The experts of the MoE block, computed from MXFP4-packed weights (SPEC 2.4 steps 4-8).

Two implementations with the same math, neither of which ever holds a dequantized copy of a whole
layer's experts:
- `gather`: each token decodes only the K experts it selected. Best when few tokens run (decode).
- `expert_scan`: a scan over experts; each step decodes one expert and applies it to every token,
  weighting by the routing weight (0 for tokens that did not pick it). For prefill.
`auto` picks `gather` when the selected experts are fewer than all experts, else `expert_scan`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gptoss_jax.mxfp4 import dequantize

IMPLS = ("auto", "gather", "expert_scan")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedExperts:
    """One layer's experts: mlp1 `[E, F=2I, H]` and mlp2 `[E, H, I]`, both MXFP4 `[out, in]`."""

    mlp1_blocks: jax.Array  # [E, F, H/32, 16] uint8
    mlp1_scales: jax.Array  # [E, F, H/32] uint8
    mlp1_bias: jax.Array  # [E, F]
    mlp2_blocks: jax.Array  # [E, H, I/32, 16] uint8
    mlp2_scales: jax.Array  # [E, H, I/32] uint8
    mlp2_bias: jax.Array  # [E, H]
    alpha: float = dataclasses.field(metadata=dict(static=True))
    limit: float = dataclasses.field(metadata=dict(static=True))


def clamped_swiglu(u_F: jax.Array, alpha: float, limit: float) -> jax.Array:
    """gpt-oss's SwiGLU on interleaved columns: even = gate (clamped above), odd = linear (clamped, +1)."""
    gate, linear = u_F[..., 0::2], u_F[..., 1::2]
    gate = jnp.minimum(gate, limit)
    linear = jnp.clip(linear, -limit, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (linear + 1)


def gather(experts: PackedExperts, t_BTH: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array) -> jax.Array:
    """Decodes the K selected experts of every token and applies them to that token alone."""
    dtype = t_BTH.dtype
    w1 = dequantize(experts.mlp1_blocks[experts_BTK], experts.mlp1_scales[experts_BTK], dtype)
    u_BTKF = jnp.einsum("bth,btkfh->btkf", t_BTH, w1) + experts.mlp1_bias[experts_BTK]
    act_BTKI = clamped_swiglu(u_BTKF, experts.alpha, experts.limit)
    w2 = dequantize(experts.mlp2_blocks[experts_BTK], experts.mlp2_scales[experts_BTK], dtype)
    y_BTKH = jnp.einsum("btki,btkhi->btkh", act_BTKI, w2) + experts.mlp2_bias[experts_BTK]
    return jnp.einsum("btkh,btk->bth", y_BTKH, weights_BTK.astype(dtype))


def expert_scan(
    experts: PackedExperts, t_BTH: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array
) -> jax.Array:
    """Decodes one expert at a time and applies it to every token, weighted by its routing weight."""
    dtype = t_BTH.dtype
    num_experts = experts.mlp1_bias.shape[0]
    # [E, B, T]: the routing weight of each expert for each token, 0 where it was not selected.
    combine_EBT = jnp.einsum("btke,btk->ebt", jax.nn.one_hot(experts_BTK, num_experts, dtype=dtype), weights_BTK.astype(dtype))

    def one_expert(acc_BTH, xs):
        blocks1, scales1, bias1, blocks2, scales2, bias2, combine_BT = xs
        u_BTF = jnp.einsum("bth,fh->btf", t_BTH, dequantize(blocks1, scales1, dtype)) + bias1
        act_BTI = clamped_swiglu(u_BTF, experts.alpha, experts.limit)
        y_BTH = jnp.einsum("bti,hi->bth", act_BTI, dequantize(blocks2, scales2, dtype)) + bias2
        return acc_BTH + y_BTH * combine_BT[..., None], None

    per_expert = (
        experts.mlp1_blocks, experts.mlp1_scales, experts.mlp1_bias,
        experts.mlp2_blocks, experts.mlp2_scales, experts.mlp2_bias, combine_EBT,
    )
    out_BTH, _ = jax.lax.scan(one_expert, jnp.zeros_like(t_BTH), per_expert)
    return out_BTH


def apply_experts(
    impl: str, experts: PackedExperts, t_BTH: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array
) -> jax.Array:
    """Σ_k w_k · (W2[e_k] · swiglu(W1[e_k] · t + b1[e_k]) + b2[e_k]) with the chosen implementation."""
    if impl == "auto":
        num_experts = experts.mlp1_bias.shape[0]
        impl = "gather" if experts_BTK.size < num_experts else "expert_scan"
    return {"gather": gather, "expert_scan": expert_scan}[impl](experts, t_BTH, experts_BTK, weights_BTK)
