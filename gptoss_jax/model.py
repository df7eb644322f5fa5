"""gpt-oss in Flax NNX, in the order of SPEC section 2: norm, YaRN rotary, attention, MoE, block, model.

Dimension legend (einsum letters and tensor-name suffixes, in every module of the package):
  B batch          T query positions    S key positions     H hidden
  N kv heads       G q heads per kv     D head dim          E experts
  K experts/token  I expert width       F = 2I (gate/linear interleaved)
  V vocab          M tokens (B*T flat)  P (token, expert) pairs
  R, C rows and columns of a stored [out, in] matrix        J MXFP4 blocks of a row (C/32)

Parameters keep the checkpoints' [out, in] orientation, so conversion copies bytes unchanged; the
experts stay MXFP4-packed and are decoded only where used (see `moe.py`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax import kernels, moe, sharding, stacked
from gptoss_jax.attention import attend_long
from gptoss_jax.kernels import project
from gptoss_jax.config import GptOssConfig
from gptoss_jax.kv_cache import KVCache, LayerCache, WritePlan, query_positions
from gptoss_jax.lora import EXPERT_TARGETS, LoRA, LoraSpec, adapter_for, plus_update
from gptoss_jax.mxfp4 import BLOCK

ATTENTION_IMPLS = ("xla", "pallas")  # reference einsums, or pallas_kernels via `kernels.attend`
# "layer": save only each layer's input; the rest are `jax.checkpoint_policies` that take no arguments.
REMAT_POLICIES = ("none", "layer", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable")


class Packed(nnx.Variable):
    """MXFP4 bytes: stored, sharded and checkpointed like parameters, never differentiated."""


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> jax.Array:
    """N(0, std^2) initial values. Built eagerly they are drawn with numpy (seeded from the nnx key):
    an eager `jax.random` call compiles once per shape, which made building even the tiny preset take 20 s."""
    key = rngs.params()
    if isinstance(key, jax.core.Tracer):
        return (std * jax.random.normal(key, shape)).astype(dtype)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    return jnp.asarray((std * rng.standard_normal(shape, np.float32)).astype(dtype))


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype, std: float) -> nnx.Param:
    """A random normal parameter with its logical axis names (mapped to a mesh by `sharding.py`)."""
    return nnx.Param(_normal(rngs, shape, std, dtype), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """`x * rsqrt(mean(x^2) + eps) * scale`, computed in float32 (the scale is stored as the checkpoint has it)."""

    def __init__(self, config: GptOssConfig, dtype):
        self.eps = config.rms_norm_eps
        self.scale = nnx.Param(jnp.ones((config.hidden_size,), dtype), out_sharding=("embed",), eager_sharding=False)

    def __call__(self, x_BTH: jax.Array) -> jax.Array:
        x = x_BTH.astype(jnp.float32)  # float32 statistics: bf16 squares lose the small components
        normed = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x_BTH.dtype)


def yarn_cut_points(config: GptOssConfig) -> tuple[float, float]:
    """The ramp's ends (8.09 and 17.40 for the published configs): not rounded, since truncate=false.

    Clipped to [0, D - 1] as Hugging Face does; REF does not clip, which differs only when a cut
    falls outside that range (never for the published configs).
    """

    def cut(beta: float) -> float:
        half = config.head_dim // 2
        return half * math.log(config.initial_context_length / (beta * 2 * math.pi)) / math.log(config.rope_theta)

    low, high = max(cut(config.rope_ntk_beta), 0.0), min(cut(config.rope_ntk_alpha), config.head_dim - 1.0)
    return low, high + 0.001 if low == high else high  # as HF: a zero-width ramp would divide by zero


def yarn_inv_freq(config: GptOssConfig) -> tuple[jax.Array, float]:
    """YaRN inverse frequencies [D/2] and the concentration, SPEC 2.2 steps 1-5, in float32."""
    freq = config.rope_theta ** (jnp.arange(0, config.head_dim, 2, dtype=jnp.float32) / config.head_dim)
    concentration = 0.1 * math.log(config.rope_scaling_factor) + 1.0
    low, high = yarn_cut_points(config)
    ramp = jnp.clip((jnp.arange(config.head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # 1: extrapolate (frequency unchanged), 0: interpolate (divided by the factor)
    inv_freq = (1.0 / (config.rope_scaling_factor * freq)) * (1.0 - keep) + (1.0 / freq) * keep
    return inv_freq, concentration


def rotary_tables(config: GptOssConfig, positions_BT: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, D/2], both scaled by the YaRN concentration, cast to the activation dtype."""
    inv_freq, concentration = yarn_inv_freq(config)
    angle = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    return (jnp.cos(angle) * concentration).astype(dtype), (jnp.sin(angle) * concentration).astype(dtype)


