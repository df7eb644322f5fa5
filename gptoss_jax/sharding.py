"""Device meshes, the one table from logical axis names to mesh axes, and expert-parallel MoE.

Mesh axes: `data` splits the batch, `expert` splits the experts (expert parallelism through
`shard_map`), `model` splits the attention heads (tensor parallelism, left to XLA's propagation).
Every parameter carries logical axis names (see `model.py`); `RULES` is the only place that maps them
to mesh axes. No other module names a mesh axis.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gptoss_jax import moe
from gptoss_jax.config import GptOssConfig
from gptoss_jax.kv_cache import KVCache, LayerCache

AXES = ("data", "expert", "model")
RULES: dict[str, str | None] = {
    "batch": "data",
    "layers": None,
    "vocab": None,
    "embed": None,
    "q_heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "experts": "expert",
    "mlp": None,
}


def make_mesh(data: int = 1, expert: int = 1, model: int = 1, *, config: GptOssConfig | None = None, devices=None) -> Mesh:
    """A (data, expert, model) mesh over `devices` (default: all), checked against them and the config."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "expert": expert, "model": model}
    if any(not isinstance(v, int) or v < 1 for v in sizes.values()):
        raise ValueError(f"mesh axis sizes must be positive integers, got {sizes}")
    if data * expert * model != len(devices):
        raise ValueError(f"mesh {sizes} needs {data * expert * model} devices, but {len(devices)} are available")
    if config is not None:
        check_fits(sizes, config)
    return jax.make_mesh((data, expert, model), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def check_fits(sizes: dict[str, int], config: GptOssConfig) -> None:
    if config.num_experts % sizes["expert"]:
        raise ValueError(f"num_experts={config.num_experts} is not divisible by the expert axis ({sizes['expert']})")
    if config.num_key_value_heads % sizes["model"]:
        raise ValueError(f"num_key_value_heads={config.num_key_value_heads} is not divisible by the model axis ({sizes['model']})")


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=1,expert=8,model=1"` -> sizes (axes left out are 1)."""
    sizes = dict.fromkeys(AXES, 1)
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in sizes or not value.strip().isdigit():
            raise ValueError(f"bad mesh {text!r}: expected comma-separated {'|'.join(AXES)}=N")
        sizes[name.strip()] = int(value)
    return sizes


def spec(logical: tuple[str | None, ...]) -> PartitionSpec:
    """Mesh PartitionSpec for logical axis names; a mesh axis may appear only once."""
    physical = [RULES[name] if name is not None else None for name in logical]
    used = [axis for axis in physical if axis is not None]
    if len(used) != len(set(used)):
        raise ValueError(f"logical axes {logical} map a mesh axis twice: {physical}")
    return PartitionSpec(*physical)


def variable_spec(variable: nnx.Variable) -> PartitionSpec:
    return spec(tuple(variable.get_metadata().get("out_sharding") or (None,) * variable.get_value().ndim))


def place(value, sharding: NamedSharding) -> jax.Array:
    """A host or single-device array as a global array on `sharding`: each device takes only its slice
    (every process passes the same value, so this works across hosts too)."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def shard_model(model: nnx.Module, mesh: Mesh) -> None:
    """Moves every parameter onto `mesh` per its logical axes (in place)."""
    for _, variable in nnx.to_flat_state(nnx.state(model)):
        variable.set_value(place(variable.get_value(), NamedSharding(mesh, variable_spec(variable))))


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> None:
    """`jax.distributed.initialize` from arguments or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID; CPU processes talk through gloo. Call once, before anything touches a device."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator is None:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes if num_processes is not None else int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=process_id if process_id is not None else int(os.environ["JAX_PROCESS_ID"]),
    )


def cache_sharding(cache: KVCache, mesh: Mesh) -> KVCache:
    """Shardings for a KV cache: rows over `data`, kv heads over `model`."""
    layer = NamedSharding(mesh, spec(("layers", "batch", None, "kv_heads", "head_dim")))
    stack = LayerCache(k=layer, v=layer)
    return KVCache(sliding=stack, full=stack, lengths=NamedSharding(mesh, spec(("batch",))))


