"""Which kernel serves which model call on which platform: the library's one backend table.

A switch (`attention_impl`, `moe_impl`) names an algorithm; this module picks the algorithm's lowering
for the platform (`platform()`, the only place the library asks for the backend):
- CPU: the C++ kernels of `gptoss_jax.native` serve one-token projections (`project`), one-token
  attention to a bfloat16 cache (`attend_token`) and the expert products of `moe.gather` on packed
  experts (`cpu_kernels`); installed without them the XLA formulations serve. Pallas kernels run interpreted there (`interpret`), to be tested.
- GPU: Pallas Triton kernels. TPU: Mosaic kernels and JAX's splash attention.
A kernel without a VJP of its own trains through the VJP of the XLA formulation it stands in for
(`with_reference_vjp`).

Attention kernels by call (`attention_impl="pallas"`):
- no cache (training, uncached prefill): flash attention; on TPU, JAX's splash attention;
- one new token against a cache (decode): split-K decode attention over the cache as stored, the
  sliding layers' ring included (its slots carry their own positions);
- several new tokens against a cache (chunked prefill): flash attention with position offsets; a
  ring is first rotated into position order, since flash attention wants keys at consecutive positions.
On TPU the two cached cases stay on the XLA path (`has_attention_kernel`): those kernels are Pallas
Triton, and the cache's per-kv-head blocks do not meet Mosaic's (8, 128) tiling.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from gptoss_jax import attention, native, stacked
from gptoss_jax.kv_cache import WritePlan
from gptoss_jax.stacked import LayerOf
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.moe import experts_mlp
from pallas_kernels.splash import splash_attention


def platform() -> str:
    """The backend programs are built for ("cpu", "gpu", "tpu")."""
    return jax.default_backend()


def interpret() -> bool:
    """Pallas has no CPU backend: interpret the kernels there."""
    return platform() == "cpu"


def cpu_kernels() -> bool:
    """True where the C++ kernels serve: on CPU, once they compiled (see `native.available`)."""
    return platform() == "cpu" and native.available()


def reads_stacks(cached: bool) -> bool:
    """True where a step's layers see whole parameter stacks and a layer index (`stacked.LayerOf`)
    rather than slices XLA copies out of the stacks: the C++ kernels then read a layer in place, and
    `moe.grouped` slices out one expert at a time. Inference steps (with a cache) on CPU, without a
    mesh; training differentiates the stacks, and a closed-over stack's gradient is a whole stack."""
    return cached and platform() == "cpu" and jax.sharding.get_abstract_mesh().empty


def gemms_on_amx(x: jax.Array) -> bool:
    """True where products of several bfloat16 rows (prefill's projections, `moe.grouped`'s experts) run
    as the C++ GEMMs: on a CPU whose kernels run at the `amx` level (elsewhere those kernels' scalar
    loops are slower than XLA's GEMMs), without a mesh (the kernels see whole arrays, not shards).
    XLA:CPU reaches 100-200 GFLOP/s on bf16 GEMMs without AMX."""
    return x.dtype == jnp.bfloat16 and cpu_kernels() and native.level() == "amx" and jax.sharding.get_abstract_mesh().empty


def attends_token_on_cpu(q_BTNGD: jax.Array, keys_BSND: jax.Array) -> bool:
    """True where one new token per row attends to a bfloat16 cache in the C++ kernel (`attend_token`):
    on CPU, without a mesh. XLA:CPU runs that step as small GEMMs at ~2 GB/s of cache."""
    return q_BTNGD.shape[1] == 1 and keys_BSND.dtype == jnp.bfloat16 and cpu_kernels() and jax.sharding.get_abstract_mesh().empty


