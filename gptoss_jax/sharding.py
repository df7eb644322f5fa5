"""Device meshes, the one table from logical axis names to mesh axes, specs and placement.

Mesh axes: `data` splits the batch, `expert` splits the experts (expert parallelism: `moe.apply`'s
`shard_map`), `model` splits the attention heads (tensor parallelism, left to XLA's propagation).
Every parameter carries logical axis names (see `model.py`); `RULES` is the only place that maps them
to mesh axes, and no other module names a mesh axis or writes a `PartitionSpec`. A leaf: it imports
nothing of the model.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gptoss_jax.config import GptOssConfig

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
    "lora": None,  # adapters' rank: small, replicated
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
        if name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"bad --mesh {text!r}: expected comma-separated {'|'.join(AXES)}=N")
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


def named(mesh: Mesh, logical: tuple[str | None, ...]) -> NamedSharding:
    return NamedSharding(mesh, spec(logical))


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
    num_processes = _job_setting("--num-processes", "JAX_NUM_PROCESSES", num_processes)
    process_id = _job_setting("--process-id", "JAX_PROCESS_ID", process_id)
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} is not in [0, --num-processes {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    cache_on = jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir
    if num_processes > 1 and cache_on and jax.devices()[0].platform == "cpu":
        # Reproduced with jax 0.12.1: when the processes load a program from the persistent cache, they
        # wait in its first gloo collective forever. A recompile costs seconds; a hang, the job.
        jax.config.update("jax_enable_compilation_cache", False)
        warnings.warn("multi-process CPU run: JAX's persistent compilation cache is off (programs loaded from it hang in their first gloo collective)", stacklevel=2)


def _job_setting(flag: str, variable: str, value: int | None) -> int:
    """A multi-host setting from its flag or environment variable; a coordinator needs both settings."""
    if value is None:
        text = os.environ.get(variable, "")
        if not text.strip().isdigit():
            raise ValueError(f"--coordinator needs {flag} (or {variable}) as well, got {text!r}" if text else
                             f"--coordinator needs {flag} (or {variable}) as well")
        value = int(text)
    return value


def over_data(placement: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """`placement` further split over the data axis (ZeRO-1, for optimizer state): on the first dimension
    it leaves whole that the data size divides. Each data shard then updates only its slice of the state;
    arrays with no such dimension stay as they are."""
    if not isinstance(placement, NamedSharding):
        return placement
    data = placement.mesh.shape[RULES["batch"]]
    entries = list(placement.spec) + [None] * (len(shape) - len(placement.spec))
    if data == 1 or RULES["batch"] in jax.tree.leaves(entries):
        return placement
    for dim, (entry, size) in enumerate(zip(entries, shape)):
        if entry is None and size % data == 0:
            entries[dim] = RULES["batch"]
            return NamedSharding(placement.mesh, PartitionSpec(*entries))
    return placement


def place_tree(tree, logical_tree, mesh: Mesh):
    """`place`s every array of `tree` on `mesh` per the logical axes at the same spot of `logical_tree`."""
    return jax.tree.map(lambda value, logical: place(value, named(mesh, logical)), tree, logical_tree)


def batch_shards(mesh: Mesh) -> int:
    """How many ways `mesh` splits the batch (a batch must be a multiple of it)."""
    return mesh.shape[RULES["batch"]]


def use(mesh: Mesh | None):
    """`jax.set_mesh(mesh)`, or a context that does nothing without a mesh."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def split_axis(logical: str) -> str | None:
    """The mesh axis that the active mesh splits `logical` over, or None (no mesh, or that axis is 1)."""
    mesh, axis = jax.sharding.get_abstract_mesh(), RULES[logical]
    if mesh.empty or axis is None or mesh.shape.get(axis, 1) == 1:
        return None
    return axis


def constrain(x: jax.Array, logical: tuple[str | None, ...]) -> jax.Array:
    """Pins an activation's sharding by logical names when a mesh is active (a no-op otherwise)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(logical)))
