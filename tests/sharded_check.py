"""Sharded runs for tests/test_sharding.py, in a process of its own (the device count is fixed at start).

Usage: sharded_check.py meshes OUT | multihost OUT | bad-mesh D,E,M[,DEVICES]
"""

import os
import sys

multihost = sys.argv[1] == "multihost"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 if multihost else 8}"

import dataclasses  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from conftest import CONFIGS, build  # noqa: E402

from gptoss_jax import checkpoint, sharding  # noqa: E402
from gptoss_jax.sampling import Sampler  # noqa: E402

CONFIG = dataclasses.replace(CONFIGS["odd"], num_experts=8, experts_per_token=3, num_attention_heads=8, num_key_value_heads=4)
MESHES = [(1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4), (8, 1, 1)]
forward = nnx.jit(lambda model, tokens: model(tokens))
step = nnx.jit(lambda model, tokens, cache, valid: model.step(tokens, cache, valid))


def cached_logits(model, tokens, mesh=None):
    """Prefill 9 tokens, then 3 single steps."""
    cache = model.init_cache(tokens.shape[0], 16)
    if mesh is not None:
        cache = jax.tree.map(sharding.place, cache, sharding.cache_sharding(cache, mesh))
    outputs = []
    for start, stop in ((0, 9), (9, 10), (10, 11), (11, 12)):
        logits, cache = step(model, tokens[:, start:stop], cache, jnp.full((tokens.shape[0],), stop - start, jnp.int32))
        outputs.append(np.asarray(logits))
    return np.concatenate(outputs, axis=1)


def expert_rows(model) -> int:
    blocks = model.sliding_blocks.mlp.mlp1_blocks.get_value()
    return {s.data.shape[1] for s in blocks.addressable_shards}.pop()


def meshes(out: Path) -> None:
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, 12)))
    prompts = [list(range(1, 2 + n)) for n in (3, 7, 1, 9, 4, 4, 2, 8)]
    reference = build(CONFIG)
    full, cached = np.asarray(forward(reference, tokens)), cached_logits(reference, tokens)
    greedy = Sampler(reference, stop_tokens=()).generate(prompts, max_new_tokens=5).tokens
    report = {"num_experts": CONFIG.num_experts, "meshes": {}}
    for sizes in MESHES:
        mesh = sharding.make_mesh(*sizes, config=CONFIG)
        model = build(CONFIG)
        sharding.shard_model(model, mesh)
        with jax.set_mesh(mesh):
            prefill_error = float(np.abs(np.asarray(forward(model, tokens)) - full).max())
            decode_error = float(np.abs(cached_logits(model, tokens, mesh) - cached).max())
        sharded_greedy = Sampler(model, stop_tokens=(), mesh=mesh).generate(prompts, max_new_tokens=5).tokens
        report["meshes"][str(sizes)] = {
            "prefill_error": prefill_error, "decode_error": decode_error, "greedy_equal": sharded_greedy == greedy,
            "expert_axis": sizes[1], "expert_shard_rows": expert_rows(model),
        }
    checkpoint.save(reference, out / "ckpt")
    restored = checkpoint.load(out / "ckpt", dtype="float32", mesh=sharding.make_mesh(2, 4, 1))
    pairs = zip(jax.tree.leaves(nnx.state(reference)), jax.tree.leaves(nnx.state(restored)), strict=True)
    report["restored_equal"] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)
    report["restored_expert_shard_rows"] = expert_rows(restored)
    (out / "report.json").write_text(json.dumps(report, indent=2))


def two_processes(out: Path) -> None:
    sharding.initialize_distributed()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, 12)))
    local = jax.local_devices()[0]
    reference = build(CONFIG)
    with jax.default_device(local):
        full = np.asarray(forward(reference, jax.device_put(tokens, local)))
    mesh = sharding.make_mesh(2, 4, 1, config=CONFIG)
    sharding.shard_model(reference, mesh)
    placed = sharding.place(np.asarray(tokens), jax.NamedSharding(mesh, sharding.spec(("batch", None))))
    with jax.set_mesh(mesh):
        logits = forward(reference, placed)
    gathered = np.asarray(jax.experimental.multihost_utils.process_allgather(logits, tiled=True))
    if jax.process_index() == 0:
        report = {"processes": jax.process_count(), "devices": jax.device_count(), "error": float(np.abs(gathered - full).max())}
        (out / "multihost.json").write_text(json.dumps(report))


def bad_mesh(text: str) -> None:
    data, expert, model, *count = (int(v) for v in text.split(","))
    devices = jax.devices()[: count[0]] if count else None
    try:
        sharding.make_mesh(data, expert, model, config=CONFIG, devices=devices)
    except ValueError as error:
        print(error)


if __name__ == "__main__":
    import jax.experimental.multihost_utils  # noqa: F401

    {"meshes": lambda: meshes(Path(sys.argv[2])), "multihost": lambda: two_processes(Path(sys.argv[2])),
     "bad-mesh": lambda: bad_mesh(sys.argv[2])}[sys.argv[1]]()