def attend_token(q_BTNGD, k_BSND, v_BSND, q_pos_BT, k_pos_BS, sinks_NG, window: int | None) -> jax.Array:
    """`attention.attend` for one new token per row by the C++ kernel (probabilities kept in float32),
    differentiated as `attend`."""

    def kernel(q, k, v, q_pos, k_pos, sinks):
        return native.decode_attention(q[:, 0], k, v, q_pos[:, 0], k_pos, sinks, window)[:, None].astype(v.dtype)

    def reference(q, k, v, q_pos, k_pos, sinks):
        return attention.attend(q, k, v, q_pos, k_pos, sinks, window)

    return with_reference_vjp(kernel, reference)(q_BTNGD, k_BSND, v_BSND, q_pos_BT, k_pos_BS, sinks_NG)


def has_attention_kernel(cached: bool) -> bool:
    return not cached or platform() != "tpu"


def with_reference_vjp(kernel: Callable, reference: Callable) -> Callable:
    """`kernel`, differentiated as `reference` (the same function by another formulation): the
    forward runs the kernel, the backward `jax.vjp(reference)` at the same inputs."""

    @jax.custom_vjp
    def run(*args):
        return kernel(*args)

    def forward(*args):
        return kernel(*args), args

    def backward(args, cotangent):
        return jax.vjp(reference, *args)[1](cotangent)

    run.defvjp(forward, backward)
    return run


def project(spec: str, x: jax.Array, w: jax.Array | LayerOf, out_dtype=None) -> jax.Array:
    """`jnp.einsum(spec, x, w)` for specs `bt<C>,<O><C>->bt<O>` (w's trailing axes contracted).

    One token with bfloat16 weights on CPU runs as the C++ matrix-vector kernel, at memory bandwidth:
    XLA:CPU's dot for a single row is 10-40x slower (its fast GEMM path starts at two rows). More rows
    run as the C++ AMX GEMM where `gemms_on_amx`. Given a `LayerOf`, the kernels read the layer inside
    the stack.
    """
    out_dtype = out_dtype or x.dtype

    def einsum(x, w):
        return jnp.einsum(spec, x, w[...], preferred_element_type=out_dtype)

    rows = x.shape[0] * x.shape[1]
    if w.dtype != jnp.bfloat16 or not cpu_kernels() or (rows > 1 and not gemms_on_amx(x)):
        return einsum(x, w)

    def kernel(x, w):
        kept = w.shape[: w.ndim - (x.ndim - 2)]
        stack, layer = stacked.parts(w)
        stack = stack.reshape(stack.shape[0], math.prod(kept), -1)
        if rows > 1:
            y = native.bf16_gemm(x.reshape(rows, -1), stack, layer)
        else:
            y = native.bf16_matvec(x.reshape(-1), stack, layer)
        return y.reshape(*x.shape[:2], *kept).astype(out_dtype)

    return with_reference_vjp(kernel, einsum)(x, w)


def attend(
    q_BTNGD: jax.Array,
    k_BSND: jax.Array,
    v_BSND: jax.Array,
    q_pos_BT: jax.Array,
    plan: WritePlan | None,
    sinks_NG: jax.Array,
    window: int | None,
) -> jax.Array:
    """`attention.attend` by kernels; keys are the new tokens' (`plan` None) or those `LayerCache.attend_to` returned."""
    q_start_B = q_pos_BT[:, 0]
    if plan is None:  # queries and keys are the same positions
        if platform() == "tpu":
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


def experts(experts, t_BTH: jax.Array, weights_BTK: jax.Array, order_P: jax.Array, counts_E: jax.Array) -> jax.Array:
    """`moe.grouped`'s math by the grouped MXFP4 kernels; `experts` is a `moe.Experts` of packed matrices,
    `order_P` and `counts_E` the routing sort of its pairs (`moe.sort_by_expert`)."""
    B, T, H = t_BTH.shape
    out_MH = experts_mlp(
        t_BTH.reshape(B * T, H), weights_BTK.reshape(B * T, -1), order_P, counts_E,
        experts.mlp1.blocks, experts.mlp1.scales, experts.mlp1_bias,
        experts.mlp2.blocks, experts.mlp2.scales, experts.mlp2_bias,
        alpha=experts.alpha, limit=experts.limit, interpret=interpret(),
    )
    return out_MH.reshape(B, T, H)
