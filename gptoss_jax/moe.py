"""The experts of the MoE block (SPEC 2.4 steps 4-8), from MXFP4-packed or dense bf16 weights.

`moe_impl` picks an algorithm; none ever holds a dequantized copy of a whole layer's experts:
- `gather`: each (token, expert) pair decodes the expert it selected and applies it to its token.
  Best when few tokens run (decode). On CPU, packed experts run it in the C++ kernel
  (`gptoss_jax.native`), which decodes each byte in registers.
- `grouped`: the (token, expert) pairs sorted by expert; each expert is decoded once and applied to
  its own rows only, in row tiles. For prefill and training.
- `pallas`: `grouped`'s algorithm as the grouped MXFP4 kernels of `pallas_kernels` (packed experts
  only; see `kernels.py`).
- `auto`: `gather` for few pairs, `grouped` for many (`_auto`).
`apply` runs the chosen one, expert-parallel when the active mesh splits the experts: a `shard_map`
over the expert axis, with a `psum` for one token per row and an `all_to_all` dispatch otherwise.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax import kernels, native, sharding, stacked
from gptoss_jax.mxfp4 import dequantize

IMPLS = ("auto", "gather", "grouped", "pallas")
EXPERT_FORMATS = ("mxfp4", "bf16")
PACKED_ONLY = ("pallas",)  # kernels that read the packed bytes (GptOss checks the format)


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

    def cotangent(self) -> PackedMatrices:
        """Packed bytes are frozen: no gradient (float0, JAX's tangent type of integers)."""
        return jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), self)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseMatrices:
    """Dense expert matrices `[E, out, in]`, the packed ones' orientation (the converter transposes
    Hugging Face's `[E, in, out]` fine-tunes)."""

    weight: jax.Array

    def take(self, index) -> DenseMatrices:
        return DenseMatrices(self.weight[index])

    def weights(self, dtype) -> jax.Array:
        return self.weight.astype(dtype)

    def cotangent(self, d_weights: jax.Array) -> DenseMatrices:
        return DenseMatrices(d_weights.astype(self.weight.dtype))


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
    mlp1_lora: LowRank | None = None  # adapters, added to mlp1's output before the SwiGLU
    mlp2_lora: LowRank | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRank:
    """Per-expert LoRA of one matrix: `scale · B[e] (A[e] x)`, A `[E, r, in]`, B `[E, out, r]`."""

    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True))

    def take(self, index) -> LowRank:
        return LowRank(self.a[index], self.b[index], self.scale)

    def pairs(self, x_C: jax.Array) -> jax.Array:
        """Updates of taken adapters (A `[..., r, C]`) for inputs `[..., C]` broadcast against them."""
        z = jnp.einsum("...c,...rc->...r", x_C, self.a.astype(x_C.dtype))
        return self.scale * jnp.einsum("...r,...or->...o", z, self.b.astype(x_C.dtype))

    def columns(self, x_CR: jax.Array) -> jax.Array:
        """One expert's update (A `[r, C]`, B `[O, r]`) for a features-first tile `[C, rows]`."""
        return self.scale * (self.b.astype(x_CR.dtype) @ (self.a.astype(x_CR.dtype) @ x_CR))


def _plus(y: jax.Array, lora: LowRank | None, delta) -> jax.Array:
    return y if lora is None else y + delta(lora).astype(y.dtype)


