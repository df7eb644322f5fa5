"""The fine-tuning Trainer on a mesh and across processes equals one device, for tests/test_finetune.py.

Usage: sharded_trainer_check.py reference OUT | multihost OUT

- `reference`: one process with 4 forced CPU devices. Trains the LoRA model 3 steps on one device and on
  the (data, expert, model) = (2, 2, 1) mesh; writes OUT/reference.npz (one device's losses and final
  master weights) and OUT/mesh.json (the mesh's errors and where its optimizer state lives: ZeRO-1).
- `multihost`: one of 2 processes of a jax.distributed job (JAX_* variables), 2 devices each, training
  on the same (2, 2, 1) mesh over both; writes OUT/multihost-<process>.json with its errors against
  reference.npz. Each process builds only the batch rows of its own devices.
"""

import os
import sys

MODE = sys.argv[1]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={2 if MODE == 'multihost' else 4}"

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

from gptoss_jax import sharding  # noqa: E402

if MODE == "multihost":
    sharding.initialize_distributed()  # before the test modules below touch a device

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_finetune import examples  # noqa: E402
from test_training import lora_model  # noqa: E402

from gptoss_jax.finetune.trainer import TrainConfig, Trainer  # noqa: E402

CONFIG = TrainConfig(method="lora", steps=3, global_batch=8, micro_batch=2, max_length=64, lr=1e-2, warmup=0.0)
MESH = (2, 2, 1)


def train(mesh) -> tuple[list[float], dict[str, np.ndarray], Trainer]:
    """3 steps from the same weights and data; the losses and the final float32 master weights (gathered)."""
    model = lora_model(moe_impl="grouped")
    if mesh is not None:
        sharding.shard_model(model, mesh)
    trainer = Trainer(model, CONFIG, mesh=mesh)
    losses = [metrics["loss"] for metrics in trainer.fit(examples(16))]
    gathered = multihost_utils.process_allgather(trainer.params, tiled=True) if jax.process_count() > 1 else trainer.params
    return losses, {"/".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(gathered)}, trainer


def errors(losses: list[float], params: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    return {
        "loss": max(abs(a - b) / abs(b) for a, b in zip(losses, reference["losses"].tolist(), strict=True)),
        "params": max(float(np.abs(params[name] - reference[name]).max()) for name in params),
    }


def main() -> None:
    out = Path(sys.argv[2])
    if MODE == "reference":
        losses, params, _ = train(None)
        np.savez(out / "reference.npz", losses=np.asarray(losses), **params)
        mesh_losses, mesh_params, trainer = train(sharding.make_mesh(*MESH))
        specs = {str(spec) for spec in (x.sharding.spec for x in jax.tree.leaves(trainer.opt_state)) if "data" in str(spec)}
        report = {**errors(mesh_losses, mesh_params, {"losses": np.asarray(losses), **params}), "opt_specs_over_data": sorted(specs)}
        (out / "mesh.json").write_text(json.dumps(report))
    else:
        reference = dict(np.load(out / "reference.npz"))
        losses, params, _ = train(sharding.make_mesh(*MESH))
        report = {**errors(losses, params, reference), "processes": jax.process_count(), "devices": jax.device_count()}
        (out / f"multihost-{jax.process_index()}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
