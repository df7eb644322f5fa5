"""Published checkpoint -> converted Orbax checkpoint, streamed tensor by tensor, all or nothing.

Bytes are copied, never re-encoded: MXFP4 blocks and scales and bf16 tensors keep their exact bits
(only reshaped into the parameter tree; dense bf16 experts also transposed to our `[E, out, in]`).
Dense bf16 experts (fine-tunes) are packed to MXFP4 on request. Everything is written into a hidden
sibling of DST that is renamed into place on success, so a failure or a kill never leaves anything at DST.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tqdm
from flax import nnx

from convert import layouts
from convert.safetensors_io import CheckpointError, StoredTensor
from convert.sources import Source, open_source
from gptoss_jax import mxfp4
from gptoss_jax.checkpoint import STACKS, PartialWriter, quiet_orbax, row_chunks
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
    _check_destination(src, dst, overwrite)
    source = open_source(src, layout)
    if quantize is not None and not source.dense_experts:
        raise CheckpointError(f"{source.directory} already holds MXFP4 experts; --quantize applies to dense bf16 experts")
    pack = source.dense_experts and quantize == "mxfp4"
    staging = dst.parent / f".{dst.name}.incomplete"
    expected = source.expected()
    total = sum(source.stored[t.name].nbytes for t in expected)
    with destination_lock(dst), _write_errors(dst):
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
        _check_space(dst, total)
        _write(source, staging, dst, expected, total, pack, progress)
    return Summary(len(expected), total, time.perf_counter() - start, source.layout)


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuses destinations whose replacement would destroy the source, and non-folders."""
    source, target = src.resolve(), dst.resolve()
    if target == source:
        raise CheckpointError(f"{dst} is the source; write the converted checkpoint somewhere else")
    if target in source.parents:
        raise CheckpointError(f"the source {src} is inside the destination {dst}; write somewhere else")
    if source in target.parents:
        raise CheckpointError(f"the destination {dst} is inside the source {src}; write somewhere else")
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{dst} is a file; the destination must be a folder")
    if target.exists() and not overwrite:
        raise CheckpointError(f"{dst} already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def destination_lock(dst: Path) -> Iterator[None]:
    """Holds `.DST.lock` beside DST for the conversion, so two conversions never write one DST at once."""
    lock = dst.parent / f".{dst.name}.lock"
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a+")
    except OSError as error:
        raise CheckpointError(f"cannot write {dst}: {error.strerror or error}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise CheckpointError(f"another conversion (pid {holder}) is writing {dst}; wait for it or stop it") from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)


@contextlib.contextmanager
def _write_errors(dst: Path) -> Iterator[None]:
    """An OS error while writing (disk full, no permission) as one line naming DST (Orbax's writer threads,
    which would log it again with their tracebacks, are kept quiet)."""
    try:
        with quiet_orbax():
            yield
    except OSError as error:
        raise CheckpointError(f"cannot write {dst}: {error.strerror or error}") from None
    except ValueError as error:  # tensorstore reports a failed write with the OS error code in its text
        code = re.search(r"os_error_code='(\d+)'", str(error))
        if code is None:
            raise
        raise CheckpointError(f"cannot write {dst}: {os.strerror(int(code[1]))}") from None


def _check_space(dst: Path, needed: int) -> None:
    """Refuses at once, rather than after writing most of it, a checkpoint the disk has no room for."""
    free = shutil.disk_usage(dst.parent).free
    if needed > free:
        raise CheckpointError(f"cannot write {dst}: it needs {needed / 1e9:.2f} GB and {dst.parent} has {free / 1e9:.2f} GB free")


def _write(source: Source, staging: Path, dst: Path, expected: list[layouts.Tensor], total: int, pack: bool,
           progress: bool | None) -> None:
    """Writes every tensor into `staging`, then moves it to `dst`; on any failure or interrupt, removes it."""
    leaf_shapes = _leaf_shapes(source.config, source.expert_format)
    try:
        writer = PartialWriter(staging)
        disable = None if progress is None else not progress
        with tqdm.tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=disable) as bar:
            for done, tensor in enumerate(expected, 1):
                stored = source.stored[tensor.name]
                for target, rows in _chunks(tensor, stored, leaf_shapes, pack=pack):
                    writer.add(*target)
                    bar.update(rows)
                bar.set_postfix_str(f"{done}/{len(expected)} tensors")
        expert_format = "mxfp4" if pack else source.expert_format
        writer.finish(source.config, {"expert_format": expert_format, "source": str(source.directory.resolve()), "source_layout": source.layout})
        _replace(staging, dst)
    except BaseException:
        _remove_once_settled(staging)
        raise


def _remove_once_settled(staging: Path, quiet: float = 0.5, limit: float = 10.0) -> None:
    """Removes `staging` and keeps removing it until it stays gone for `quiet` seconds: after a failed
    write (disk full) Orbax raises the first error while TensorStore's threads finish the writes already
    issued, recreating the folders they write into."""
    deadline = time.monotonic() + limit
    gone_since = None
    while time.monotonic() < deadline:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
            gone_since = None
        elif gone_since is None:
            gone_since = time.monotonic()
        elif time.monotonic() - gone_since >= quiet:
            return
        time.sleep(0.02)


def _leaf_shapes(config: GptOssConfig, expert_format: str) -> dict[layouts.ParamPath, tuple[int, ...]]:
    """Per-layer shape of every parameter (stacked parameters without their layer axis)."""
    abstract = nnx.eval_shape(lambda: GptOss(config, rngs=nnx.Rngs(0), expert_format=expert_format))
    shapes = {}
    for path, variable in nnx.to_flat_state(nnx.state(abstract)):
        path = tuple(str(p) for p in path)
        shape = variable.get_value().shape
        shapes[path] = shape[1:] if path[0] in STACKS else shape
    return shapes


def _chunks(tensor: layouts.Tensor, stored: StoredTensor, leaf_shapes, *, pack: bool):
    """((param path, layer, chunk index, rows), source bytes read) for each piece of one checkpoint tensor.

    Rows are read from the file chunk by chunk and only reshaped (or transposed), so their bits are the source's.
    """
    row_bytes = stored.nbytes // stored.shape[0]
    for target in tensor.targets:
        leaf_shape = leaf_shapes[target.path]
        per_leaf_row = (target.stop - target.start) // leaf_shape[0]  # checkpoint rows per parameter row
        for chunk, (start, stop) in enumerate(row_chunks(leaf_shape[0], per_leaf_row * row_bytes)):
            rows = stored.read(target.start + start * per_leaf_row, target.start + stop * per_leaf_row)
            if target.transpose:
                rows = np.ascontiguousarray(np.swapaxes(rows, -1, -2))
            if pack and target.path[-1].endswith("_weight"):
                yield from _packed_experts(target, chunk, rows)
            else:
                yield (target.path, target.layer, chunk, rows.reshape(stop - start, *leaf_shape[1:])), rows.nbytes


def _packed_experts(target: layouts.Target, chunk: int, experts: np.ndarray):
    """Dense bf16 experts `[e, out, in]` packed to MXFP4 blocks and scales `[e, out, ...]`, one expert at a time."""
    packed = [mxfp4.quantize(np.asarray(expert, np.float32)) for expert in experts]
    *parent, name = target.path
    for part, pieces, read in (("_blocks", [b for b, _ in packed], experts.nbytes), ("_scales", [s for _, s in packed], 0)):
        yield ((*parent, name.replace("_weight", part)), target.layer, chunk, np.stack(pieces)), read


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
