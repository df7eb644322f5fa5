"""Published checkpoint -> converted Orbax checkpoint, streamed tensor by tensor, all or nothing.

Bytes are copied, never re-encoded: MXFP4 blocks and scales and bf16 tensors keep their exact bits
(only reshaped into the parameter tree). Dense bf16 experts (fine-tunes) are packed to MXFP4 on
request. Everything is written into a hidden sibling of DST that is renamed into place on success,
so a failure or a kill never leaves anything at DST.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import numpy as np
import tqdm
from flax import nnx

from convert.safetensors_io import CheckpointError
from convert.sources import Source, open_source
from gptoss_jax import layouts, mxfp4
from gptoss_jax.checkpoint import STACKS, PartialWriter
from gptoss_jax.config import GptOssConfig
from gptoss_jax.model import GptOss


@dataclasses.dataclass(frozen=True)
class Summary:
    tensors: int
    bytes: int
    seconds: float
    layout: str

    def __str__(self) -> str:
        rate = self.bytes / max(self.seconds, 1e-9) / 1e6
        return f"converted {self.tensors} tensors ({self.bytes / 1e9:.2f} GB, {self.layout} layout) in {self.seconds:.1f} s, {rate:.0f} MB/s"


def convert(
    src: Path, dst: Path, *, layout: str = "auto", overwrite: bool = False, quantize: str | None = None,
    progress: bool | None = None,
) -> Summary:
    """Converts the checkpoint at `src` into `dst`. `progress=None` shows a bar only on a terminal."""
    start = time.perf_counter()
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst} already exists; pass --overwrite to replace it")
    source = open_source(src, layout)
    if source.dense_experts and quantize != "mxfp4":
        raise CheckpointError(
            f"{source.directory} holds dense bf16 experts (no quantization_config); pass --quantize mxfp4 "
            "to pack them (the model runs MXFP4 experts)"
        )
    leaf_shapes = _leaf_shapes(source.config)
    staging = dst.parent / f".{dst.name}.incomplete"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    expected = source.expected()
    total = sum(source.stored[t.name].nbytes for t in expected)
    try:
        writer = PartialWriter(staging)
        disable = None if progress is None else not progress
        with tqdm.tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=disable) as bar:
            for done, tensor in enumerate(expected, 1):
                value = source.stored[tensor.name].read()
                writer.write(_pieces(tensor, value, leaf_shapes, dense=source.dense_experts))
                bar.update(value.nbytes)
                bar.set_postfix_str(f"{done}/{len(expected)} tensors")
        writer.finish(source.config, {"source": str(src.resolve()), "source_layout": source.layout})
        _replace(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Summary(len(expected), total, time.perf_counter() - start, source.layout)


def _leaf_shapes(config: GptOssConfig) -> dict[layouts.ParamPath, tuple[int, ...]]:
    """Per-layer shape of every parameter (stacked parameters without their layer axis)."""
    abstract = nnx.eval_shape(lambda: GptOss(config, rngs=nnx.Rngs(0)))
    shapes = {}
    for path, variable in nnx.to_flat_state(nnx.state(abstract)):
        path = tuple(str(p) for p in path)
        shape = variable.get_value().shape
        shapes[path] = shape[1:] if path[0] in STACKS else shape
    return shapes


def _pieces(tensor: layouts.Tensor, value: np.ndarray, leaf_shapes, *, dense: bool):
    """(param path, layer, array) pieces of one checkpoint tensor, as views of its bytes where possible."""
    if dense and tensor.targets[0].path[-1].endswith("_blocks"):
        (target,) = tensor.targets
        # One expert at a time ([in, out] -> [out, in]), so float32 copies stay small.
        packed = [mxfp4.quantize(np.asarray(expert, np.float32).T) for expert in value]
        blocks, scales = np.stack([b for b, _ in packed]), np.stack([s for _, s in packed])
        scales_path = (*target.path[:-1], target.path[-1].replace("_blocks", "_scales"))
        return [(target.path, target.layer, blocks), (scales_path, target.layer, scales)]
    pieces = []
    layouts.place(tensor, value, lambda t, rows: pieces.append((t.path, t.layer, rows.reshape(leaf_shapes[t.path]))))
    return pieces


def _replace(staging: Path, dst: Path) -> None:
    """Moves the finished checkpoint to `dst`, replacing an old one only once the new one is complete."""
    if dst.exists():
        retired = dst.parent / f".{dst.name}.replaced"
        shutil.rmtree(retired, ignore_errors=True)
        os.rename(dst, retired)
        os.rename(staging, dst)
        shutil.rmtree(retired)
    else:
        os.rename(staging, dst)
