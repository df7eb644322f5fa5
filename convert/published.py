"""Checkpoints in a published layout: config.json plus safetensors shards, as OpenAI and Hugging Face ship them.

Two sources fill one: random weights (`convert.synthetic`, for tests and benchmarks) and a model's own
weights (`save`, which exports a fine-tune so that transformers, vLLM and llama.cpp's converter can read it).
Either way every tensor is written chunk by chunk in file order, so memory stays at one chunk.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tqdm
from flax import nnx

from convert import layouts, safetensors_io
from convert.sources import INDEX
from gptoss_jax.config import GptOssConfig

SHARD_BYTES = 4_800_000_000  # the HF converter's shard cap

Contents = Callable[[layouts.Tensor], Iterator[np.ndarray]]  # a tensor's values, in chunks of rows


def write(
    dst: Path, config: GptOssConfig, contents: Contents, *, layout: str = "hf", dense_experts: bool = False,
    progress: bool | None = None,
) -> int:
    """Writes config.json and the safetensors files of `layout` into `dst`; returns tensor bytes written.

    `dense_experts` is the Hugging Face layout with bf16 experts, as fine-tunes ship. `progress=None`
    shows a bar only on a terminal.
    """
    tensors = layouts.checkpoint_tensors(config, layout, "bf16" if dense_experts else "mxfp4")
    dst.mkdir(parents=True, exist_ok=True)
    hf_config = config.to_hf_dict()
    if layout == "hf" and not dense_experts:
        hf_config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(hf_config if layout == "hf" else config.to_original_dict(), indent=2))
    shards = _shards(tensors)
    names = _shard_names(layout, len(shards))
    total = sum(int(np.prod(t.shape)) * safetensors_io.DTYPES[t.dtype].itemsize for t in tensors)
    by_name = {t.name: t for t in tensors}
    written = 0
    with tqdm.tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=None if progress is None else not progress) as bar:
        def chunks(planned: safetensors_io.PlannedTensor) -> Iterator[np.ndarray]:
            for chunk in contents(by_name[planned.name]):
                bar.update(chunk.size * safetensors_io.DTYPES[planned.dtype].itemsize)
                yield chunk

        for name, shard in zip(names, shards):
            plan = [safetensors_io.PlannedTensor(t.name, t.dtype, t.shape) for t in shard]
            written += safetensors_io.write(dst / name, plan, chunks)
    if layout == "hf":
        weight_map = {t.name: name for name, shard in zip(names, shards) for t in shard}
        (dst / INDEX).write_text(json.dumps({"metadata": {"total_size": written}, "weight_map": weight_map}, indent=2))
    else:
        dtypes = {t.name: {"blocks": "FP4", "scales": "UE8"}.get(t.name.rsplit(".", 1)[-1], "BF16") for t in tensors}
        (dst / "dtypes.json").write_text(json.dumps(dtypes, indent=2))
    return written


def save(model, dst: str | Path, *, layout: str = "hf", progress: bool | None = None) -> int:
    """Writes `model` (a `GptOss` without adapters) in a published layout to `dst`, which must not exist.

    Weights are stored in bf16, the published dtype; packed experts keep their exact bytes, dense ones
    become the Hugging Face `[E, in, out]` tensors. The folder appears only once complete.
    """
    dst = Path(dst)
    arrays = model_arrays(model, dst)
    dense = model.expert_format == "bf16"
    if dense and layout != "hf":
        raise ValueError("dense bf16 experts exist only in the hf layout")
    staging = dst.parent / f".{dst.name}.incomplete"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        written = write(staging, model.config, lambda tensor: iter([layouts.assemble(arrays, tensor)]),
                        layout=layout, dense_experts=dense, progress=progress)
        os.rename(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def model_arrays(model, dst: Path) -> dict[layouts.ParamPath, np.ndarray]:
    """`{path: array}` of a model about to be exported to `dst`; refuses unmerged adapters and an existing `dst`."""
    params = {tuple(str(k) for k in path): v for path, v in nnx.to_flat_state(nnx.state(model))}
    adapters = sorted(".".join(path) for path in params if any(part.endswith("_lora") for part in path))
    if adapters:
        raise ValueError(f"the model still has LoRA adapters ({adapters[0]}, ...): merge them first (lora.merge_lora)")
    if dst.exists():
        raise ValueError(f"{dst} exists; choose a new destination")
    return {path: np.asarray(variable.get_value()) for path, variable in params.items()}


def _shards(tensors: list[layouts.Tensor]) -> list[list[layouts.Tensor]]:
    shards, size = [[]], 0
    for tensor in tensors:
        nbytes = int(np.prod(tensor.shape)) * safetensors_io.DTYPES[tensor.dtype].itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    return shards


def _shard_names(layout: str, count: int) -> list[str]:
    """The published names: HF numbers from 0 and writes the last index; original uses a double dash."""
    if layout == "hf":
        return [f"model-{i:05d}-of-{count - 1:05d}.safetensors" for i in range(count)]
    if count == 1:
        return ["model.safetensors"]
    return [f"model--{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
