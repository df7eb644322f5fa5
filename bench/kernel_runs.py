"""Random inputs at gpt-oss shapes, and each Pallas kernel beside the XLA formulation the model runs otherwise.

Every function returns two thunks `(ours, xla)` whose results can be `block_until_ready`'d; the
inputs are built once, on the default device, before either is timed. On CPU the kernels run
interpreted (correct, not fast), which is how the tests check these pairs agree.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from gptoss_jax import GptOssConfig, moe
from gptoss_jax.kernels import interpret
from gptoss_jax.attention import attend
from gptoss_jax.mxfp4 import BLOCK, BYTES_PER_BLOCK
from gptoss_jax.mxfp4 import dequantize as xla_dequantize
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.moe import experts_mlp
from pallas_kernels.mxfp4 import dequantize as pallas_dequantize
from pallas_kernels.splash import splash_attention

Thunks = tuple[Callable[[], jax.Array], Callable[[], jax.Array]]


def _normal(key, shape, dtype=jnp.bfloat16) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _packed(key, experts: int, rows: int, cols: int) -> tuple[jax.Array, jax.Array]:
    """Random MXFP4 blocks `[E, rows, cols/32, 16]` and scales near 2^-7 (realistic magnitudes)."""
    k1, k2 = jax.random.split(key)
    blocks = jax.random.randint(k1, (experts, rows, cols // BLOCK, BYTES_PER_BLOCK), 0, 256).astype(jnp.uint8)
    scales = jax.random.randint(k2, (experts, rows, cols // BLOCK), 118, 124).astype(jnp.uint8)
    return blocks, scales


def _bind(fn, *args) -> Callable[[], jax.Array]:
    jitted = jax.jit(fn)
    return lambda: jitted(*args)


def experts(config: GptOssConfig, tokens: int) -> Thunks:
    """One MoE layer's experts for `tokens` tokens: the grouped kernels vs `moe.apply("auto")`."""
    E, K, H, I = config.num_experts, config.experts_per_token, config.hidden_size, config.intermediate_size
    keys = jax.random.split(jax.random.key(0), 7)
    x_MH = _normal(keys[0], (tokens, H))
    ids_MK = jnp.argsort(jax.random.uniform(keys[1], (tokens, E)), axis=-1)[:, :K].astype(jnp.int32)
    w_MK = jax.nn.softmax(jax.random.normal(keys[2], (tokens, K)), axis=-1)
    mlp1, mlp2 = _packed(keys[3], E, 2 * I, H), _packed(keys[4], E, H, I)
    b1, b2 = _normal(keys[5], (E, 2 * I)), _normal(keys[6], (E, H))
    alpha, limit = config.swiglu_alpha, config.swiglu_limit

    def ours(x, ids, w, mlp1, b1, mlp2, b2):
        order, counts = moe.sort_by_expert(ids.reshape(-1), E)
        return experts_mlp(x, w, order, counts, *mlp1, b1, *mlp2, b2, alpha=alpha, limit=limit, interpret=interpret())

    def xla(x, ids, w, mlp1, b1, mlp2, b2):
        packed = moe.Experts(moe.PackedMatrices(*mlp1), b1, moe.PackedMatrices(*mlp2), b2, alpha=alpha, limit=limit)
        return moe.apply("auto", packed, x[None], ids[None], w[None])[0]

    args = (x_MH, ids_MK, w_MK, mlp1, b1, mlp2, b2)
    return _bind(ours, *args), _bind(xla, *args)


def dequant(config: GptOssConfig) -> Thunks:
    """One layer's mlp1 decoded to bf16."""
    blocks, scales = _packed(jax.random.key(1), config.num_experts, 2 * config.intermediate_size, config.hidden_size)
    return (_bind(lambda b, s: pallas_dequantize(b, s, jnp.bfloat16, interpret=interpret()), blocks, scales),
            _bind(lambda b, s: xla_dequantize(b, s, jnp.bfloat16), blocks, scales))


def _attention_inputs(config: GptOssConfig, batch: int, queries: int, keys: int):
    N, G, D = config.num_key_value_heads, config.q_per_kv, config.head_dim
    k1, k2, k3, k4 = jax.random.split(jax.random.key(2), 4)
    return (_normal(k1, (batch, queries, N, G, D)), _normal(k2, (batch, keys, N, D)), _normal(k3, (batch, keys, N, D)),
            jax.random.normal(k4, (N, G), jnp.float32))


def decode(config: GptOssConfig, batch: int, keys: int, window: int | None) -> Thunks:
    """One new token per row against `keys` cached positions (all filled)."""
    q, k, v, sinks = _attention_inputs(config, batch, 1, keys)
    k_pos_BS = jnp.broadcast_to(jnp.arange(keys, dtype=jnp.int32), (batch, keys))
    q_pos_B = jnp.full((batch,), keys - 1, jnp.int32)

    def ours(q, k, v, sinks, k_pos, q_pos):
        return decode_attention(q[:, 0], k, v, sinks, k_pos, q_pos, window=window, interpret=interpret())

    def xla(q, k, v, sinks, k_pos, q_pos):
        return attend(q, k, v, q_pos[:, None], k_pos, sinks, window)[:, 0]

    args = (q, k, v, sinks, k_pos_BS, q_pos_B)
    return _bind(ours, *args), _bind(xla, *args)


def prefill(config: GptOssConfig, tokens: int, window: int | None, backward: bool) -> Thunks:
    """Attention over a whole sequence without a cache (splash on TPU), forward or forward + backward."""
    q, k, v, sinks = _attention_inputs(config, 1, tokens, tokens)
    start_B = jnp.zeros((1,), jnp.int32)
    kernel = splash_attention if jax.default_backend() == "tpu" else flash_attention

    def ours(q, k, v, sinks):
        return kernel(q, k, v, sinks, start_B, start_B, window=window, interpret=interpret())

    def xla(q, k, v, sinks):
        positions = jnp.arange(tokens, dtype=jnp.int32)[None]
        return attend(q, k, v, positions, positions, sinks, window)

    if backward:  # gradients of a scalar loss w.r.t. q, k, v and the sinks
        ours, xla = (jax.grad(lambda *a, f=f: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3)) for f in (ours, xla))
    return _bind(ours, q, k, v, sinks), _bind(xla, q, k, v, sinks)
