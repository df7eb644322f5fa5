"""Safetensors: reading through the `safetensors` library, and a streamed writer.

Reading uses `safetensors.safe_open`, which parses and validates each header (JSON, dtypes, offsets
that fit the shapes and do not overlap, data that covers the file exactly) and reads row ranges
through lazy slices; its errors are re-raised as `CheckpointError` naming the file. Nothing is ever
unpickled.

BF16 with numpy: safetensors builds a bf16 array by asking numpy for the dtype named "bfloat16",
which exists only once `ml_dtypes` is imported (without it: "data type 'bfloat16' not
understood"). This module imports `ml_dtypes`, so `framework="numpy"` returns bf16 tensors with
their stored bits, no torch or jax needed.

Writing stays here: the library writes only whole in-memory dicts (`save_file`, `serialize_file`),
so a multi-GB shard would have to sit in memory at once. `write` streams the format (8-byte
little-endian header length, JSON header, raw little-endian data; SPEC section 4) tensor by tensor.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import ml_dtypes  # registers numpy's "bfloat16" dtype, which safetensors' numpy reader needs
import numpy as np
import safetensors

DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "U8": np.dtype(np.uint8), "F32": np.dtype(np.float32)}


class CheckpointError(ValueError):
    """A checkpoint file or tensor is not what it should be; the message names which."""


def _open(file: Path) -> safetensors.safe_open:
    """The library's reader for `file` (to use in a `with`), its validation errors as `CheckpointError`.

    The default `mmap` backend: a slice copies only its own rows out of the map (safetensors 0.8's
    `pread` backend reads the whole tensor for any slice: 1.16 GB read for 10 rows of the 20b
    embedding, measured). Each read opens the file afresh, so no mapping outlives one chunk: reading
    a 3.3 GB shard in 64 MiB chunks peaked at 179 MB resident this way, 3.2 GB through one handle
    held open (its mapped pages stay resident). An open costs a header parse, about 0.5 ms.
    """
    try:
        return safetensors.safe_open(file, framework="numpy")
    except safetensors.SafetensorError as error:
        reason = str(error).removeprefix("Error while deserializing header: ")
        raise CheckpointError(f"{file}: not a valid safetensors file (truncated or corrupt): {reason}") from None
    except OSError as error:
        raise CheckpointError(f"{file}: cannot read: {error.strerror or error}") from None


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file, read lazily."""

    file: Path
    name: str
    dtype: str  # the safetensors dtype code: "BF16", "U8" or "F32"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * DTYPES[self.dtype].itemsize

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) with their bytes exactly as stored (a fresh array, nothing converted)."""
        with _open(self.file) as handle:
            try:
                return handle.get_slice(self.name)[start:stop]
            except safetensors.SafetensorError as error:
                raise CheckpointError(f"{self.file}: tensor {self.name}: {error}") from None


def read_header(file: Path) -> dict[str, StoredTensor]:
    """The tensors a safetensors file holds, once the library has validated its header against the file."""
    tensors = {}
    with _open(file) as handle:
        for name in handle.offset_keys():
            view = handle.get_slice(name)
            dtype = view.get_dtype()
            if dtype not in DTYPES:
                raise CheckpointError(f"{file}: tensor {name}: unsupported dtype {dtype}")
            tensors[name] = StoredTensor(file, name, dtype, tuple(view.get_shape()))
    return tensors


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]


def write(
    file: Path, tensors: Iterable[PlannedTensor], chunks: Callable[[PlannedTensor], Iterator[np.ndarray]]
) -> int:
    """Writes a safetensors file tensor by tensor: the header first, then each tensor's chunks in order.

    `chunks(t)` yields arrays whose bytes, concatenated, are tensor t; memory stays at one chunk.
    Returns the bytes of tensor data written.
    """
    tensors = list(tensors)
    header, offset = {}, 0
    for tensor in tensors:
        nbytes = int(np.prod(tensor.shape)) * DTYPES[tensor.dtype].itemsize
        header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep the data 8-byte aligned, as the reference writer does
    with open(file, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for tensor in tensors:
            written = 0
            for chunk in chunks(tensor):
                chunk = np.ascontiguousarray(chunk, DTYPES[tensor.dtype])
                handle.write(chunk.tobytes())
                written += chunk.nbytes
            if written != header[tensor.name]["data_offsets"][1] - header[tensor.name]["data_offsets"][0]:
                raise RuntimeError(f"{tensor.name}: wrote {written} bytes, planned a different size")
    return offset
