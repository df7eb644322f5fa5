"""Training gradients on 4 forced CPU devices, for tests/test_training.py (its own process: the device
count is fixed when jax starts). Prints one JSON line: each mesh's largest gradient error relative to
one device's."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_training import TOKENS, gradients, lora_model  # noqa: E402

from gptoss_jax import sharding  # noqa: E402

MESHES = [(2, 2, 1), (1, 2, 2), (4, 1, 1)]


def main() -> None:
    tokens = jnp.concatenate([TOKENS, TOKENS[::-1]])  # 4 rows, so the data axis can split them 4 ways
    reference = gradients(lora_model(moe_impl="grouped"), nnx.LoRAParam, tokens)
    errors = {}
    for sizes in MESHES:
        mesh = sharding.make_mesh(*sizes)
        model = lora_model(moe_impl="grouped")
        sharding.shard_model(model, mesh)
        with jax.set_mesh(mesh):
            placed = sharding.place(np.asarray(tokens), sharding.named(mesh, ("batch", None)))
            got = gradients(model, nnx.LoRAParam, placed)
        errors[str(sizes)] = max(float(np.abs(got[p] - r).max() / (np.abs(r).max() + 1e-30)) for p, r in reference.items())
    print(json.dumps(errors))


if __name__ == "__main__":
    main()
