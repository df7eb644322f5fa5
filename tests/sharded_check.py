"""Sharded runs for tests/test_sharding.py, in a process of its own (the device count is fixed at start).

Usage: sharded_check.py meshes OUT | save OUT | multihost OUT | restore OUT | bad-mesh D,E,M[,DEVICES]
"""

import os
import sys

multihost = sys.argv[1] == "multihost"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 if multihost else 8}"

import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
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
MULTIHOST_TOKENS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, 12))
forward = nnx.jit(lambda model, tokens: model(tokens))
step = nnx.jit(lambda model, tokens, cache, valid: model.step(tokens, cache, valid))


def cached_logits(model, tokens, mesh=None):
    """Prefill 9 tokens, then 3 single steps."""
    cache = model.init_cache(tokens.shape[0], 16)
    if mesh is not None:
        cache = sharding.place_tree(cache, cache.logical_axes(), mesh)
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


def save_reference(out: Path) -> None:
    """The one-process side of `two_processes`: OUT/ckpt, with 3 experts to a chunk so that chunk 1
    (experts 3-5) straddles the two processes (4 experts each), and the logits OUT/reference.npy.

    A process of its own: Orbax cannot save from one process of a multi-process job (its save
    broadcasts across all of them)."""
    reference = build(CONFIG)
    np.save(out / "reference.npy", np.asarray(forward(reference, jnp.asarray(MULTIHOST_TOKENS))))
    checkpoint.CHUNK_BYTES = 3 * reference.sliding_blocks.mlp.mlp1_blocks.get_value()[0, 0].nbytes
    checkpoint.save(reference, out / "ckpt")


def restore(out: Path) -> None:
    """Saves with 3 experts to a chunk and loads onto one device and onto a (1, 2, 1) mesh, where each
    shard of 4 experts spans two chunks and chunk 1 (experts 3-5) feeds both shards; OUT/restore.json
    says, per placement, whether every loaded array equals the saved one."""
    reference = build(CONFIG)
    checkpoint.CHUNK_BYTES = 3 * reference.sliding_blocks.mlp.mlp1_blocks.get_value()[0, 0].nbytes
    checkpoint.save(reference, out / "ckpt")
    report = {}
    for name, mesh in (("one device", None), ("(1, 2, 1)", sharding.make_mesh(1, 2, 1, config=CONFIG, devices=jax.devices()[:2]))):
        restored = checkpoint.load(out / "ckpt", dtype="float32", mesh=mesh)
        pairs = zip(jax.tree.leaves(nnx.state(reference)), jax.tree.leaves(nnx.state(restored)), strict=True)
        report[name] = {"equal": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs), "expert_shard_rows": expert_rows(restored)}
    (out / "restore.json").write_text(json.dumps(report, indent=2))


def line_up(out: Path, name: str) -> None:
    """A barrier of the processes through files in OUT (a gloo collective would give up after 30 s)."""
    (out / f"{name}-{jax.process_index()}").touch()
    while not all((out / f"{name}-{i}").exists() for i in range(jax.process_count())):
        time.sleep(0.1)


def two_processes(out: Path) -> None:
    """Each of 2 processes loads OUT/ckpt onto a (1, 8, 1) mesh over their 2 x 4 devices and writes
    multihost-<process>.json: where its expert shards are, which chunks it read, the logits' error."""
    sharding.initialize_distributed()
    local = jax.local_devices()
    reads, read_chunks = {}, checkpoint._read_chunks

    def recorded(directory, wanted, *rest):
        reads.update({"/".join(keys): sorted(chunks, key=int) for keys, chunks in wanted.items()})
        return read_chunks(directory, wanted, *rest)

    checkpoint._read_chunks = recorded
    mesh = sharding.make_mesh(1, 8, 1, config=CONFIG)
    model = checkpoint.load(out / "ckpt", dtype="float32", mesh=mesh)
    placed = sharding.place(MULTIHOST_TOKENS, jax.NamedSharding(mesh, sharding.spec(("batch", None))))
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):  # compiled ahead: compile times differ under load, gloo waits 30 s for a peer
        run = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)).lower(state, placed).compile()
        line_up(out, "compiled")
        logits = run(state, placed)
    reference = np.load(out / "reference.npy")
    error = max(float(np.abs(np.asarray(s.data) - reference[s.index]).max()) for s in logits.addressable_shards)
    experts = {}
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        if "experts" in (variable.get_metadata().get("out_sharding") or ()):
            axis, shards = variable.get_metadata()["out_sharding"].index("experts"), variable.get_value().addressable_shards
            experts["/".join(map(str, path))] = {
                "on_own_devices": all(s.device in local for s in shards), "shards": len(shards),
                "rows": sorted({s.data.shape[axis] for s in shards}),
            }
    report = {
        "processes": jax.process_count(), "devices": jax.device_count(), "local_devices": len(local),
        "experts": experts, "reads": reads, "error": error,
    }
    (out / f"multihost-{jax.process_index()}.json").write_text(json.dumps(report, indent=2))


def bad_mesh(text: str) -> None:
    data, expert, model, *count = (int(v) for v in text.split(","))
    devices = jax.devices()[: count[0]] if count else None
    try:
        sharding.make_mesh(data, expert, model, config=CONFIG, devices=devices)
    except ValueError as error:
        print(error)


if __name__ == "__main__":
    try:
        {"meshes": lambda: meshes(Path(sys.argv[2])), "save": lambda: save_reference(Path(sys.argv[2])),
         "multihost": lambda: two_processes(Path(sys.argv[2])), "restore": lambda: restore(Path(sys.argv[2])),
         "bad-mesh": lambda: bad_mesh(sys.argv[2])}[sys.argv[1]]()
    except BaseException:
        # Exit at once: a multi-host process would otherwise wait in jax.distributed's shutdown barrier
        # for the others (the test harness kills those when one process fails).
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
