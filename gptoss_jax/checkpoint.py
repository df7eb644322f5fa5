"""Converted checkpoints: an Orbax checkpoint of the parameter tree, with the config beside it.

Layout of a converted checkpoint directory:
  config.json       the model config (our field names; `GptOssConfig.from_pretrained` reads it)
  gptoss_jax.json   format marker and provenance (source layout)
  params/           Orbax checkpoint. Each parameter is stored per layer (stacked parameters) and in
                    row chunks of at most `CHUNK_BYTES`: {"sliding_blocks": {"mlp": {"mlp1_blocks":
                    {"0": {"0": rows, "1": rows, ...}, "1": ...}}}}; unstacked ones skip the layer key.

Per-layer, chunked leaves let the converter stream a checkpoint (Orbax partial saves) with memory
bounded by a chunk, and let `load` fill each stacked parameter layer by layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gptoss_jax import sharding
from gptoss_jax.config import GptOssConfig
from gptoss_jax.model import GptOss

FORMAT = "gptoss-jax/1"
MARKER = "gptoss_jax.json"
PARAMS = "params"
CHUNK_BYTES = 64 * 2**20  # largest stored leaf
BATCH_BYTES = 128 * 2**20  # data per Orbax partial save: fewer saves are faster, smaller ones use less memory
STACKS = ("sliding_blocks", "full_blocks")  # parameters stacked on a leading layer axis
ParamPath = tuple[str, ...]


def row_chunks(rows: int, row_bytes: int) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges of at most CHUNK_BYTES (at least one row each)."""
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


def _keys(path: ParamPath, layer: int | None, chunk: int | None = None) -> list[str]:
    keys = [*path] + ([str(layer)] if layer is not None else [])
    return keys + ([str(chunk)] if chunk is not None else [])


def _nest(items: list[tuple[list[str], Any]]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for keys, value in items:
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return tree


def _get(tree: dict[str, Any], keys: list[str]) -> Any:
    for key in keys:
        tree = tree[key]
    return tree


class PartialWriter:
    """Writes a converted checkpoint into `directory`, a batch of chunks per Orbax partial save."""

    def __init__(self, directory: Path):
        self.directory = directory.absolute()
        self._pending: list[tuple[list[str], np.ndarray]] = []
        self._pending_bytes = 0
        self.directory.mkdir(parents=True)

    def add(self, path: ParamPath, layer: int | None, chunk: int, rows: np.ndarray) -> None:
        self._pending.append((_keys(path, layer, chunk), rows))
        self._pending_bytes += rows.nbytes
        if self._pending_bytes >= BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            ocp.partial.save(self.directory / PARAMS, _nest(self._pending))
        self._pending, self._pending_bytes = [], 0

    def finish(self, config: GptOssConfig, provenance: dict[str, Any]) -> None:
        self._flush()
        ocp.partial.finalize(self.directory / PARAMS)
        (self.directory / "config.json").write_text(json.dumps(config.to_original_dict(), indent=2) + "\n")
        (self.directory / MARKER).write_text(json.dumps({"format": FORMAT, **provenance}, indent=2) + "\n")


def save(model: GptOss, directory: str | Path, provenance: dict[str, Any] | None = None) -> None:
    """Saves a model in the converted-checkpoint format (the directory must not exist)."""
    writer = PartialWriter(Path(directory))
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        path, value = tuple(str(p) for p in path), np.asarray(variable.get_value())
        for layer in range(value.shape[0]) if path[0] in STACKS else [None]:
            leaf = value if layer is None else value[layer]
            for chunk, (start, stop) in enumerate(row_chunks(leaf.shape[0], leaf[:1].nbytes)):
                writer.add(path, layer, chunk, leaf[start:stop])
    writer.finish(model.config, {"expert_format": model.expert_format, **(provenance or {"source": "gptoss_jax.save"})})


@jax.jit(donate_argnums=0)
def _set_layer(stacked: jax.Array, layer_value: jax.Array, layer: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked, layer_value.astype(stacked.dtype), layer, 0)


def load(path: str | Path, *, dtype: str | jnp.dtype | None = None, mesh: Mesh | None = None) -> GptOss:
    """Restores a converted checkpoint into a `GptOss`; `dtype="float32"` gives the float32 parity mode.

    Each stacked parameter is filled in place one layer at a time, so the peak is the model plus a
    layer's piece of one parameter. With a `mesh` every parameter is built directly on it: each
    device receives only its shard (see `sharding.RULES`).
    """
    path = Path(path).absolute()  # Orbax wants absolute paths
    marker = path / MARKER
    metadata = json.loads(marker.read_text()) if marker.is_file() else {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a converted gptoss-jax checkpoint (no {MARKER} with format {FORMAT})")
    config = GptOssConfig.from_pretrained(path / "config.json")
    if mesh is not None:
        sharding.check_fits(dict(mesh.shape), config)
    dtype = jnp.dtype(dtype or jnp.bfloat16)
    expert_format = metadata.get("expert_format", "mxfp4")
    abstract = nnx.eval_shape(lambda: GptOss(config, rngs=nnx.Rngs(0), dtype=dtype, expert_format=expert_format))
    graphdef, state = nnx.split(abstract)
    stored = ocp.metadata(path / PARAMS).metadata
    context = ocp.Context()
    context.pytree.loading.partial_load = True  # one layer of one parameter at a time
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    flat = nnx.to_flat_state(state)
    for param_path, variable in flat:
        param_path = tuple(str(p) for p in param_path)
        target = variable.get_value()
        stacked = param_path[0] in STACKS
        placement = NamedSharding(mesh, sharding.variable_spec(variable)) if mesh is not None else device
        value = jnp.zeros(target.shape, target.dtype, device=placement) if stacked else None
        for layer in range(target.shape[0]) if stacked else [None]:
            keys = _keys(param_path, layer)
            try:
                chunks = _get(stored, keys)
            except KeyError:
                raise ValueError(f"{path}: parameter {'/'.join(keys)} is missing") from None
            abstract = _nest([(keys + [c], jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)) for c, m in chunks.items()])
            with context:
                pieces = _get(ocp.load(path / PARAMS, abstract), keys)
            layer_value = jnp.concatenate([pieces[str(c)] for c in range(len(pieces))])
            expected = target.shape[1:] if stacked else target.shape
            if layer_value.shape != expected:
                raise ValueError(f"{path}: parameter {'/'.join(keys)} has shape {layer_value.shape}, the config implies {expected}")
            if mesh is not None:  # each device takes only its slice of this layer
                layer_spec = placement.spec[1:] if stacked else placement.spec
                layer_value = sharding.place(np.asarray(layer_value), NamedSharding(mesh, PartitionSpec(*layer_spec)))
            value = _set_layer(value, layer_value, layer) if stacked else layer_value.astype(target.dtype)
        variable.set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
