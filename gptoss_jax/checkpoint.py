"""Converted checkpoints: an Orbax checkpoint of the parameter tree, with the config beside it.

Layout of a converted checkpoint directory:
  config.json       the model config (our field names; `GptOssConfig.from_pretrained` reads it)
  gptoss_jax.json   format marker and provenance (source layout)
  params/           Orbax checkpoint; stacked parameters are stored one leaf per layer
                    (`{"sliding_blocks": {"mlp": {"mlp1_blocks": {"0": ..., "1": ...}}}}`)

Per-layer leaves let the converter stream a checkpoint tensor by tensor (Orbax partial saves) with
memory bounded by one tensor, and let `load` fill each stacked parameter layer by layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx

from gptoss_jax.config import GptOssConfig
from gptoss_jax.model import GptOss

FORMAT = "gptoss-jax/1"
MARKER = "gptoss_jax.json"
PARAMS = "params"
ParamPath = tuple[str, ...]
STACKS = ("sliding_blocks", "full_blocks")  # parameters stacked on a leading layer axis


def _nest(items: Iterable[tuple[ParamPath, int | None, Any]]) -> dict[str, Any]:
    """`[(path, layer, value)]` -> the nested dict Orbax stores (a layer index is one more key)."""
    tree: dict[str, Any] = {}
    for path, layer, value in items:
        keys = [*path, str(layer)] if layer is not None else list(path)
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return tree


class PartialWriter:
    """Writes a converted checkpoint into `directory` one batch of parameter pieces at a time."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True)

    def write(self, items: Iterable[tuple[ParamPath, int | None, np.ndarray]]) -> None:
        ocp.partial.save(self.directory / PARAMS, _nest(items))

    def finish(self, config: GptOssConfig, provenance: dict[str, Any]) -> None:
        ocp.partial.finalize(self.directory / PARAMS)
        (self.directory / "config.json").write_text(json.dumps(config.to_original_dict(), indent=2) + "\n")
        (self.directory / MARKER).write_text(json.dumps({"format": FORMAT, **provenance}, indent=2) + "\n")


def save(model: GptOss, directory: str | Path, provenance: dict[str, Any] | None = None) -> None:
    """Saves a model in the converted-checkpoint format (the directory must not exist)."""
    writer = PartialWriter(Path(directory))
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        value = np.asarray(variable[...])
        path = tuple(str(p) for p in path)
        if path[0] in STACKS:
            writer.write((path, layer, value[layer]) for layer in range(value.shape[0]))
        else:
            writer.write([(path, None, value)])
    writer.finish(model.config, provenance or {"source": "gptoss_jax.save"})


def load(path: str | Path, *, dtype: str | jnp.dtype | None = None) -> GptOss:
    """Restores a converted checkpoint into a `GptOss`; `dtype="float32"` gives the float32 parity mode.

    Parameters are filled one at a time, so the peak is the model plus one stacked parameter.
    """
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file() or json.loads(marker.read_text()).get("format") != FORMAT:
        raise ValueError(f"{path} is not a converted gptoss-jax checkpoint (no {MARKER} with format {FORMAT})")
    config = GptOssConfig.from_pretrained(path / "config.json")
    dtype = jnp.dtype(dtype or jnp.bfloat16)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GptOss(config, rngs=nnx.Rngs(0), dtype=dtype)))
    stored = ocp.metadata(path / PARAMS).metadata
    context = ocp.Context()
    context.pytree.loading.partial_load = True  # one parameter's leaves at a time
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    flat = nnx.to_flat_state(state)
    for param_path, variable in flat:
        param_path = tuple(str(p) for p in param_path)
        shape, target_dtype = variable.get_value().shape, variable.get_value().dtype
        layers = range(shape[0]) if param_path[0] in STACKS else [None]
        leaf_shape = shape[1:] if param_path[0] in STACKS else shape
        stored_dtype = _stored_leaf(stored, param_path, layers[0]).dtype
        if tuple(_stored_leaf(stored, param_path, layers[0]).shape) != leaf_shape:
            raise ValueError(f"{path}: parameter {'.'.join(param_path)} is stored with a shape other than {leaf_shape}")
        leaf = jax.ShapeDtypeStruct(leaf_shape, stored_dtype, sharding=device)
        abstract = _nest((param_path, layer, leaf) for layer in layers)
        with context:
            restored = ocp.load(path / PARAMS, abstract)
        pieces = [_stored_leaf(restored, param_path, layer) for layer in layers]
        value = jnp.stack(pieces) if layers[0] is not None else pieces[0]
        variable.set_value(value.astype(target_dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _stored_leaf(tree: dict[str, Any], path: ParamPath, layer: int | None) -> Any:
    node = tree
    for key in [*path, str(layer)] if layer is not None else path:
        node = node[key]
    return node
