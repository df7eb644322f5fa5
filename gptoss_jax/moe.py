"""The experts of the MoE block (SPEC 2.4 steps 4-8), from MXFP4-packed or dense bf16 weights.

Two implementations with the same math, neither of which ever holds a dequantized copy of a whole
layer's experts:
- `gather`: each token decodes only the K experts it selected. Best when few tokens run (decode).
- `matvec`: the same selection as a loop of float32 matrix-vector products that decode with the
  output axis innermost; on XLA:CPU 11x faster than `gather` for decode (gather's batched dot and
  row-wise decode run far below memory bandwidth there).
- `expert_scan`: a scan over experts; each step decodes one expert and applies it to every token,
  weighting by the routing weight (0 for tokens that did not pick it). E/K times the needed FLOPs.
- `grouped`: the (token, expert) copies sorted by expert; each expert is decoded once and applied
  only to the rows routed to it, in row tiles. For prefill.
- `native`: `matvec`'s math with the products in a C++ kernel (`gptoss_jax.native`, packed experts,
  CPU only) that decodes each packed byte in registers: ~10x faster than `matvec`.
- `pallas`: the grouped MXFP4 kernels of `pallas_kernels` (packed experts only; see `kernels.py`).
`auto` picks a per-pair path (`gather`; on CPU `native` if it compiled, else `matvec`) for few tokens,
`grouped` for many (`_auto`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gptoss_jax import kernels, native
from gptoss_jax.mxfp4 import decode_bits, scale_to_float32

IMPLS = ("auto", "gather", "matvec", "native", "expert_scan", "grouped", "pallas")
EXPERT_FORMATS = ("mxfp4", "bf16")
PACKED_ONLY = ("native", "pallas")  # kernels that read the packed bytes (GptOss checks the format)


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
        return decode_bits(self.blocks, self.scales, dtype)

    def matvec(self, expert: jax.Array, x_C: jax.Array) -> jax.Array:
        """`W[expert] @ x` in float32: a loop over the in/32 blocks, each decoded with the output axis
        innermost (a transposed copy of one expert), so XLA:CPU vectorizes over outputs; 11x faster
        there than decoding [out, in] rows and reducing along them."""
        blocks_GJO = jnp.transpose(self.blocks[expert], (1, 2, 0))  # J: the 16 bytes of a block
        scales_GO = scale_to_float32(self.scales[expert]).T
        x_GJ2 = x_C.astype(jnp.float32).reshape(*blocks_GJO.shape[:2], 2)  # low nibble first

        def one_block(g, y_O):
            b_JO, x_J2 = blocks_GJO[g], x_GJ2[g]
            pairs_O = (_fp4_over_2_14(b_JO & 0x0F) * x_J2[:, :1] + _fp4_over_2_14(b_JO >> 4) * x_J2[:, 1:]).sum(0)
            return y_O + pairs_O * scales_GO[g]

        y_O = jax.lax.fori_loop(0, blocks_GJO.shape[0], one_block, jnp.zeros(blocks_GJO.shape[-1], jnp.float32), unroll=4)
        return y_O * 2.0**14


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

    def matvec(self, expert: jax.Array, x_C: jax.Array) -> jax.Array:
        """`W[expert] @ x` in float32, reducing over the stored [in, out]'s major axis (vectorized over outputs)."""
        return (self.weight[expert].astype(jnp.float32) * x_C.astype(jnp.float32)[:, None]).sum(0)


Matrices = PackedMatrices | DenseMatrices


def _fp4_over_2_14(codes: jax.Array) -> jax.Array:
    """E2M1 codes (uint8, 0..15) -> their values / 2^14 in float32, exactly, without a gather or select:
    sign, exponent and mantissa bits moved into a float16's are that float16 (code 1 = 0.5 lands on
    its subnormal 2^-15, which the conversion keeps)."""
    codes = codes.astype(jnp.uint16)
    half = jax.lax.bitcast_convert_type(((codes & 8) << 12) | ((codes & 7) << 9), jnp.float16)
    return half.astype(jnp.float32)


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