def clamped_swiglu(u_F: jax.Array, alpha: float, limit: float, axis: int = -1) -> jax.Array:
    """gpt-oss's SwiGLU on interleaved features along `axis`: even = gate (clamped above), odd = linear (clamped, +1)."""
    gate, linear = (jax.lax.slice_in_dim(u_F, start, None, 2, axis) for start in (0, 1))
    gate = jnp.minimum(gate, limit)
    linear = jnp.clip(linear, -limit, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (linear + 1)


def sort_by_expert(expert_P: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """The routing sort: pair order grouping pairs by expert (stable), and each expert's pair count.

    Ids outside [0, num_experts) sort last and count for no expert (how callers drop pairs).
    """
    return jnp.argsort(expert_P, stable=True), jnp.bincount(expert_P, length=num_experts).astype(jnp.int32)


def gather(experts: Experts, t_BTH: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array) -> jax.Array:
    """Decodes the K selected experts of every token and applies them to that token alone."""
    if isinstance(experts.mlp1, PackedMatrices) and kernels.cpu_kernels():
        return kernels.with_reference_vjp(_gather_by_cpu_kernel, _gather)(experts, t_BTH, experts_BTK, weights_BTK)
    return _gather(experts, t_BTH, experts_BTK, weights_BTK)


def _gather(experts: Experts, t_BTH: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array) -> jax.Array:
    dtype, experts = t_BTH.dtype, stacked.resolve(experts)
    w1_BTKFH = experts.mlp1.take(experts_BTK).weights(dtype)
    u_BTKF = jnp.einsum("bth,btkfh->btkf", t_BTH, w1_BTKFH) + experts.mlp1_bias[experts_BTK]
    u_BTKF = _plus(u_BTKF, experts.mlp1_lora, lambda lora: lora.take(experts_BTK).pairs(t_BTH[:, :, None]))
    act_BTKI = clamped_swiglu(u_BTKF, experts.alpha, experts.limit)
    w2_BTKHI = experts.mlp2.take(experts_BTK).weights(dtype)
    y_BTKH = jnp.einsum("btki,btkhi->btkh", act_BTKI, w2_BTKHI) + experts.mlp2_bias[experts_BTK]
    y_BTKH = _plus(y_BTKH, experts.mlp2_lora, lambda lora: lora.take(experts_BTK).pairs(act_BTKI))
    return jnp.einsum("btkh,btk->bth", y_BTKH, weights_BTK.astype(dtype))


def _gather_by_cpu_kernel(experts: Experts, t_BTH: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array) -> jax.Array:
    """`_gather` with each pair's two products in the C++ kernel, on the selected experts' packed bytes
    (50 MB per gpt-oss-20b token and layer, of 400 MB of experts), read in the layer stacks when the
    matrices are `stacked.LayerOf`. Pairs of weight 0 (another expert shard's)
    are computed and then zeroed, not skipped."""
    dtype, (B, T, H), K = t_BTH.dtype, t_BTH.shape, experts_BTK.shape[-1]
    expert_P, weight_P = experts_BTK.reshape(-1), weights_BTK.reshape(-1)
    t_PH = jnp.repeat(t_BTH.reshape(B * T, H), K, axis=0)

    def matvec(x_PC: jax.Array, matrices: PackedMatrices) -> jax.Array:
        if isinstance(matrices.blocks, stacked.LayerOf):
            (blocks, layer), (scales, _) = stacked.parts(matrices.blocks), stacked.parts(matrices.scales)
            return native.mxfp4_matvec(x_PC, blocks, scales, expert_P, layer).astype(dtype)
        # A layer's experts handed over as an array may be a slice XLA copies whole for the call (400 MB
        # per gpt-oss-20b layer): the selected experts are gathered first (50 MB), as a stack of one layer.
        chosen = matrices.take(expert_P)
        pairs = jnp.arange(expert_P.shape[0], dtype=jnp.int32)
        return native.mxfp4_matvec(x_PC, chosen.blocks[None], chosen.scales[None], pairs).astype(dtype)

    u_PF = matvec(t_PH, experts.mlp1) + experts.mlp1_bias[expert_P]
    u_PF = _plus(u_PF, experts.mlp1_lora, lambda lora: lora.take(expert_P).pairs(t_PH))
    act_PI = clamped_swiglu(u_PF, experts.alpha, experts.limit)
    y_PH = matvec(act_PI, experts.mlp2) + experts.mlp2_bias[expert_P]
    y_PH = _plus(y_PH, experts.mlp2_lora, lambda lora: lora.take(expert_P).pairs(act_PI))
    y_PH = jnp.where(weight_P[:, None] != 0, y_PH, 0)  # pairs of weight 0 may hold anything
    return jnp.einsum("btkh,btk->bth", y_PH.reshape(B, T, K, H), weights_BTK.astype(dtype))


def grouped(
    experts: Experts, t_BTH: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array, rows_per_tile: int | None = None
) -> jax.Array:
    """Sorts the (token, expert) copies by expert, then a scan over experts decodes each one once and
    applies it to its own rows only, `rows_per_tile` at a time (a loop with a per-expert trip count).

    Copies with routing weight 0 are dropped rather than multiplied by 0 (same result for finite
    outputs); the expert-parallel dispatch sends its padding that way. On a CPU with AMX, packed
    experts and bfloat16 tokens run the C++ grouped GEMM instead (`kernels.gemms_on_amx`).
    """
    reference = functools.partial(_grouped, rows_per_tile=rows_per_tile)
    if isinstance(experts.mlp1, PackedMatrices) and kernels.gemms_on_amx(t_BTH):
        return kernels.with_reference_vjp(_grouped_by_cpu_kernel, reference)(experts, t_BTH, experts_BTK, weights_BTK)
    return reference(experts, t_BTH, experts_BTK, weights_BTK)


def _sorted_by_expert(experts_BTK: jax.Array, weights_BTK: jax.Array, num_experts: int) -> tuple[jax.Array, ...]:
    """The (token, expert) copies' expert ids (dropped copies, of routing weight 0, get id E, so they sort
    last and belong to no expert's range), their order sorted by expert, and each expert's count."""
    expert_P = jnp.where(weights_BTK.reshape(-1) != 0, experts_BTK.reshape(-1), num_experts)
    return expert_P, *sort_by_expert(expert_P, num_experts)


def _grouped(
    experts: Experts, t_BTH: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array, rows_per_tile: int | None
) -> jax.Array:
    dtype, (B, T, H), K = t_BTH.dtype, t_BTH.shape, experts_BTK.shape[-1]
    num_experts, pairs = experts.mlp1_bias.shape[0], B * T * K
    tile = rows_per_tile or _rows_per_tile(pairs, num_experts)
    _, order_P, counts_E = _sorted_by_expert(experts_BTK, weights_BTK, num_experts)
    # Sorted rows, features first (see `_expert_rows`), plus one tile of padding so every tile read stays in bounds.
    x_HP = jnp.concatenate([t_BTH.reshape(B * T, H)[order_P // K], jnp.zeros((tile, H), dtype)]).T
    y_PH = _sorted_rows(tile, experts, x_HP, jnp.cumsum(counts_E), counts_E).T[:pairs]
    y_BTKH = jnp.zeros_like(y_PH).at[order_P].set(y_PH).reshape(B, T, K, H)
    return jnp.einsum("btkh,btk->bth", y_BTKH, weights_BTK.astype(dtype))


def _grouped_by_cpu_kernel(experts: Experts, t_BTH: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array) -> jax.Array:
    """`grouped`'s math with each expert's two products in the C++ grouped GEMM, on the packed bytes
    (read in the layer stacks when the matrices are `stacked.LayerOf`)."""
    dtype, (B, T, H), K = t_BTH.dtype, t_BTH.shape, experts_BTK.shape[-1]
    num_experts = experts.mlp1_bias.shape[0]
    expert_P, order_P, counts_E = _sorted_by_expert(experts_BTK, weights_BTK, num_experts)
    kept_P = expert_P[order_P] < num_experts
    owner_P = jnp.minimum(expert_P[order_P], num_experts - 1)  # dropped copies: any expert, zeroed below
    x_PH = t_BTH.reshape(B * T, H)[order_P // K]

    def gemm(x_PC: jax.Array, matrices: PackedMatrices) -> jax.Array:
        """AMX multiplies bfloat16: a bfloat16 model's activations are (float32 biases would make the
        SwiGLU's output float32, rounded here)."""
        (blocks, layer), (scales, _) = stacked.parts(matrices.blocks), stacked.parts(matrices.scales)
        return native.mxfp4_grouped_gemm(x_PC.astype(jnp.bfloat16), blocks, scales, counts_E, layer).astype(dtype)

    u_PF = gemm(x_PH, experts.mlp1) + experts.mlp1_bias[owner_P]
    u_PF = _plus(u_PF, experts.mlp1_lora, lambda lora: lora.take(owner_P).pairs(x_PH))
    act_PI = clamped_swiglu(u_PF, experts.alpha, experts.limit)
    y_PH = gemm(act_PI, experts.mlp2) + experts.mlp2_bias[owner_P]
    y_PH = _plus(y_PH, experts.mlp2_lora, lambda lora: lora.take(owner_P).pairs(act_PI))
    y_PH = jnp.where(kept_P[:, None], y_PH, 0)
    y_BTKH = jnp.zeros_like(y_PH).at[order_P].set(y_PH).reshape(B, T, K, H)
    return jnp.einsum("btkh,btk->bth", y_BTKH, weights_BTK.astype(dtype))


def _rows_per_tile(pairs: int, num_experts: int) -> int:
    """1.25x the mean rows per expert, rounded up to 16 (16..1024): most experts take one tile, little of it padding.

    On XLA:CPU a tile costs about as much as 40 more rows (the weights are streamed once per tile),
    and per-row cost stops falling past 64 rows, so few, well-filled tiles are cheapest.
    """
    rows = -(-5 * pairs // (4 * num_experts))
    return min(1024, 16 * -(-rows // 16))


def _tiles(tile: int, end: jax.Array, count: jax.Array, each_tile, carry):
    """`carry = each_tile(first_row, mine_R, carry)` for the row tiles of one expert's [end - count, end)."""

    def one_tile(i, carry):
        first = end - count + i * tile
        return each_tile(first, first + jnp.arange(tile) < end, carry)  # a tile's last rows may be the next expert's

    return jax.lax.fori_loop(0, -(-count // tile), one_tile, carry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sorted_rows(tile: int, experts: Experts, x_HP: jax.Array, ends_E: jax.Array, counts_E: jax.Array) -> jax.Array:
    """Each expert applied to its own run of the expert-sorted rows `x_HP` (columns `[end - count, end)`).

    A custom VJP because the tile loop's trip count depends on the routing, which reverse mode cannot
    differentiate; the backward is the same loop over the same tiles, through each tile's VJP.
    """

    def one_expert(y_HP, xs):
        expert, end, count = xs
        w1, w2, trained = _decoded(_expert(experts, expert), x_HP.dtype)  # once per expert, shared by its tiles

        def each_tile(first, mine_R, y_HP):
            out_HR = _expert_rows(experts, w1, w2, *trained, jax.lax.dynamic_slice_in_dim(x_HP, first, tile, 1))
            kept_HR = jax.lax.dynamic_slice_in_dim(y_HP, first, tile, 1)
            return jax.lax.dynamic_update_slice_in_dim(y_HP, jnp.where(mine_R, out_HR, kept_HR), first, 1)

        return _tiles(tile, end, count, each_tile, y_HP), None

    y_HP, _ = jax.lax.scan(one_expert, jnp.zeros_like(x_HP), (jnp.arange(ends_E.shape[0]), ends_E, counts_E))
    return y_HP


def _sorted_rows_forward(tile, experts, x_HP, ends_E, counts_E):
    return _sorted_rows(tile, experts, x_HP, ends_E, counts_E), (experts, x_HP, ends_E, counts_E)


def _sorted_rows_backward(tile, residuals, dy_HP):
    """Per expert and tile: the VJP of `_expert_rows` at the tile's rows, with other experts' rows
    zeroed (their cotangents, and the rows too: 0 * inf in a weight gradient would be NaN). Only dense
    weights are differentiated; packed ones are frozen constants of each tile's VJP."""
    experts, x_HP, ends_E, counts_E = residuals
    dense = isinstance(experts.mlp1, DenseMatrices)

    def one_expert(dx_HP, xs):
        expert, end, count = xs
        w1, w2, trained = _decoded(_expert(experts, expert), x_HP.dtype)
        trained = (*trained, w1, w2) if dense else trained

        def rows_out(rows_HR, trained):
            *trained, w1_, w2_ = trained if dense else (*trained, w1, w2)
            return _expert_rows(experts, w1_, w2_, *trained, rows_HR)

        def each_tile(first, mine_R, carry):
            dx_HP, grads = carry
            rows_HR = jnp.where(mine_R, jax.lax.dynamic_slice_in_dim(x_HP, first, tile, 1), 0)
            dy_HR = jnp.where(mine_R, jax.lax.dynamic_slice_in_dim(dy_HP, first, tile, 1), 0)
            d_rows_HR, d_trained = jax.vjp(rows_out, rows_HR, trained)[1](dy_HR)
            d_rows_HR += jax.lax.dynamic_slice_in_dim(dx_HP, first, tile, 1)
            return jax.lax.dynamic_update_slice_in_dim(dx_HP, d_rows_HR, first, 1), jax.tree.map(jnp.add, grads, d_trained)

        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), trained)
        return _tiles(tile, end, count, each_tile, (dx_HP, zeros))

    dx_HP, grads_E = jax.lax.scan(one_expert, jnp.zeros_like(x_HP), (jnp.arange(ends_E.shape[0]), ends_E, counts_E))
    db1, db2, d_lora1, d_lora2, *dw = grads_E
    like = lambda grad, param: None if param is None else jax.tree.map(lambda g, p: g.astype(p.dtype), grad, param)  # noqa: E731
    d_experts = Experts(
        experts.mlp1.cotangent(*dw[:1]), like(db1, experts.mlp1_bias), experts.mlp2.cotangent(*dw[1:]),
        like(db2, experts.mlp2_bias), alpha=experts.alpha, limit=experts.limit,
        mlp1_lora=like(d_lora1, experts.mlp1_lora), mlp2_lora=like(d_lora2, experts.mlp2_lora),
    )
    return d_experts, dx_HP, None, None


_sorted_rows.defvjp(_sorted_rows_forward, _sorted_rows_backward)


def _expert(experts: Experts, expert: jax.Array) -> tuple:
    """Expert `expert`'s matrices, biases and adapters; a `stacked.LayerOf` stack is sliced at (layer,
    expert) alone, never copying out the whole layer (380 MB of packed gpt-oss-20b experts)."""
    per_expert = experts.mlp1, experts.mlp2, experts.mlp1_bias, experts.mlp2_bias, experts.mlp1_lora, experts.mlp2_lora
    return jax.tree.map(lambda a: a[expert], per_expert, is_leaf=lambda a: isinstance(a, stacked.LayerOf))


def _decoded(per_expert: tuple, dtype) -> tuple[jax.Array, jax.Array, tuple]:
    """One expert's matrices decoded to `dtype`, and its always-trainable rest (biases, adapters)."""
    mlp1, mlp2, *trained = per_expert
    return mlp1.weights(dtype), mlp2.weights(dtype), tuple(trained)


def _expert_rows(experts: Experts, w1_FH, w2_HI, b1_F, b2_H, lora1, lora2, rows_HR: jax.Array) -> jax.Array:
    """One expert on a tile of rows, features first: the decoded weights are [out, in], and XLA:CPU's
    fast bf16 GEMM wants its right operand [contracted, kept] in memory (any other layout is upcast to
    float32 and runs 2-5x slower), so the tile is [H, rows] and the weights multiply from the left."""
    u_FR = _plus(w1_FH @ rows_HR + b1_F[:, None], lora1, lambda lora: lora.columns(rows_HR))
    act_IR = clamped_swiglu(u_FR, experts.alpha, experts.limit, axis=0)  # on rows: a transposed act makes XLA:CPU upcast w2
    return _plus(w2_HI @ act_IR + b2_H[:, None], lora2, lambda lora: lora.columns(act_IR))


def pallas(experts: Experts, t_BTH: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array) -> jax.Array:
    """`grouped`'s algorithm by the grouped MXFP4 kernels (`kernels.experts`), backward included (the
    packed weights frozen; gradients to the tokens, routing weights and biases)."""
    order_P, counts_E = sort_by_expert(experts_BTK.reshape(-1), experts.mlp1_bias.shape[0])
    return kernels.experts(experts, t_BTH, weights_BTK, order_P, counts_E)


ALGORITHMS = {"gather": gather, "grouped": grouped, "pallas": pallas}


def apply(impl: str, experts: Experts, t_BTH: jax.Array, experts_BTK: jax.Array, weights_BTK: jax.Array) -> jax.Array:
    """Σ_k w_k · (W2[e_k] · swiglu(W1[e_k] · t + b1[e_k]) + b2[e_k]) by `impl`, expert-parallel when
    the active mesh splits the experts.

    Each expert shard holds E / n experts. One token per row (decode): every shard runs its local
    experts on the tokens that chose them and the outputs are summed (`psum`). Longer inputs
    (prefill, training): the tokens are split across the expert shards, each token copy is sent to
    the shard owning its expert and back (`all_to_all`), with room for every copy (dropless).
    """
    axis = sharding.split_axis("experts")
    if axis is None:
        return _apply_here(impl, experts, t_BTH, experts_BTK, weights_BTK)
    experts = stacked.resolve(experts)
    routed = sharding.spec(("batch", None, None))
    body = _local_then_sum if t_BTH.shape[1] == 1 else _dispatch
    run = jax.shard_map(
        functools.partial(body, impl, axis),
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=(jax.tree.map(lambda _: sharding.spec(("experts",)), experts), routed, routed, routed),
        out_specs=routed,
        check_vma=False,
    )
    return run(experts, t_BTH, experts_BTK, weights_BTK)


def _apply_here(impl: str, experts: Experts, t_BTH, experts_BTK, weights_BTK) -> jax.Array:
    """Runs `impl` here. `gather` and `grouped` take experts as `stacked.LayerOf` (the CPU kernel reads
    them in place, `grouped` slices one expert at a time); `pallas` is handed the layer."""
    algorithm = _auto(experts, experts_BTK.size) if impl == "auto" else impl
    if algorithm == "pallas":
        experts = stacked.resolve(experts)
    return ALGORITHMS[algorithm](experts, t_BTH, experts_BTK, weights_BTK)


def _auto(experts: Experts, pairs: int) -> str:
    """`gather` reads one expert per (token, expert) pair, `grouped` decodes every expert once:
    `gather` wins below about E pairs, and below 4E with the C++ kernel on CPU (measured at
    gpt-oss-20b shapes: a pair costs ~6 ms there, an expert decoded for `grouped` ~35 ms)."""
    num_experts = experts.mlp1_bias.shape[0]
    by_cpu_kernel = isinstance(experts.mlp1, PackedMatrices) and kernels.cpu_kernels()
    return "gather" if pairs <= (4 if by_cpu_kernel else 1) * num_experts else "grouped"


def _local_ids(experts: Experts, axis: str, experts_BTK, weights_BTK):
    """Global expert ids -> ids among this shard's experts; weight 0 where another shard owns the expert."""
    local_count = experts.mlp1_bias.shape[0]
    local = experts_BTK - jax.lax.axis_index(axis) * local_count
    mine = (local >= 0) & (local < local_count)
    return jnp.where(mine, local, 0), jnp.where(mine, weights_BTK, 0)


def _local_then_sum(impl, axis, experts, t_BTH, experts_BTK, weights_BTK):
    local, weights = _local_ids(experts, axis, experts_BTK, weights_BTK)
    return jax.lax.psum(_apply_here(impl, experts, t_BTH, local, weights), axis)


def _dispatch(impl, axis, experts, t_BTH, experts_BTK, weights_BTK):
    """All-to-all expert parallelism for one (data, expert) shard; see `apply`."""
    n, me = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
    local_count = experts.mlp1_bias.shape[0]
    B, T, H = t_BTH.shape
    K = experts_BTK.shape[-1]
    per_shard = -(-B * T // n)  # tokens this shard dispatches (the batch rows are split n ways)
    pad = per_shard * n - B * T

    def mine(x, fill):  # this shard's slice of the flattened (padded) tokens
        x = jnp.concatenate([x.reshape(B * T, *x.shape[2:]), jnp.full((pad, *x.shape[2:]), fill, x.dtype)])
        return jax.lax.dynamic_slice_in_dim(x, me * per_shard, per_shard)

    x_MH, ids_MK, w_MK = mine(t_BTH, 0), mine(experts_BTK, 0), mine(weights_BTK, 0)
    pairs = per_shard * K  # capacity per destination: every token copy could go to one shard
    owner = (ids_MK // local_count).reshape(pairs)
    order, per_owner = sort_by_expert(owner, n)
    slot = jnp.zeros(pairs, jnp.int32).at[order].set(jnp.arange(pairs) - (jnp.cumsum(per_owner) - per_owner)[owner[order]])
    token = jnp.arange(pairs) // K
    send_x = jnp.zeros((n, pairs, H), x_MH.dtype).at[owner, slot].set(x_MH[token])
    send_id = jnp.full((n, pairs), -1, jnp.int32).at[owner, slot].set((ids_MK % local_count).reshape(pairs))
    recv_x = jax.lax.all_to_all(send_x, axis, 0, 0)
    recv_id = jax.lax.all_to_all(send_id, axis, 0, 0).reshape(1, n * pairs, 1)
    valid = recv_id >= 0
    y = _apply_here(impl, experts, recv_x.reshape(1, n * pairs, H), jnp.where(valid, recv_id, 0), valid.astype(x_MH.dtype))
    back = jax.lax.all_to_all(y.reshape(n, pairs, H), axis, 0, 0)
    y_MKH = back[owner, slot].reshape(per_shard, K, H)
    out_MH = jnp.einsum("mkh,mk->mh", y_MKH, w_MK.astype(y_MKH.dtype))
    every = jax.lax.all_gather(out_MH, axis, tiled=True)[: B * T]
    return every.reshape(B, T, H)
