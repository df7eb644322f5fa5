"""Converted checkpoints: an Orbax checkpoint of the parameter tree, with the config beside it.

Layout of a converted checkpoint directory:
  config.json       the model config (our field names; `GptOssConfig.from_pretrained` reads it)
  gptoss_jax.json   format marker and provenance (source layout)
  params/           Orbax checkpoint. Each parameter is stored per layer (stacked parameters) and in
                    row chunks of at most `CHUNK_BYTES`: {"sliding_blocks": {"mlp": {"mlp1_blocks":
                    {"0": {"0": rows, "1": rows, ...}, "1": ...}}}}; unstacked ones skip the layer key.

The marker also holds the config as converted and an xxh3 digest of every stored chunk: `load` refuses
a config.json edited afterwards (naming the key) and data whose bytes changed on disk (naming the
parameter), at ~16 GB/s of hashing, a second or so for gpt-oss-20b.

Per-layer, chunked leaves let the converter stream a checkpoint (Orbax partial saves) with memory
bounded by a chunk, let `load` fill each stacked parameter layer by layer, and let each host of a
multi-host `load` read only the chunks its devices hold rows of.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import itertools
import json
import logging
import math
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
import tqdm
import xxhash
from flax import nnx
from jax.sharding import Mesh, NamedSharding, Sharding

from gptoss_jax import sharding
from gptoss_jax.config import GptOssConfig
from gptoss_jax.lora import LoraSpec
from gptoss_jax.model import GptOss

FORMAT = "gptoss-jax/1"
MARKER = "gptoss_jax.json"
PARAMS = "params"
CHUNK_BYTES = 64 * 2**20  # largest stored leaf
BATCH_BYTES = 128 * 2**20  # data per Orbax partial save: fewer saves are faster, smaller ones use less memory
# Data per Orbax read of a stacked layer (a larger parameter is read alone): a read is held twice, on the
# host and on the device, until it is in its stack, so this bounds how far the load peaks above the model.
READ_BYTES = 128 * 2**20
HUGE_PAGE = 2 * 2**20  # x86-64's and most aarch64 kernels' transparent huge page
MADV_HUGEPAGE = 14  # Linux's madvise advice number
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


def digest(rows: np.ndarray) -> str:
    """xxh3-64 of an array's bytes (any dtype, bf16 included)."""
    return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(rows).reshape(-1).view(np.uint8))


