"""Safetensors read (memory-mapped, raw bytes) and streamed write.

The `safetensors` package cannot hand bf16 to numpy and writes only whole in-memory dicts, so the
format (8-byte little-endian header length, JSON header, raw little-endian data; SPEC section 4) is
read and written here directly. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "U8": np.dtype(np.uint8), "F32": np.dtype(np.float32)}
_MAX_HEADER = 100 * 2**20


class CheckpointError(ValueError):
    """A checkpoint file or tensor is not what it should be; the message names which."""


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes sit in a safetensors file."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) with their bytes exactly as stored, nothing converted.

        Read into a private buffer rather than memory-mapped: mapped pages stay resident while the
        map lives, which would make a streamed conversion's memory grow with the file.
        """
        stop = self.shape[0] if stop is None else stop
        row_bytes = self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes
        out = np.empty((stop - start, *self.shape[1:]) if self.shape else (), DTYPES[self.dtype])
        with open(self.file, "rb", buffering=0) as handle:
            handle.seek(self.offset + start * row_bytes)
            if handle.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
                raise CheckpointError(f"{self.file}: tensor {self.name}: file ended early")
        return out


def read_header(file: Path) -> dict[str, StoredTensor]:
    """The tensors a safetensors file holds, after checking the header and that no data is cut off."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{file}: not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{file}: corrupt or truncated safetensors header (claims {header_len} bytes)")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{file}: corrupt safetensors header: {error}") from None
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {name}: malformed header entry {entry}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{file}: tensor {name}: unsupported dtype {dtype}")
        if end - begin != int(np.prod(shape)) * DTYPES[dtype].itemsize or begin < 0:
            raise CheckpointError(f"{file}: tensor {name}: data offsets {begin}..{end} do not fit shape {shape} {dtype}")
        if data_start + end > size:
            raise CheckpointError(f"{file}: truncated: tensor {name} ends at byte {data_start + end}, file has {size}")
        tensors[name] = StoredTensor(file, name, dtype, shape, data_start + begin, end - begin)
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