def apply_rotary(x: jax.Array, cos_BT: jax.Array, sin_BT: jax.Array) -> jax.Array:
    """Half-split (NeoX) rotation of `x [B, T, heads..., D]`: [a cos - b sin, b cos + a sin]."""
    extra = (None,) * (x.ndim - 3)
    cos, sin = cos_BT[:, :, *extra, :], sin_BT[:, :, *extra, :]
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


class Attention(nnx.Module):
    """Pre-norm GQA attention with sinks and residual: `x + out(attend(rope(q), rope(k), v))`."""

    def __init__(self, config: GptOssConfig, *, sliding: bool, dtype, impl: str, lora: LoraSpec | None, rngs: nnx.Rngs):
        H, Q, N, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.config, self.window, self.impl = config, config.sliding_window if sliding else None, impl
        self.norm = RMSNorm(config, dtype)
        std = H**-0.5
        self.q = _param(rngs, (Q, D, H), ("q_heads", "head_dim", "embed"), dtype, std)
        self.q_bias = _param(rngs, (Q, D), ("q_heads", "head_dim"), dtype, 0.1)
        self.k = _param(rngs, (N, D, H), ("kv_heads", "head_dim", "embed"), dtype, std)
        self.k_bias = _param(rngs, (N, D), ("kv_heads", "head_dim"), dtype, 0.1)
        self.v = _param(rngs, (N, D, H), ("kv_heads", "head_dim", "embed"), dtype, std)
        self.v_bias = _param(rngs, (N, D), ("kv_heads", "head_dim"), dtype, 0.1)
        self.out = _param(rngs, (H, Q, D), ("embed", "q_heads", "head_dim"), dtype, (Q * D) ** -0.5)
        self.out_bias = _param(rngs, (H,), ("embed",), dtype, 0.1)
        self.sinks = _param(rngs, (Q,), ("q_heads",), dtype, 1.0)
        adapter = functools.partial(adapter_for, lora, dtype=dtype, rngs=rngs)  # None unless targeted
        self.q_lora = adapter("q", (H,), (Q, D), ("embed",), ("q_heads", "head_dim"))
        self.k_lora = adapter("k", (H,), (N, D), ("embed",), ("kv_heads", "head_dim"))
        self.v_lora = adapter("v", (H,), (N, D), ("embed",), ("kv_heads", "head_dim"))
        self.out_lora = adapter("out", (Q, D), (H,), ("q_heads", "head_dim"), ("embed",))

    def __call__(
        self, x_BTH: jax.Array, rope: tuple[jax.Array, jax.Array], q_pos_BT: jax.Array,
        plan: WritePlan | None, cache: LayerCache | None,
    ) -> tuple[jax.Array, LayerCache | None]:
        N, G = self.config.num_key_value_heads, self.config.q_per_kv
        t = self.norm(x_BTH)
        # Matrices go to `project` as they are (`get_value`: perhaps a `stacked.LayerOf`, read in place).
        # q head j = n * G + g belongs to kv head n = j // G (REF and HF alike).
        wq_NGDH, bq_NGD = self.q.get_value().reshape(N, G, *self.q.shape[1:]), self.q_bias[...].reshape(N, G, -1)
        q = plus_update(project("bth,ngdh->btngd", t, wq_NGDH) + bq_NGD, self.q_lora, t)
        k = plus_update(project("bth,ndh->btnd", t, self.k.get_value()) + self.k_bias[...], self.k_lora, t)
        v = plus_update(project("bth,ndh->btnd", t, self.v.get_value()) + self.v_bias[...], self.v_lora, t)
        q_BTNGD, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is None:
            keys, values, k_pos = k, v, q_pos_BT
        else:
            keys, values, cache = cache.attend_to(plan, k, v)
            k_pos = plan.key_positions
        sinks_NG = self.sinks[...].reshape(N, G)
        if self.impl == "pallas" and kernels.has_attention_kernel(cached=cache is not None):
            o_BTNGD = kernels.attend(q_BTNGD, keys, values, q_pos_BT, plan, sinks_NG, self.window)
        elif cache is not None and kernels.attends_token_on_cpu(q_BTNGD, keys):
            o_BTNGD = kernels.attend_token(q_BTNGD, keys, values, q_pos_BT, k_pos, sinks_NG, self.window)
        else:
            o_BTNGD = attend_long(q_BTNGD, keys, values, q_pos_BT, k_pos, sinks_NG, self.window, same_positions=cache is None)
        wo_HNGD = self.out.get_value().reshape(self.out.shape[0], N, G, -1)
        out_BTH = project("btngd,hngd->bth", o_BTNGD, wo_HNGD) + self.out_bias[...]
        return x_BTH + plus_update(out_BTH, self.out_lora, o_BTNGD.reshape(*o_BTNGD.shape[:2], N * G, -1)), cache


