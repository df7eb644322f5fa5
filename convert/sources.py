"""Finding and checking a published checkpoint on disk: its layout, config, files and tensors.

Everything is checked before anything is written: each expected tensor's presence, shape and dtype
(against the config), no extra tensors, no truncated file, no shard named by the index but missing,
and no E8M0 scale byte of 255 (NaN).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from convert import layouts
from convert.safetensors_io import CheckpointError, StoredTensor, read_header
from gptoss_jax import mxfp4
from gptoss_jax.checkpoint import row_chunks
from gptoss_jax.config import GptOssConfig

INDEX = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class Source:
    layout: str  # "hf" or "original"
    directory: Path
    config: GptOssConfig
    stored: dict[str, StoredTensor]
    dense_experts: bool  # HF layout with experts dequantized to bf16 (fine-tunes, re-uploads)

    @property
    def expert_format(self) -> str:
        return "bf16" if self.dense_experts else "mxfp4"

    def expected(self) -> list[layouts.Tensor]:
        return layouts.checkpoint_tensors(self.config, self.layout, self.expert_format)


def open_source(src: Path, layout: str = "auto") -> Source:
    """Detects the layout (or takes `layout`), reads the config and every file header, and checks them."""
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    directory, layout = _locate(src, layout)
    config = GptOssConfig.from_pretrained(directory / "config.json")
    raw_config = json.loads((directory / "config.json").read_text())
    stored = _stored_tensors(directory, layout)
    dense = layout == "hf" and "quantization_config" not in raw_config and not any(n.endswith("_blocks") for n in stored)
    source = Source(layout, directory, config, stored, dense)
    _check_tensors(source)
    return source


def _locate(src: Path, layout: str) -> tuple[Path, str]:
    if layout not in ("auto", *layouts.LAYOUTS):
        raise CheckpointError(f"unknown --format {layout!r}; choose auto, hf or original")
    candidates = [(src, _layout_of(src)), (src / "original", _layout_of(src / "original"))]
    for directory, found in candidates:
        if found is not None and layout in ("auto", found):
            return directory, found
    raise CheckpointError(
        f"{src}: unknown layout: expected config.json beside *.safetensors files in the Hugging Face layout "
        f"(repo root) or the original layout (`original/`){'' if layout == 'auto' else f' for --format {layout}'}"
    )


def _layout_of(directory: Path) -> str | None:
    """'hf' or 'original' from the config.json keys, if the folder holds a config and safetensors."""
    config = directory / "config.json"
    if not config.is_file() or not any(directory.glob("*.safetensors")):
        return None
    try:
        raw = json.loads(config.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config}: not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config} must hold a JSON object, got {type(raw).__name__}")
    return "hf" if "model_type" in raw or "num_local_experts" in raw else "original"


def _stored_tensors(directory: Path, layout: str) -> dict[str, StoredTensor]:
    index = directory / INDEX
    if layout == "hf" and index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index}: malformed index: {error}") from None
        files = _shard_files(index, weight_map)
        for name in files:
            if not (directory / name).is_file():
                raise CheckpointError(f"{index} names shard {name}, which is missing from {directory}")
    else:
        weight_map, files = None, sorted(p.name for p in directory.glob("*.safetensors"))
    stored: dict[str, StoredTensor] = {}
    for name in files:
        for tensor_name, tensor in read_header(directory / name).items():
            if tensor_name in stored:
                raise CheckpointError(f"tensor {tensor_name} is stored twice: in {stored[tensor_name].file.name} and {name}")
            stored[tensor_name] = tensor
    if weight_map is not None:
        for tensor_name, file_name in weight_map.items():
            if tensor_name not in stored or stored[tensor_name].file.name != file_name:
                raise CheckpointError(f"{index} puts tensor {tensor_name} in {file_name}, which does not hold it")
    return stored


def _shard_files(index: Path, weight_map: object) -> list[str]:
    """The shard names an index's weight_map uses, each a plain file name inside the checkpoint folder
    (never a path out of it: `../x`, `/proc/self/mem`). A name may be a symlink, as the HF cache makes."""
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map):
        raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
    files = set(weight_map.values())
    for name in files:
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            raise CheckpointError(f"{index}: {name!r} is not a file name inside {index.parent}")
    return sorted(files)


def _check_tensors(source: Source) -> None:
    """Reports every missing, extra or mis-shaped tensor at once, then scans the scales for NaN."""
    expected = {t.name: t for t in source.expected()}
    problems = [f"missing tensor {name}" for name in expected if name not in source.stored]
    problems += [f"unexpected tensor {name} in {t.file.name}" for name, t in source.stored.items() if name not in expected]
    for name, want in expected.items():
        have = source.stored.get(name)
        if have is not None and (have.shape != want.shape or have.dtype != want.dtype):
            problems.append(
                f"tensor {name} in {have.file.name} is {have.dtype}{list(have.shape)}, "
                f"the config implies {want.dtype}{list(want.shape)}"
            )
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointError(f"{source.directory} does not match its config.json:\n  " + "\n  ".join(shown))
    for name, tensor in source.stored.items():
        if name.endswith("scales") and _contains(tensor, mxfp4.SCALE_NAN):
            raise CheckpointError(f"tensor {name} in {tensor.file.name} holds scale byte {mxfp4.SCALE_NAN} (NaN in E8M0)")


def _contains(tensor: StoredTensor, byte: int) -> bool:
    row_bytes = tensor.nbytes // tensor.shape[0]
    return any(np.any(tensor.read(start, stop) == byte) for start, stop in row_chunks(tensor.shape[0], row_bytes))