def constrain(x: jax.Array, logical: tuple[str | None, ...]) -> jax.Array:
    """Pins an activation's sharding by logical names when a mesh is active (a no-op otherwise)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(logical)))


def apply_experts(impl: str, experts: moe.Experts, t_BTH, experts_BTK, weights_BTK) -> jax.Array:
    """`moe.apply_experts`, expert-parallel when the active mesh has an expert axis > 1.

    Each expert shard holds E / n experts. One token per row (decode): every shard runs its local
    experts on the tokens that chose them and the outputs are summed (`psum`). Longer inputs
    (prefill, training): the tokens are split across the expert shards, each token copy is sent to
    the shard owning its expert and back (`all_to_all`), with room for every copy (dropless).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get("expert", 1) == 1:
        return moe.apply_experts(impl, experts, t_BTH, experts_BTK, weights_BTK)
    routed = spec(("batch", None, None))
    expert_specs = jax.tree.map(lambda _: spec(("experts",)), experts)
    body = _local_then_sum if t_BTH.shape[1] == 1 else _dispatch
    run = jax.shard_map(
        lambda e, t, i, w: body(impl, e, t, i, w),
        mesh=mesh, in_specs=(expert_specs, routed, routed, routed), out_specs=routed, check_vma=False,
    )
    return run(experts, t_BTH, experts_BTK, weights_BTK)


def _local_ids(experts: moe.Experts, experts_BTK, weights_BTK):
    """Global expert ids -> ids among this shard's experts; weight 0 where another shard owns the expert."""
    local_count = experts.mlp1_bias.shape[0]
    local = experts_BTK - jax.lax.axis_index("expert") * local_count
    mine = (local >= 0) & (local < local_count)
    return jnp.where(mine, local, 0), jnp.where(mine, weights_BTK, 0)


def _local_then_sum(impl, experts, t_BTH, experts_BTK, weights_BTK):
    local, weights = _local_ids(experts, experts_BTK, weights_BTK)
    return jax.lax.psum(moe.apply_experts(impl, experts, t_BTH, local, weights), "expert")


def _dispatch(impl, experts, t_BTH, experts_BTK, weights_BTK):
    """All-to-all expert parallelism for one (data, expert) shard; see `apply_experts`."""
    n, me = jax.lax.axis_size("expert"), jax.lax.axis_index("expert")
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
    order = jnp.argsort(owner, stable=True)
    first_of_owner = jnp.searchsorted(owner[order], jnp.arange(n))
    slot = jnp.zeros(pairs, jnp.int32).at[order].set(jnp.arange(pairs) - first_of_owner[owner[order]])
    token = jnp.arange(pairs) // K
    send_x = jnp.zeros((n, pairs, H), x_MH.dtype).at[owner, slot].set(x_MH[token])
    send_id = jnp.full((n, pairs), -1, jnp.int32).at[owner, slot].set((ids_MK % local_count).reshape(pairs))
    recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0)
    recv_id = jax.lax.all_to_all(send_id, "expert", 0, 0).reshape(1, n * pairs, 1)
    valid = recv_id >= 0
    y = moe.apply_experts(
        impl, experts, recv_x.reshape(1, n * pairs, H), jnp.where(valid, recv_id, 0), valid.astype(x_MH.dtype)
    )
    back = jax.lax.all_to_all(y.reshape(n, pairs, H), "expert", 0, 0)
    y_MKH = back[owner, slot].reshape(per_shard, K, H)
    out_MH = jnp.einsum("mkh,mk->mh", y_MKH, w_MK.astype(y_MKH.dtype))
    every = jax.lax.all_gather(out_MH, "expert", tiled=True)[: B * T]
    return every.reshape(B, T, H)