def matvec(experts: Experts, t_BTH: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array) -> jax.Array:
    """A loop over the selected (token, expert) pairs, each two float32 matrix-vector products (`matvec`
    of the matrices); pairs with routing weight 0 (another shard's experts) are skipped."""
    dtype, (B, T, H), K = t_BTH.dtype, t_BTH.shape, experts_BTK.shape[-1]
    expert_P, weight_P = experts_BTK.reshape(-1), weights_BTK.reshape(-1)
    t_PH = jnp.repeat(t_BTH.reshape(B * T, H), K, axis=0)

    def one_pair(e, t_H):
        u_F = experts.mlp1.matvec(e, t_H).astype(dtype) + experts.mlp1_bias[e]
        act_I = clamped_swiglu(u_F, experts.alpha, experts.limit)
        return experts.mlp2.matvec(e, act_I).astype(dtype) + experts.mlp2_bias[e]

    def pair(p, y_PH):
        y_H = jax.lax.cond(weight_P[p] != 0, one_pair, lambda e, t: jnp.zeros_like(t), expert_P[p], t_PH[p])
        return y_PH.at[p].set(y_H)

    y_PH = jax.lax.fori_loop(0, expert_P.size, pair, jnp.zeros_like(t_PH))
    return jnp.einsum("btkh,btk->bth", y_PH.reshape(B, T, K, H), weights_BTK.astype(dtype))


def native_matvec(experts: Experts, t_BTH: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array) -> jax.Array:
    """`matvec`'s products for all (token, expert) pairs in two calls of the C++ kernel, on the selected
    experts' packed bytes (gathered by XLA: 50 MB per gpt-oss-20b token and layer, of 400 MB of experts).
    Pairs of weight 0 are computed and then zeroed, not skipped."""
    dtype, (B, T, H), K = t_BTH.dtype, t_BTH.shape, experts_BTK.shape[-1]
    expert_P, weight_P = experts_BTK.reshape(-1), weights_BTK.reshape(-1)
    t_PH = jnp.repeat(t_BTH.reshape(B * T, H), K, axis=0)
    mlp1, mlp2 = experts.mlp1.take(expert_P), experts.mlp2.take(expert_P)
    u_PF = native.mxfp4_matvec(t_PH, mlp1.blocks, mlp1.scales).astype(dtype) + experts.mlp1_bias[expert_P]
    act_PI = clamped_swiglu(u_PF, experts.alpha, experts.limit)
    y_PH = native.mxfp4_matvec(act_PI, mlp2.blocks, mlp2.scales).astype(dtype) + experts.mlp2_bias[expert_P]
    y_PH = jnp.where(weight_P[:, None] != 0, y_PH, 0)  # pairs of weight 0 (padding) may hold anything
    return jnp.einsum("btkh,btk->bth", y_PH.reshape(B, T, K, H), weights_BTK.astype(dtype))


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