class PartialWriter:
    """Writes a converted checkpoint into `directory`, a batch of chunks per Orbax partial save."""

    def __init__(self, directory: Path):
        self.directory = directory.absolute()
        self._pending: list[tuple[list[str], np.ndarray]] = []
        self._pending_bytes = 0
        self._digests: dict[str, str] = {}
        self.directory.mkdir(parents=True)

    def add(self, path: ParamPath, layer: int | None, chunk: int, rows: np.ndarray) -> None:
        keys = _keys(path, layer, chunk)
        self._pending.append((keys, rows))
        self._digests["/".join(keys)] = digest(rows)
        self._pending_bytes += rows.nbytes
        if self._pending_bytes >= BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            with _write_context():
                ocp.partial.save(self.directory / PARAMS, _nest(self._pending))
        self._pending, self._pending_bytes = [], 0

    def finish(self, config: GptOssConfig, provenance: dict[str, Any]) -> None:
        self._flush()
        ocp.partial.finalize(self.directory / PARAMS)
        (self.directory / "config.json").write_text(json.dumps(config.to_original_dict(), indent=2) + "\n")
        marker = {"format": FORMAT, **provenance, "config": config.to_original_dict(), "digests": self._digests}
        (self.directory / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


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
def _set_layer(stacked: list[jax.Array], layer_values: list[jax.Array], layer: jax.Array) -> list[jax.Array]:
    """Layer `layer` of every stacked parameter of a stack, in place: one computation for them all."""
    return [jax.lax.dynamic_update_index_in_dim(s, v.astype(s.dtype), layer, 0) for s, v in zip(stacked, layer_values)]


def _read_groups(layer_bytes: list[int]) -> list[list[int]]:
    """Indices of a stack's parameters, in order, in groups of at most `READ_BYTES` of one layer (a
    larger parameter alone)."""
    groups: list[list[int]] = []
    total = READ_BYTES
    for index, nbytes in enumerate(layer_bytes):
        if total + nbytes > READ_BYTES:
            groups.append([])
            total = 0
        groups[-1].append(index)
        total += nbytes
    return groups


def _return_freed_memory() -> None:
    """Hands the heap's freed pages back to the OS: glibc keeps what the reads freed (~0.5 GiB by the
    end of a gpt-oss-20b load). Elsewhere (no `malloc_trim`) nothing to do."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _zeros(variables: list[nnx.Variable], placements: list[Sharding]) -> list[jax.Array]:
    """Zero-filled arrays shaped like `variables`, made by one computation (not one compile per shape)."""
    targets = [variable.get_value() for variable in variables]
    return jax.jit(lambda: [jnp.zeros(t.shape, t.dtype) for t in targets], out_shardings=placements)()


def _placements(mesh: Mesh | None, variable: nnx.Variable, *, stacked: bool) -> tuple[Sharding, Sharding]:
    """Where a parameter goes and where one of its layers goes: this process's first device without a
    mesh; else by its logical axes (a layer's are those after the leading `layers`)."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return device, device
    whole = NamedSharding(mesh, sharding.variable_spec(variable))
    if not stacked:
        return whole, whole
    logical = variable.get_metadata().get("out_sharding") or (None,) * variable.get_value().ndim
    return whole, NamedSharding(mesh, sharding.spec(tuple(logical[1:])))


def _write_context() -> ocp.Context:
    """Orbax options for writing: arrays stored uncompressed. MXFP4 bytes do not compress and bf16
    weights barely do, while zstd halves the read speed (checkpoints written compressed still load)."""
    context = ocp.Context()
    context.array.saving.use_compression = False
    return context


def _local_context() -> ocp.Context:
    """Orbax options for reads by this process alone: no barrier with the other processes."""
    context = ocp.Context()
    context.multiprocessing.active_processes = {jax.process_index()}
    context.multiprocessing.primary_host = jax.process_index()
    context.pytree.loading.partial_load = True  # only the chunks asked for
    return context


def _read_chunks(
    directory: Path, wanted: dict[tuple[str, ...], dict[str, Any]], digests: dict[str, str]
) -> dict[tuple[str, ...], dict[str, np.ndarray]]:
    """The stored row chunks named in `wanted` ({parameter keys: {chunk: metadata}}), on the host, in one
    Orbax read, each checked against its digest from conversion (checkpoints saved before digests existed
    have none)."""
    request = _nest([([*keys, chunk], meta) for keys, chunks in wanted.items() for chunk, meta in chunks.items()])
    with _local_context(), _unreadable(directory):
        loaded = ocp.load(directory / PARAMS, request)
    rows = {keys: _get(loaded, list(keys)) if chunks else {} for keys, chunks in wanted.items()}
    for keys, chunks in rows.items():
        for chunk, value in chunks.items():
            want = digests.get("/".join([*keys, chunk]))
            if want is not None and digest(value) != want:
                raise ValueError(
                    f"{directory}: parameter {'/'.join(keys)} (rows chunk {chunk}) fails its checksum: the stored "
                    "bytes changed after conversion; convert the checkpoint again"
                )
    return rows


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
    """Silences Orbax's absl warnings and error logs (with their tracebacks) for a block whose errors
    reach the caller as exceptions anyway, so a damaged checkpoint or a full disk is reported once."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _unreadable(directory: Path) -> Iterator[None]:
    """Orbax's and TensorStore's errors on missing or damaged files as one line naming the checkpoint."""
    try:
        with quiet_orbax():
            yield
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{directory / PARAMS}: cannot read the stored arrays (missing or damaged files): {reason}") from None


@dataclasses.dataclass(frozen=True)
class _Piece:
    """A parameter, or one layer of a stacked one: its stored row chunks and the rows this process holds."""

    keys: tuple[str, ...]
    target: jax.ShapeDtypeStruct
    placement: Sharding
    spans: dict[str, tuple[int, int]]  # chunk -> its rows [start, stop)
    wanted: dict[str, Any]  # chunk -> metadata, for the chunks overlapping this process's shards


def _piece(directory: Path, stored: dict[str, Any], keys: list[str], target, placement: Sharding) -> _Piece:
    name = "/".join(keys)
    try:
        chunks = _get(stored, keys)
        bounds = list(itertools.accumulate(chunks[str(c)].shape[0] for c in range(len(chunks))))
        shape = (bounds[-1], *chunks["0"].shape[1:])
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"{directory / PARAMS}: parameter {name} is missing or incomplete (a damaged or partial copy?)") from None
    if shape != target.shape:
        raise ValueError(f"{directory}: parameter {name} has shape {shape}, the config implies {target.shape}")
    spans = {str(c): (start, stop) for c, (start, stop) in enumerate(zip([0, *bounds], bounds))}
    mine = [index[0].indices(shape[0])[:2] for index in placement.addressable_devices_indices_map(shape).values()]
    wanted = {c: chunks[c] for c, (start, stop) in spans.items() if any(lo < stop and start < hi for lo, hi in mine)}
    return _Piece(tuple(keys), jax.ShapeDtypeStruct(target.shape, target.dtype), placement, spans, wanted)


def _load_pieces(directory: Path, pieces: list[_Piece], digests: dict[str, str], *, on_host: bool = False) -> list[jax.Array | np.ndarray]:
    """Global arrays on their placements, from one read of the chunks this process needs.

    Each of this process's devices takes its slice of the rows (in the target dtype) from the host;
    `on_host` (pieces placed on one device) returns the host rows themselves instead.
    """
    rows = _read_chunks(directory, {piece.keys: piece.wanted for piece in pieces}, digests)

    def array(piece: _Piece) -> jax.Array:
        chunks = rows.pop(piece.keys)

        def overlapping(index: tuple[slice, ...]) -> list[tuple[str, int, int]]:
            lo, hi, _ = index[0].indices(piece.target.shape[0])
            return [(c, max(lo, start) - start, min(hi, stop) - start) for c, (start, stop) in piece.spans.items() if lo < stop and start < hi]

        # Shards still to take each chunk (at least): a chunk is freed once its rows are copied out, and
        # the shard they are copied into is aligned for XLA:CPU to take without a copy of its own, so a
        # shard of several chunks is held once, not three times.
        uses = collections.Counter(c for index in piece.placement.addressable_devices_indices_map(piece.target.shape).values()
                                   for c, _, _ in overlapping(index))

        def shard(index: tuple[slice, ...]) -> np.ndarray:
            parts = overlapping(index)
            if len(parts) == 1:  # rows of one chunk: no copy
                c, lo, hi = parts[0]
                rows_of_shard = chunks[c][lo:hi]
            else:
                first = chunks[parts[0][0]]
                rows_of_shard = _aligned_empty((sum(hi - lo for _, lo, hi in parts), *first.shape[1:]), first.dtype)
                at = 0
                for c, lo, hi in parts:
                    rows_of_shard[at : at + hi - lo] = chunks[c][lo:hi]
                    at += hi - lo
                    uses[c] -= 1
                    if not uses[c]:
                        del chunks[c]
            return rows_of_shard[(slice(None), *index[1:])].astype(piece.target.dtype, copy=False)

        if on_host:
            return shard(tuple(slice(None) for _ in piece.target.shape))
        return jax.make_array_from_callback(piece.target.shape, piece.placement, shard)

    return [array(piece) for piece in pieces]


def _handed_to_xla(rows: np.ndarray) -> jax.Array:
    """Host rows on this process's first (CPU) device: copied into `_aligned_empty` memory, which
    XLA:CPU then holds without a copy of its own."""
    aligned = _aligned_empty(rows.shape, rows.dtype)
    aligned[...] = rows
    return jax.device_put(aligned, jax.local_devices()[0])


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialized array starting at a 64-byte boundary, which XLA:CPU's `device_put` aliases
    rather than copies (numpy's own large arrays start 16 bytes past one). One of a huge page or more
    starts on a huge page and asks Linux for huge pages (`MADV_HUGEPAGE`; most kernels give them only
    on request): writing fresh memory a 4 KiB page fault at a time ran at 0.4 GB/s on the development
    VM, 2 MiB pages at 3.4, and a load writes every byte of the model into fresh memory."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    align = HUGE_PAGE if nbytes >= HUGE_PAGE else 64
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    array = raw[start : start + nbytes]
    if align == HUGE_PAGE:
        _advise_huge_pages(array)
    return array.view(dtype).reshape(shape)


def _advise_huge_pages(array: np.ndarray) -> None:
    """madvise(MADV_HUGEPAGE) on an untouched array; a no-op where libc or the kernel has no such advice."""
    try:
        madvise = ctypes.CDLL(None).madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise(array.ctypes.data, array.nbytes, MADV_HUGEPAGE)


def load(
    source: str | Path | GptOssConfig, *, dtype: str | jnp.dtype | None = None, mesh: Mesh | None = None,
    moe_impl: str = "auto", attention_impl: str = "xla", lora: LoraSpec | None = None, remat: str = "none", seed: int = 0,
    progress: bool | None = None,
) -> GptOss:
    """The model builder: a converted checkpoint (a directory) or random weights (a `GptOssConfig`,
    drawn from `seed`), in `dtype` (bfloat16; "float32" for parity), on `mesh`, with every switch of
    `GptOss` (`moe_impl`, `attention_impl`; `lora` adapters over the loaded base, new ones with B = 0;
    `remat` for training). Reading a checkpoint shows a bar of the bytes read (`progress=None`: only on
    a terminal).

    Without a `mesh` the model lands on this process's first device; with one, every parameter is
    built directly on it (see `sharding.RULES`). The stacks are filled in place a layer at a time, in
    Orbax reads of at most `READ_BYTES` of a layer (or one parameter's layer), so the peak is the model
    plus twice a read.

    Multi-host: every process calls `load` with the same arguments. Each reads, from the host, only the
    stored chunks that overlap its own devices' shards and hands them to those devices alone, so no
    process touches another's device or reads rows it will not hold. Its Orbax reads are local
    (`active_processes` is just this process, so Orbax sets no barrier): processes reading different
    chunks cannot wait on each other, and a missing file fails each process on its own. With a mesh over
    every process (as `sharding.make_mesh` builds) each process makes one read for the unstacked
    parameters and the same reads per layer of each stack (grouped by global shapes), the same count
    everywhere, which keeps Orbax's operation ids, and so later multi-process saves, in step. `_zeros` and the `_set_layer` updates are SPMD
    computations without communication that all processes run in the same order.
    """
    switches = dict(moe_impl=moe_impl, attention_impl=attention_impl, lora=lora, remat=remat)
    dtype = model_dtype(dtype)
    if isinstance(source, GptOssConfig):
        if mesh is not None:
            sharding.check_fits(dict(mesh.shape), source)
        model = GptOss(source, rngs=nnx.Rngs(seed), dtype=dtype, **switches)
        if mesh is not None:
            sharding.shard_model(model, mesh)
        return model
    path = Path(source).absolute()  # Orbax wants absolute paths
    metadata = _marker(path)
    config = _config(path, metadata)
    if mesh is not None:
        sharding.check_fits(dict(mesh.shape), config)
    expert_format = metadata.get("expert_format", "mxfp4")
    abstract = nnx.eval_shape(lambda: GptOss(config, rngs=nnx.Rngs(0), dtype=dtype, expert_format=expert_format, **switches))
    graphdef, state = nnx.split(abstract)
    with _local_context(), _unreadable(path):
        stored = ocp.metadata(path / PARAMS).metadata
    digests = metadata.get("digests", {})
    flat = [(tuple(str(p) for p in param_path), variable) for param_path, variable in nnx.to_flat_state(state)]
    stored_params = [(param_path, variable) for param_path, variable in flat if not isinstance(variable, nnx.LoRAParam)]
    total = sum(_nbytes(variable.get_value()) for _, variable in stored_params)
    with tqdm.tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=None if progress is None else not progress) as bar:
        def read(members: list[tuple[ParamPath, nnx.Variable]], layer: int | None) -> list[jax.Array | np.ndarray]:
            """The members (their layer `layer`) on their placements, or as host rows (`on_host`)."""
            pieces = []
            for param_path, variable in members:
                target = variable.get_value()
                whole, per_layer = _placements(mesh, variable, stacked=layer is not None)
                if layer is not None:
                    target, whole = jax.ShapeDtypeStruct(target.shape[1:], target.dtype), per_layer
                pieces.append(_piece(path, stored, _keys(param_path, layer), target, whole))
            arrays = _load_pieces(path, pieces, digests, on_host=on_host)
            bar.update(sum(_nbytes(piece.target) for piece in pieces))
            return arrays

        # On one CPU device each parameter is assembled on the host in memory XLA:CPU takes as it is
        # (`_aligned_empty`), a stack a layer at a time; elsewhere stacks start as zeros on their
        # placements and take each layer in place (no host copy of a whole stack).
        on_host = mesh is None and jax.local_devices()[0].platform == "cpu"
        unstacked = [(p, v) for p, v in stored_params if p[0] not in STACKS]
        for (_, variable), value in zip(unstacked, read(unstacked, None)):
            variable.set_value(_handed_to_xla(value) if on_host else value)
        _return_freed_memory()
        for stack in STACKS:  # a layer at a time, in reads of at most READ_BYTES
            members = [(p, v) for p, v in stored_params if p[0] == stack]
            if not members:
                continue
            if on_host:
                values = [_aligned_empty(v.get_value().shape, v.get_value().dtype) for _, v in members]
            else:
                values = _zeros([v for _, v in members], [_placements(mesh, v, stacked=True)[0] for _, v in members])
            layers = members[0][1].get_value().shape[0]
            for layer in range(layers):
                for group in _read_groups([_nbytes(v.get_value()) // layers for _, v in members]):
                    rows = read([members[i] for i in group], layer)
                    if on_host:
                        for i, layer_rows in zip(group, rows):
                            values[i][layer] = layer_rows
                        continue
                    for i, value in zip(group, _set_layer([values[i] for i in group], rows, layer)):
                        values[i] = value
                _return_freed_memory()
            for (_, variable), value in zip(members, values):
                variable.set_value(jax.device_put(value, jax.local_devices()[0]) if on_host else value)
    for param_path, variable in flat:
        if isinstance(variable, nnx.LoRAParam):
            variable.set_value(_new_adapter(param_path, variable, _placements(mesh, variable, stacked=param_path[0] in STACKS)[0], seed))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _nbytes(array: jax.ShapeDtypeStruct) -> int:
    return array.size * array.dtype.itemsize


def model_dtype(dtype: str | jnp.dtype | None) -> jnp.dtype:
    """The compute dtype asked for: bfloat16 (the default) or float32 (parity); nothing else runs the model."""
    try:
        resolved = jnp.dtype(dtype or jnp.bfloat16)
    except TypeError:
        resolved = None
    if resolved not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise ValueError(f"dtype {dtype!r} is not supported; choose bfloat16 or float32")
    return resolved


def _marker(path: Path) -> dict[str, Any]:
    marker = path / MARKER
    try:
        metadata = json.loads(marker.read_text()) if marker.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{marker} is damaged (not JSON: {error}); convert the checkpoint again") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a converted gptoss-jax checkpoint (no {MARKER} with format {FORMAT})")
    return metadata


def _config(path: Path, metadata: dict[str, Any]) -> GptOssConfig:
    """config.json, refused if it differs from the config the checkpoint was converted with."""
    config = GptOssConfig.from_pretrained(path / "config.json")
    if "config" in metadata:
        now, converted = dataclasses.asdict(config), dataclasses.asdict(GptOssConfig.from_dict(metadata["config"]))
        edited = [f"{key} is {now[key]!r}, was {converted[key]!r}" for key in now if now[key] != converted[key]]
        if edited:
            raise ValueError(f"{path / 'config.json'} was edited after conversion ({'; '.join(edited)}); restore it or convert again")
    return config


def _new_adapter(param_path: tuple[str, ...], variable: nnx.Variable, placement, seed: int) -> jax.Array:
    """A new LoRA factor on `placement`, as `lora.LoRA` makes it: B zero; A normal with std
    1/sqrt(inputs), the inputs being the axes after its `lora` (rank) axis."""
    target = variable.get_value()
    if param_path[-1] == "b":
        return jnp.zeros(target.shape, target.dtype, device=placement)
    inputs = math.prod(target.shape[list(variable.get_metadata()["out_sharding"]).index("lora") + 1 :])
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32("/".join(param_path).encode()))
    draw = jax.jit(lambda: (jax.random.normal(key, target.shape) * inputs**-0.5).astype(target.dtype), out_shardings=placement)
    return draw()
