"""A small GGUF v3 reader for the tests, written from the format's description (ggml docs/gguf.md).

gguf-py's `GGUFReader` takes minutes over gpt-oss's 650k tokenizer strings; this one reads the file in
seconds: little endian only, and each tensor's raw bytes with its ggml type and `ne`.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import numpy as np

# GGUF value types: their struct formats (scalars) and numpy dtypes (arrays); 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
# ggml tensor types: (name, values per block, bytes per block)
TYPES = {0: ("F32", 1, 4), 30: ("BF16", 1, 2), 39: ("MXFP4", 32, 17)}


@dataclasses.dataclass(frozen=True)
class Tensor:
    type: str
    ne: tuple[int, ...]  # innermost first: numpy's shape reversed
    data: bytes


@dataclasses.dataclass(frozen=True)
class Gguf:
    kv: dict[str, Any]  # in file order; arrays of numbers as numpy arrays, of strings as lists
    kv_types: dict[str, tuple[int, ...]]  # (value type,) or (ARRAY, element type)
    tensors: dict[str, Tensor]  # in file order


def read(path: Path) -> Gguf:
    buffer = Path(path).read_bytes()
    if buffer[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buffer, 4)
    if version != 3:
        raise ValueError(f"{path}: GGUF version {version}, this reader knows 3")
    offset = 24

    def unpack(fmt: str) -> tuple:
        nonlocal offset
        values = struct.unpack_from("<" + fmt, buffer, offset)
        offset += struct.calcsize("<" + fmt)
        return values

    def string() -> str:
        nonlocal offset
        (length,) = unpack("Q")
        offset += length
        return buffer[offset - length : offset].decode("utf-8")

    def value(kind: int) -> Any:
        nonlocal offset
        if kind == STRING:
            return string()
        if kind != ARRAY:
            return unpack(_SCALARS[kind])[0]
        element, count = unpack("IQ")
        if element == STRING:
            return [string() for _ in range(count)]
        array = np.frombuffer(buffer, np.dtype("<" + _SCALARS[element]), count, offset).copy()
        offset += array.nbytes
        return array

    kv, kv_types = {}, {}
    for _ in range(n_kv):
        key = string()
        (kind,) = unpack("I")
        kv_types[key] = (kind,) if kind != ARRAY else (ARRAY, struct.unpack_from("<I", buffer, offset)[0])
        kv[key] = value(kind)
    infos = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = unpack("I")
        ne = unpack(f"{n_dims}Q")
        kind, start = unpack("IQ")
        infos.append((name, kind, ne, start))
    alignment = kv.get("general.alignment", 32)
    data_start = -(-offset // alignment) * alignment
    tensors = {}
    for name, kind, ne, start in infos:
        type_name, per_block, block_bytes = TYPES[kind]
        nbytes = int(np.prod(ne)) // per_block * block_bytes
        tensors[name] = Tensor(type_name, tuple(ne), buffer[data_start + start : data_start + start + nbytes])
    return Gguf(kv, kv_types, tensors)