class MoE(nnx.Module):
    """Pre-norm mixture of experts with residual: route each token to K experts, weight their outputs."""

    def __init__(
        self, config: GptOssConfig, *, dtype, impl: str, expert_format: str, lora: LoraSpec | None, rngs: nnx.Rngs
    ):
        E, H, I = config.num_experts, config.hidden_size, config.intermediate_size
        self.config, self.impl, self.expert_format = config, impl, expert_format
        self.norm = RMSNorm(config, dtype)
        self.router = _param(rngs, (E, H), ("experts", "embed"), dtype, H**-0.5)
        self.router_bias = _param(rngs, (E,), ("experts",), dtype, 0.1)
        if expert_format == "mxfp4":  # [E, out, in], packed
            self.mlp1_blocks, self.mlp1_scales = _packed(rngs, (E, 2 * I, H), ("experts", "mlp", "embed"))
            self.mlp2_blocks, self.mlp2_scales = _packed(rngs, (E, H, I), ("experts", "embed", "mlp"))
        else:  # [E, out, in] too (the converter transposes fine-tunes' [E, in, out])
            self.mlp1_weight = _param(rngs, (E, 2 * I, H), ("experts", "mlp", "embed"), dtype, H**-0.5)
            self.mlp2_weight = _param(rngs, (E, H, I), ("experts", "embed", "mlp"), dtype, I**-0.5)
        self.mlp1_bias = _param(rngs, (E, 2 * I), ("experts", "mlp"), dtype, 0.1)
        self.mlp2_bias = _param(rngs, (E, H), ("experts", "embed"), dtype, 0.1)
        adapter = functools.partial(adapter_for, lora, dtype=dtype, rngs=rngs, experts=E)  # None unless targeted
        self.mlp1_lora = adapter("mlp1", (H,), (2 * I,), ("embed",), ("mlp",))
        self.mlp2_lora = adapter("mlp2", (I,), (H,), ("mlp",), ("embed",))

    def __call__(self, x_BTH: jax.Array) -> jax.Array:
        t = self.norm(x_BTH)
        # Router in float32: top-k on nearly tied bf16 logits would pick experts by rounding noise.
        logits_BTE = jnp.einsum("bth,eh->bte", t, self.router[...], preferred_element_type=jnp.float32)
        logits_BTE += self.router_bias[...].astype(jnp.float32)
        top_logits, experts_BTK = jax.lax.top_k(logits_BTE, self.config.experts_per_token)
        weights_BTK = jax.nn.softmax(top_logits, axis=-1)  # over the K selected logits only
        experts = moe.Experts(
            self._matrices("mlp1"), self.mlp1_bias[...], self._matrices("mlp2"), self.mlp2_bias[...],
            alpha=self.config.swiglu_alpha, limit=self.config.swiglu_limit,
            mlp1_lora=_low_rank(self.mlp1_lora), mlp2_lora=_low_rank(self.mlp2_lora),
        )
        return x_BTH + moe.apply(self.impl, experts, t, experts_BTK, weights_BTK)

    def _matrices(self, name: str) -> moe.Matrices:
        """As stored (`get_value`: perhaps `stacked.LayerOf`s, which `moe` reads in place or slices)."""
        if self.expert_format == "mxfp4":
            return moe.PackedMatrices(getattr(self, f"{name}_blocks").get_value(), getattr(self, f"{name}_scales").get_value())
        return moe.DenseMatrices(getattr(self, f"{name}_weight").get_value())


