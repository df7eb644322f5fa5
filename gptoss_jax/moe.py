"""The experts of the MoE block (SPEC 2.4 steps 4-8), from MXFP4-packed or dense bf16 weights.

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
EXPERT_FORMATS = ("mxfp4", "bf16")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedMatrices:
    """MXFP4 expert matrices `[E, out, in]` as stored: blocks `[E, out, in/32, 16]`, scales `[E, out, in/32]`."""

    blocks: jax.Array
    scales: jax.Array

    def take(self, index) -> PackedMatrices:
        return PackedMatrices(self.blocks[index], self.scales[index])

    def weights(self, dtype) -> jax.Array:
        """`[..., out, in]` decoded."""
        return dequantize(self.blocks, self.scales, dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseMatrices:
    """Dense expert matrices in Hugging Face's `[E, in, out]` orientation (fine-tuned checkpoints)."""

    weight: jax.Array

    def take(self, index) -> DenseMatrices:
        return DenseMatrices(self.weight[index])

    def weights(self, dtype) -> jax.Array:
        """`[..., out, in]`; XLA folds the transpose into the matmul."""
        return jnp.swapaxes(self.weight, -1, -2).astype(dtype)


Matrices = PackedMatrices | DenseMatrices


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Experts:
    """One layer's experts: mlp1 `[E, F=2I, H]` (gate/linear interleaved) and mlp2 `[E, H, I]`."""

    mlp1: Matrices
    mlp1_bias: jax.Array  # [E, F]
    mlp2: Matrices
    mlp2_bias: jax.Array  # [E, H]
    alpha: float = dataclasses.field(metadata=dict(static=True))
    limit: float = dataclasses.field(metadata=dict(static=True))


def clamped_swiglu(u_F: jax.Array, alpha: float, limit: float) -> jax.Array:
    """gpt-oss's SwiGLU on interleaved columns: even = gate (clamped above), odd = linear (clamped, +1)."""
    gate, linear = u_F[..., 0::2], u_F[..., 1::2]
    gate = jnp.minimum(gate, limit)
    linear = jnp.clip(linear, -limit, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (linear + 1)


def gather(experts: Experts, t_BTH: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array) -> jax.Array:
    """Decodes the K selected experts of every token and applies them to that token alone."""
    dtype = t_BTH.dtype
    w1_BTKFH = experts.mlp1.take(experts_BTK).weights(dtype)
    u_BTKF = jnp.einsum("bth,btkfh->btkf", t_BTH, w1_BTKFH) + experts.mlp1_bias[experts_BTK]
    act_BTKI = clamped_swiglu(u_BTKF, experts.alpha, experts.limit)
    w2_BTKHI = experts.mlp2.take(experts_BTK).weights(dtype)
    y_BTKH = jnp.einsum("btki,btkhi->btkh", act_BTKI, w2_BTKHI) + experts.mlp2_bias[experts_BTK]
    return jnp.einsum("btkh,btk->bth", y_BTKH, weights_BTK.astype(dtype))


def expert_scan(experts: Experts, t_BTH: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array) -> jax.Array:
    """Decodes one expert at a time and applies it to every token, weighted by its routing weight."""
    dtype = t_BTH.dtype
    num_experts = experts.mlp1_bias.shape[0]
    one_hot_BTKE = jax.nn.one_hot(experts_BTK, num_experts, dtype=dtype)
    # [E, B, T]: the routing weight of each expert for each token, 0 where it was not selected.
    combine_EBT = jnp.einsum("btke,btk->ebt", one_hot_BTKE, weights_BTK.astype(dtype))

    def one_expert(acc_BTH, xs):
        mlp1, bias1, mlp2, bias2, combine_BT = xs
        u_BTF = jnp.einsum("bth,fh->btf", t_BTH, mlp1.weights(dtype)) + bias1
        act_BTI = clamped_swiglu(u_BTF, experts.alpha, experts.limit)
        y_BTH = jnp.einsum("bti,hi->bth", act_BTI, mlp2.weights(dtype)) + bias2
        return acc_BTH + y_BTH * combine_BT[..., None], None

    per_expert = (experts.mlp1, experts.mlp1_bias, experts.mlp2, experts.mlp2_bias, combine_EBT)
    out_BTH, _ = jax.lax.scan(one_expert, jnp.zeros_like(t_BTH), per_expert)
    return out_BTH


def apply_experts(
    impl: str, experts: Experts, t_BTH: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array
) -> jax.Array:
    """Σ_k w_k · (W2[e_k] · swiglu(W1[e_k] · t + b1[e_k]) + b2[e_k]) with the chosen implementation."""
    if impl == "auto":
        num_experts = experts.mlp1_bias.shape[0]
        impl = "gather" if experts_BTK.size < num_experts else "expert_scan"
    return {"gather": gather, "expert_scan": expert_scan}[impl](experts, t_BTH, experts_BTK, weights_BTK)