def grouped(
    experts: Experts, t_BTH: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array, rows_per_tile: int | None = None
) -> jax.Array:
    """Sorts the (token, expert) copies by expert, then a scan over experts decodes each one once and
    applies it to its own rows only, `rows_per_tile` at a time (a loop with a per-expert trip count).

    Copies with routing weight 0 are dropped rather than multiplied by 0 (same result for finite
    outputs); the expert-parallel dispatch sends its padding that way.
    """
    dtype, (B, T, H), K = t_BTH.dtype, t_BTH.shape, experts_BTK.shape[-1]
    num_experts, pairs = experts.mlp1_bias.shape[0], B * T * K
    tile = rows_per_tile or _rows_per_tile(pairs, num_experts)
    # Dropped copies get expert id E, so they sort last and belong to no expert's range.
    expert_P = jnp.where(weights_BTK.reshape(pairs) != 0, experts_BTK.reshape(pairs), num_experts)
    order_P = jnp.argsort(expert_P, stable=True)
    counts_E = jnp.bincount(expert_P, length=num_experts)
    ends_E = jnp.cumsum(counts_E)
    # Sorted rows, plus one tile of padding so every tile read stays in bounds.
    x_PH = jnp.concatenate([t_BTH.reshape(B * T, H)[order_P // K], jnp.zeros((tile, H), dtype)])
    features_first = isinstance(experts.mlp1, PackedMatrices)
    rows_axis = 1 if features_first else 0
    x = x_PH.T if features_first else x_PH

    def one_expert(y, xs):
        mlp1, bias1, mlp2, bias2, end, count = xs
        w1, w2 = mlp1.weights(dtype), mlp2.weights(dtype)  # decoded once, used by every tile
        start = end - count

        def one_tile(i, y):
            first = start + i * tile
            rows = jax.lax.dynamic_slice_in_dim(x, first, tile, rows_axis)
            out = _expert_rows(experts, w1, bias1, w2, bias2, rows, features_first)
            mine_R = first + jnp.arange(tile) < end  # the tile's last rows may belong to the next expert
            mine = mine_R[None, :] if features_first else mine_R[:, None]
            kept = jax.lax.dynamic_slice_in_dim(y, first, tile, rows_axis)
            return jax.lax.dynamic_update_slice_in_dim(y, jnp.where(mine, out, kept), first, rows_axis)

        return jax.lax.fori_loop(0, -(-count // tile), one_tile, y), None

    per_expert = (experts.mlp1, experts.mlp1_bias, experts.mlp2, experts.mlp2_bias, ends_E, counts_E)
    y, _ = jax.lax.scan(one_expert, jnp.zeros_like(x), per_expert)
    y_PH = (y.T if features_first else y)[:pairs]
    y_BTKH = jnp.zeros_like(y_PH).at[order_P].set(y_PH).reshape(B, T, K, H)
    return jnp.einsum("btkh,btk->bth", y_BTKH, weights_BTK.astype(dtype))


def _rows_per_tile(pairs: int, num_experts: int) -> int:
    """1.25x the mean rows per expert, rounded up to 16 (16..1024): most experts take one tile, little of it padding.

    On XLA:CPU a tile costs about as much as 40 more rows (the weights are streamed once per tile),
    and per-row cost stops falling past 64 rows, so few, well-filled tiles are cheapest.
    """
    rows = -(-5 * pairs // (4 * num_experts))
    return min(1024, 16 * -(-rows // 16))


def _expert_rows(experts: Experts, w1, bias1, w2, bias2, rows: jax.Array, features_first: bool) -> jax.Array:
    """One expert on a tile of rows, oriented so XLA:CPU's fast bf16 GEMM sees its right operand as
    [contracted, kept] in memory (any other layout is upcast to float32 and runs 2-5x slower).

    Decoded MXFP4 weights are [out, in], so the tile is [H, rows] and the weights multiply from the
    left; dense weights are stored [in, out] (behind `weights()`' transpose), so rows multiply them.
    """
    if features_first:
        u_FR = w1 @ rows + bias1[:, None]
        act_RI = clamped_swiglu(u_FR.T, experts.alpha, experts.limit)
        return w2 @ act_RI.T + bias2[:, None]
    u_RF = rows @ w1.T + bias1
    act_RI = clamped_swiglu(u_RF, experts.alpha, experts.limit)
    return act_RI @ w2.T + bias2


def apply_experts(
    impl: str, experts: Experts, t_BTH: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array
) -> jax.Array:
    """Σ_k w_k · (W2[e_k] · swiglu(W1[e_k] · t + b1[e_k]) + b2[e_k]) with the chosen implementation."""
    if impl == "auto":
        impl = _auto(experts, experts_BTK.size)
    impls = {
        "gather": gather, "matvec": matvec, "native": native_matvec, "expert_scan": expert_scan, "grouped": grouped,
        "pallas": kernels.experts,
    }
    return impls[impl](experts, t_BTH, experts_BTK, weights_BTK)


def _auto(experts: Experts, pairs: int) -> str:
    """Per-pair paths read one expert per (token, expert) pair, `grouped` decodes every expert once:
    per-pair wins below about E pairs, and below 4E with the native kernel on CPU (measured at
    gpt-oss-20b shapes: a pair costs ~6 ms there, an expert decoded for `grouped` ~35 ms)."""
    num_experts = experts.mlp1_bias.shape[0]
    if jax.default_backend() != "cpu":
        return "gather" if pairs < num_experts else "grouped"
    if isinstance(experts.mlp1, PackedMatrices) and native.available():
        return "native" if pairs <= 4 * num_experts else "grouped"
    return "matvec" if pairs < num_experts else "grouped"