def _low_rank(adapter: LoRA | None) -> moe.LowRank | None:
    return None if adapter is None else moe.LowRank(adapter.a[...], adapter.b[...], adapter.scale)


def _packed(rngs: nnx.Rngs, shape: tuple[int, int, int], axes: tuple[str, str, str]) -> tuple[Packed, Packed]:
    """Random MXFP4 weights `[E, out, in]`: bytes spread over all codes, scales 2^-10..2^-7."""
    E, R, C = shape
    codes = _normal(rngs, (E, R, C // BLOCK, BLOCK // 2), 1.0, jnp.float32)  # any spread of bytes will do
    blocks = (jax.nn.sigmoid(codes) * 255.99).astype(jnp.uint8)
    scales = (117 + jax.nn.sigmoid(_normal(rngs, (E, R, C // BLOCK), 1.0, jnp.float32)) * 3.99).astype(jnp.uint8)
    return (
        Packed(blocks, out_sharding=(*axes, None), eager_sharding=False),
        Packed(scales, out_sharding=axes, eager_sharding=False),
    )


class Block(nnx.Module):
    """One transformer layer: attention then MoE, each with its own pre-norm and residual."""

    def __init__(
        self, config: GptOssConfig, *, sliding: bool, dtype, attention_impl: str, moe_impl: str, expert_format: str,
        lora: LoraSpec | None, rngs: nnx.Rngs,
    ):
        self.attn = Attention(config, sliding=sliding, dtype=dtype, impl=attention_impl, lora=lora, rngs=rngs)
        self.mlp = MoE(config, dtype=dtype, impl=moe_impl, expert_format=expert_format, lora=lora, rngs=rngs)

    def __call__(self, x_BTH, rope, q_pos_BT, plan, cache):
        x_BTH, cache = self.attn(x_BTH, rope, q_pos_BT, plan, cache)
        return self.mlp(x_BTH), cache


def _stacked_blocks(config: GptOssConfig, count: int, **block_args) -> Block:
    """`count` Blocks whose parameters are stacked on a leading `layers` axis, for `lax.scan`."""
    blocks = [nnx.split(Block(config, **block_args)) for _ in range(count)]

    def stack(*variables: nnx.Variable) -> nnx.Variable:
        stacked = jnp.stack([v.get_value() for v in variables])
        return variables[0].replace(stacked, out_sharding=("layers", *variables[0].out_sharding))

    state = jax.tree.map(stack, *[s for _, s in blocks], is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(blocks[0][0], state)


class GptOss(nnx.Module):
    """The gpt-oss transformer: embed, L blocks (sliding on even layers), final norm, unembed.

    `model(tokens)` runs a whole sequence without a cache. For generation, `init_cache` then
    `step(tokens, cache)` for the prompt (in chunks if long) and for each new token.
    `dtype` sets parameters and activations (bfloat16 by default; float32 for parity);
    `moe_impl` picks the expert implementation (`moe.IMPLS`), `attention_impl` the attention one;
    `expert_format` is "mxfp4" (packed, as published) or "bf16" (dense, as fine-tunes ship).
    For training: `lora` adds adapters (`LoraSpec`), `remat` recomputes each layer in the backward
    pass ("layer": keep only its input; or a `jax.checkpoint_policies` name, `REMAT_POLICIES`).
    """

    def __init__(
        self,
        config: GptOssConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.bfloat16,
        attention_impl: str = "xla",
        moe_impl: str = "auto",
        expert_format: str = "mxfp4",
        lora: LoraSpec | None = None,
        remat: str = "none",
    ):
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention_impl {attention_impl!r}; choose one of {ATTENTION_IMPLS}")
        if moe_impl not in moe.IMPLS:
            raise ValueError(f"unknown moe_impl {moe_impl!r}; choose one of {moe.IMPLS}")
        if expert_format not in moe.EXPERT_FORMATS:
            raise ValueError(f"unknown expert_format {expert_format!r}; choose one of {moe.EXPERT_FORMATS}")
        if moe_impl in moe.PACKED_ONLY and expert_format != "mxfp4":
            raise ValueError(f"moe_impl={moe_impl!r} runs MXFP4-packed experts; use expert_format='mxfp4'")
        if moe_impl in moe.PACKED_ONLY and lora is not None and set(lora.targets) & set(EXPERT_TARGETS):
            raise ValueError(f"moe_impl={moe_impl!r} cannot apply expert adapters; train with gather, grouped or auto")
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat {remat!r}; choose one of {REMAT_POLICIES}")
        V, H, L = config.vocab_size, config.hidden_size, config.num_hidden_layers
        self.config, self.dtype = config, jnp.dtype(dtype)
        self.embedding = _param(rngs, (V, H), ("vocab", "embed"), dtype, 1.0)
        self.expert_format, self.remat = expert_format, remat
        blocks = dict(
            dtype=dtype, attention_impl=attention_impl, moe_impl=moe_impl, expert_format=expert_format, lora=lora, rngs=rngs
        )
        self.sliding_blocks = _stacked_blocks(config, (L + 1) // 2, sliding=True, **blocks)
        self.full_blocks = _stacked_blocks(config, L // 2, sliding=False, **blocks) if L > 1 else None
        self.norm = RMSNorm(config, dtype)
        self.unembedding = _param(rngs, (V, H), ("vocab", "embed"), dtype, H**-0.5)

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        """Logits [B, T, V] (float32) of a whole sequence at positions 0..T-1."""
        return self.unembed(self.hidden(tokens_BT))

    def hidden(self, tokens_BT: jax.Array) -> jax.Array:
        """The final norm's output [B, T, H] of a whole sequence: what the logits are made from (a
        training loss unembeds it in chunks, `loss.cross_entropy`, never holding [T, V] logits)."""
        positions = query_positions(jnp.zeros(tokens_BT.shape[:1], jnp.int32), tokens_BT.shape[1])
        x_BTH, _ = self._layers(self._embed(tokens_BT), positions, None, None)
        return self.norm(x_BTH)

    def unembed(self, h_BTH: jax.Array) -> jax.Array:
        # float32 logits: sampling and log-probs need more than bf16's 8 bits of mantissa.
        return project("bth,vh->btv", h_BTH, self.unembedding[...], jnp.float32)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        return KVCache.create(
            num_layers=c.num_hidden_layers, batch=batch, max_len=max_len, window=c.sliding_window,
            kv_heads=c.num_key_value_heads, head_dim=c.head_dim, dtype=self.dtype,
        )

    def step(
        self, tokens_BT: jax.Array, cache: KVCache, valid_lengths: jax.Array | None = None, *, last_only: bool = False
    ) -> tuple[jax.Array, KVCache]:
        """Appends `tokens` to each row at its own position and returns their logits and the new cache.

        `valid_lengths [B]` says how many leading tokens of each row are real (the rest is padding,
        never cached); by default all T are. Rows must not pass `cache.max_len` (checked by callers
        that know the lengths; positions past it are not cached). `last_only` returns only the logits
        of each row's last valid token, [B, 1, V] (the chunk's first position for a row with none):
        all that sampling needs, and it skips unembedding the rest of a prompt chunk (a [T, H] x
        [H, 201088] matmul).
        """
        B, T = tokens_BT.shape
        valid = jnp.full((B,), T, jnp.int32) if valid_lengths is None else valid_lengths.astype(jnp.int32)
        positions = query_positions(cache.lengths, T)
        x_BTH, (sliding, full) = self._layers(self._embed(tokens_BT), positions, cache.plans(T, valid), cache)
        new_cache = KVCache(sliding=sliding, full=full, lengths=cache.lengths + valid)
        if last_only:
            x_BTH = jnp.take_along_axis(x_BTH, jnp.maximum(valid - 1, 0)[:, None, None], axis=1)
        return self.unembed(self.norm(x_BTH)), new_cache

    def _embed(self, tokens_BT: jax.Array) -> jax.Array:
        x_BTH = jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.dtype)
        return sharding.constrain(x_BTH, ("batch", None, "embed"))

    def _layers(self, x_BTH, positions_BT, plans, cache: KVCache | None):
        """Runs the layers as a scan over (sliding, full) pairs, then a last sliding layer if L is odd.

        The cache stacks ride in the scan's carry and each layer rewrites only its own slice, which XLA
        does in place (as scan outputs they would be a second copy of the whole cache). The parameter
        stacks are the scan's inputs, one layer per step; for cached steps on CPU the steps instead
        close over the whole stacks and see their layer as `stacked.LayerOf`, which the C++ kernels
        read in place and `moe.grouped` one expert at a time (`kernels.reads_stacks`).
        """
        rope = rotary_tables(self.config, positions_BT, self.dtype)
        sliding_plan, full_plan = plans if plans is not None else (None, None)
        sliding_stack, full_stack = (cache.sliding, cache.full) if cache is not None else (None, None)
        pairs = self.config.num_hidden_layers // 2
        sliding_def, sliding_state = nnx.split(self.sliding_blocks)
        in_place = kernels.reads_stacks(cached=cache is not None)

        def layer(state, index):  # layer `index` of a stack's parameters
            return stacked.layer_of(state, index) if in_place else jax.tree.map(lambda a: a[index], state)

        def block(graph, state, x, plan, stack, index):
            layer_cache = None if stack is None else jax.tree.map(lambda a: a[index], stack)
            x, layer_cache = self._rematerialized(
                lambda state, x, layer_cache: nnx.merge(graph, state)(x, rope, positions_BT, plan, layer_cache)
            )(state, x, layer_cache)
            if stack is not None:
                stack = jax.tree.map(lambda a, new: jax.lax.dynamic_update_index_in_dim(a, new, index, 0), stack, layer_cache)
            return x, stack

        if pairs:
            full_def, full_state = nnx.split(self.full_blocks)

            def pair(carry, xs):
                x, s_stack, f_stack = carry
                index, s_state, f_state = xs if not in_place else (xs, layer(sliding_state, xs), layer(full_state, xs))
                x, s_stack = block(sliding_def, s_state, x, sliding_plan, s_stack, index)
                x, f_stack = block(full_def, f_state, x, full_plan, f_stack, index)
                return (x, s_stack, f_stack), None

            xs = jnp.arange(pairs)
            if not in_place:  # the scan slices one layer per step
                xs = (xs, jax.tree.map(lambda a: a[:pairs], sliding_state), full_state)
            (x_BTH, sliding_stack, full_stack), _ = jax.lax.scan(pair, (x_BTH, sliding_stack, full_stack), xs)
        if self.config.num_hidden_layers % 2:
            x_BTH, sliding_stack = block(sliding_def, layer(sliding_state, pairs), x_BTH, sliding_plan, sliding_stack, pairs)
        return x_BTH, (sliding_stack, full_stack)

    def _rematerialized(self, layer):
        """`layer`, recomputed in the backward pass as `remat` says."""
        if self.remat == "none":
            return layer
        policy = None if self.remat == "layer" else getattr(jax.checkpoint_policies, self.remat)
        return jax.checkpoint(layer, policy=policy)
