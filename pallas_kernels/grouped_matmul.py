"""Grouped (megablox-style) matmul with MXFP4 expert weights and fused MoE epilogues.

`x [M, K]` holds rows sorted by expert, `group_sizes [E]` how many rows each expert owns (in order;
sum <= M, empty experts allowed). Expert e's rows are multiplied by its weight `W_e [N, K]`, kept
packed as in the checkpoint (`blocks [E, N, K/32, 16]`, `scales [E, N, K/32]`). Each program decodes
its weight tile in registers (`mxfp4.decode`); dequantized weights never reach memory.

Work is split into (row tile, expert) items computed in jnp outside the kernel: a row tile that
straddles a group boundary is visited once per group it touches, each visit storing only its own
rows. Rows past sum(group_sizes) form one more "padding" group that stores zeros without touching
weights. The grid is (N tiles, work items) with a static bound of row tiles + min(E + 1, M) - 1 items
(unused items store nothing), so a decode step with 4 selected experts runs about 4 items per N tile
whatever E is, and each weight byte of a tile is read once per item.

`grouped_matmul_transposed` is the input gradient's product, `dy_rows @ W_e` (`[M, K]`): the same
packed weights read in the other orientation, the work split the same way, the contraction over N.

Epilogues (float32, before the single store):
- "swiglu" (mlp1): add bias, then gpt-oss's clamped SwiGLU on interleaved columns (even = gate, odd =
  linear). Gate and linear weight rows are loaded with stride 2 into two accumulators, so the output
  tile `[BM, BN/2]` needs no de-interleave of values. Output `[M, N/2]`.
- "scale" (mlp2): add bias, multiply each row by `row_scale` (its routing weight). Output `[M, N]`.

GPU (Pallas Triton): weights and x are whole-array refs indexed with the group read from the work
item tables (Triton has no scalar prefetch); ragged N tails are masked by the BlockSpec over N.
TPU (Mosaic): the same tables are scalar-prefetched and drive the BlockSpec index maps; the work-item
axis is sequential ("arbitrary") because consecutive items may revisit one output block.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.mxfp4 import decode, largest_pow2_divisor, platform
from pallas_kernels.mxfp4_format import BLOCK, BYTES_PER_BLOCK

EPILOGUES = ("swiglu", "scale")
MIN_DOT = 16  # Triton's smallest dot dimension


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows, output columns (before SwiGLU halves them) and contraction values per step of one program."""

    m: int
    n: int
    k: int


def default_block_sizes(backend: str, rows: int, num_experts: int) -> BlockSizes:
    """Tiles from the H100 roofline (3.35 TB/s HBM, ~990 bf16 TFLOP/s, 132 SMs).

    Decode (a few rows per expert) is bound by weight bytes: BM = 16 (Triton's smallest dot), BN = 64
    so that 4 experts x 2880/64 N tiles give >= 180 programs (over one wave of 132 SMs), BK = 128
    keeps the decoded [BN, BK] float32 tile at 64 registers per thread with 4 warps. Prefill has
    ~M/E rows per expert; from 128 rows on the decode cost (~12 integer ops per weight) hides behind
    2*BM flops per weight on the tensor cores, so BM = BN = 128 with 8 warps. Between, BM follows
    the rows per expert. On TPU BN = 256 keeps the SwiGLU output tile 128 lanes wide and BK = 256
    decodes 128 packed bytes (one lane tile) per step.
    """
    rows_per_expert = max(1, rows // num_experts)
    block_m = min(128, max(16, pl.next_power_of_2(rows_per_expert)))
    if backend == "tpu":
        return BlockSizes(m=block_m, n=256, k=256)
    return BlockSizes(m=block_m, n=64 if block_m <= 32 else 128, k=128)


def k_steps(size: int, block_k: int, unit: int = BLOCK) -> list[tuple[int, int, int]]:
    """Split a contraction of `size` (a multiple of `unit`) into (start, step, count) runs of power-of-two steps.

    Full `block_k` steps first, then the remainder by its binary digits, so K = 2880 = 90 x 32 runs
    as 22 steps of 128 and one of 64 with no masking. The forward contracts over MXFP4 blocks (unit
    32); the transposed product over weight rows, down to Triton's smallest dot (16).
    """
    if size % unit or block_k % unit or block_k & (block_k - 1):
        raise ValueError(f"K={size} and block_k={block_k} must be multiples of {unit}, block_k a power of two")
    runs, start, step = [], 0, block_k
    while start < size:
        count = (size - start) // step
        if count:
            runs.append((start, step, count))
            start += count * step
        step //= 2
    return runs


def work_items(group_sizes: jax.Array, rows: int, block_m: int) -> tuple[jax.Array, ...]:
    """Tables `[W]` of (group, row tile, first row, end row, weight group) for each work item.

    Group E is the padding group (rows past sum(group_sizes), and unused items with an empty row
    range). The weight group is the last real group so far: on TPU the padding items then fetch no
    new weight block. Unused items sit on the last row tile, so TPU writes back no other block.
    """
    num_experts = group_sizes.shape[0]
    num_tiles = rows // block_m
    capacity = num_tiles + min(num_experts + 1, rows) - 1
    sizes = jnp.concatenate([group_sizes, (rows - jnp.sum(group_sizes))[None]]).astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first_tile = starts // block_m
    tiles = jnp.where(sizes > 0, (ends - 1) // block_m - first_tile + 1, 0)
    items_end = jnp.cumsum(tiles)
    item = jnp.arange(capacity, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(items_end, item, side="right"), num_experts).astype(jnp.int32)
    used = item < items_end[-1]
    tile = first_tile[group] + item - (items_end[group] - tiles[group])
    group = jnp.where(used, group, num_experts)
    weight_group = jax.lax.cummax(jnp.where(group < num_experts, group, 0))
    return (
        group,
        jnp.where(used, tile, num_tiles - 1),
        jnp.where(used, starts[group], 0),
        jnp.where(used, ends[group], 0),
        weight_group,
    )


def _products(x_ref, x_rows, w_ref, s_ref, expert: tuple, row_sets, block_m: int, block_k: int) -> list[jax.Array]:
    """float32 `x[x_rows] @ W[expert][rows].T` for each weight row selection, decoding W step by step.

    Indices are applied in one go (`ref[expert, rows, cols]`): Pallas Triton lowers one indexer per load.
    """
    num_bytes = w_ref.shape[-1]
    accs = [jnp.zeros((block_m, rows.size), jnp.float32) for rows in row_sets]
    for start, step, count in k_steps(2 * num_bytes, block_k):

        def accumulate(k, accs, start=start, step=step):
            x = x_ref[x_rows, pl.ds(start + k * step, step)]
            byte_cols = pl.ds(start // 2 + k * (step // 2), step // 2)
            scale_cols = pl.ds(start // BLOCK + k * (step // BLOCK), step // BLOCK)
            out = []
            for rows, acc in zip(row_sets, accs):
                w = decode(w_ref[(*expert, rows, byte_cols)], s_ref[(*expert, rows, scale_cols)]).astype(x.dtype)
                out.append(acc + jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32))
            return out

        accs = jax.lax.fori_loop(0, count, accumulate, accs) if count > 1 else accumulate(0, accs)
    return accs


def swiglu(gate: jax.Array, linear: jax.Array, alpha: float, limit: float) -> jax.Array:
    """gpt-oss's clamped SwiGLU of split gate and linear pre-activations (the "swiglu" epilogue)."""
    gate = jnp.minimum(gate, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (jnp.clip(linear, -limit, limit) + 1)


def _item(item, group_ref, tile_ref, start_ref, end_ref, o_ref, block_m: int, backend: str):
    """Work item `item`'s (group, rows to read, expert index, masked store of its own rows).

    GPU refs hold every row and expert (the item picks its own); TPU refs are already the item's blocks.
    """
    group = group_ref[item]
    first_row = tile_ref[item] * block_m
    rows = first_row + jax.lax.broadcasted_iota(jnp.int32, (block_m, 1), 0)
    mine = (rows >= start_ref[item]) & (rows < end_ref[item])
    x_rows, expert = (pl.ds(first_row, block_m), (group,)) if backend == "gpu" else (slice(None), ())

    def store(value):
        mask = jnp.broadcast_to(mine, value.shape)
        if backend == "gpu":
            pltriton.store(o_ref.at[x_rows, :], value.astype(o_ref.dtype), mask=mask)
        else:
            o_ref[...] = jnp.where(mask, value.astype(o_ref.dtype), o_ref[...])

    return group, x_rows, expert, store


def _kernel(group_ref, tile_ref, start_ref, end_ref, x_ref, w_ref, s_ref, b_ref, *rest, epilogue: str,
            num_experts: int, block_m: int, block_k: int, alpha: float, limit: float, backend: str):
    row_scale_ref, o_ref = rest if epilogue == "scale" else (None, *rest)
    group, x_rows, expert, store = _item(pl.program_id(1), group_ref, tile_ref, start_ref, end_ref, o_ref, block_m, backend)

    @pl.when(group < num_experts)
    def _():
        block_n = w_ref.shape[-2]
        if epilogue == "swiglu":
            gate_rows, linear_rows = pl.ds(0, block_n // 2, stride=2), pl.ds(1, block_n // 2, stride=2)
            gate, linear = _products(x_ref, x_rows, w_ref, s_ref, expert, (gate_rows, linear_rows), block_m, block_k)
            gate = gate + b_ref[(*expert, slice(None), gate_rows)].astype(jnp.float32)
            linear = linear + b_ref[(*expert, slice(None), linear_rows)].astype(jnp.float32)
            store(swiglu(gate, linear, alpha, limit))
        else:
            (acc,) = _products(x_ref, x_rows, w_ref, s_ref, expert, (pl.ds(0, block_n),), block_m, block_k)
            acc = acc + b_ref[(*expert, slice(None), slice(None))].astype(jnp.float32)
            store(acc * row_scale_ref[x_rows, :].astype(jnp.float32))

    @pl.when(group == num_experts)
    def _():
        out_cols = o_ref.shape[-1]
        store(jnp.zeros((block_m, out_cols), jnp.float32))


def grouped_matmul(
    x: jax.Array,
    group_sizes: jax.Array,
    blocks: jax.Array,
    scales: jax.Array,
    bias: jax.Array,
    row_scale: jax.Array | None = None,
    *,
    epilogue: str,
    alpha: float | None = None,
    limit: float | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Per-expert `x_rows @ W_e.T + b_e` with the fused `epilogue`; `[M, N/2]` ("swiglu") or `[M, N]` ("scale").

    `row_scale [M]` is required for "scale", `alpha` and `limit` for "swiglu". Rows past sum(group_sizes) come out as zeros.
    Operands run in `x.dtype`, accumulation in float32, output in `x.dtype`.
    """
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue {epilogue!r} not in {EPILOGUES}")
    if (epilogue == "scale") != (row_scale is not None):
        raise ValueError("row_scale is required by, and only by, the 'scale' epilogue")
    if epilogue == "swiglu" and (alpha is None or limit is None):
        raise ValueError("the 'swiglu' epilogue needs alpha and limit")
    num_experts, n, groups, _ = blocks.shape
    rows, k = x.shape
    if k != groups * BLOCK or scales.shape != blocks.shape[:3] or bias.shape != (num_experts, n):
        raise ValueError(f"x {x.shape}, blocks {blocks.shape}, scales {scales.shape}, bias {bias.shape} disagree")
    backend = platform(backend)
    sizes = block_sizes or default_block_sizes(backend, rows, num_experts)
    block_n = min(sizes.n, pl.next_power_of_2(n))
    padded_rows = pl.cdiv(rows, sizes.m) * sizes.m
    x = jnp.pad(x, ((0, padded_rows - rows), (0, 0)))
    out_n = n // 2 if epilogue == "swiglu" else n
    tables = work_items(group_sizes, padded_rows, sizes.m)
    operands = [x, blocks.reshape(num_experts, n, groups * BYTES_PER_BLOCK), scales, bias.reshape(num_experts, 1, n)]
    if row_scale is not None:
        operands.append(jnp.pad(row_scale, (0, padded_rows - rows)).reshape(padded_rows, 1))
    kernel = functools.partial(
        _kernel, epilogue=epilogue, num_experts=num_experts, block_m=sizes.m, block_k=sizes.k,
        alpha=alpha, limit=limit, backend=backend,
    )
    call = _gpu_call if backend == "gpu" else _tpu_call
    out_shape = jax.ShapeDtypeStruct((padded_rows, out_n), x.dtype)
    out = call(kernel, tables, operands, out_shape, BlockSizes(m=sizes.m, n=block_n, k=sizes.k), interpret)
    return out[:rows]


def _gpu_call(kernel, tables, operands, out_shape, sizes: BlockSizes, interpret: bool) -> jax.Array:
    """Triton: whole-array refs for the tables, x and the row scales; weights, bias and output tiled over N."""
    num_experts, n, num_bytes = operands[1].shape
    out_block = (out_shape.shape[0], sizes.n * out_shape.shape[1] // n)
    whole = lambda array: pl.BlockSpec(array.shape, lambda j, i: (0,) * array.ndim)  # noqa: E731
    in_specs = [whole(t) for t in tables[:4]] + [
        whole(operands[0]),
        pl.BlockSpec((num_experts, sizes.n, num_bytes), lambda j, i: (0, j, 0)),
        pl.BlockSpec((num_experts, sizes.n, operands[2].shape[2]), lambda j, i: (0, j, 0)),
        pl.BlockSpec((num_experts, 1, sizes.n), lambda j, i: (0, 0, j)),
    ] + [whole(a) for a in operands[4:]]
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(n, sizes.n), tables[0].shape[0]),
        in_specs=in_specs,
        out_specs=pl.BlockSpec(out_block, lambda j, i: (0, j)),
        compiler_params=pltriton.CompilerParams(num_warps=4 if sizes.m <= 32 else 8, num_stages=3),
        interpret=interpret,
    )(*tables[:4], *operands)


def _tpu_call(kernel, tables, operands, out_shape, sizes: BlockSizes, interpret: bool) -> jax.Array:
    """Mosaic: the tables are scalar-prefetched and pick each item's row tile and expert block."""
    num_experts, n, num_bytes = operands[1].shape
    out_block_n = sizes.n * out_shape.shape[1] // n
    # Index maps get (N tile j, item i, *tables); tables = (group, tile, start, end, weight group).
    row_tile = lambda j, i, group, tile, start, end, weight: (tile[i], 0)  # noqa: E731
    expert = lambda j, i, group, tile, start, end, weight: (weight[i], j, 0)  # noqa: E731
    in_specs = [
        pl.BlockSpec((sizes.m, operands[0].shape[1]), row_tile),
        pl.BlockSpec((None, sizes.n, num_bytes), expert),
        pl.BlockSpec((None, sizes.n, operands[2].shape[2]), expert),
        pl.BlockSpec((None, 1, sizes.n), lambda j, i, group, tile, start, end, weight: (weight[i], 0, j)),
    ] + [pl.BlockSpec((sizes.m, 1), row_tile)] * (len(operands) - 4)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(tables),
        grid=(pl.cdiv(n, sizes.n), tables[0].shape[0]),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((sizes.m, out_block_n), lambda j, i, group, tile, start, end, weight: (tile[i], j)),
    )
    return pl.pallas_call(
        lambda *refs: kernel(*refs[:4], *refs[5:]),  # the weight-group table only feeds the index maps
        out_shape=out_shape,
        grid_spec=grid_spec,
        # Consecutive items may revisit one output block, so the item axis runs in order.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
    )(*tables, *operands)


def grouped_matmul_transposed(
    dy: jax.Array,
    group_sizes: jax.Array,
    blocks: jax.Array,
    scales: jax.Array,
    *,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Per-expert `dy_rows @ W_e` for `dy [M, N]`: `[M, K]` in dy's dtype, zeros past sum(group_sizes).

    The backward of `grouped_matmul`'s product with respect to x. Each program decodes `[step, BN]`
    tiles of W (N rows by a tile of K columns) in registers and contracts them with dy's matching
    columns, so the frozen packed weights are never dequantized to memory. `block_sizes.n` caps the
    output (K) columns per program, `block_sizes.k` the contraction (N) per step.
    """
    num_experts, n, groups, _ = blocks.shape
    rows = dy.shape[0]
    if dy.shape[1] != n or scales.shape != blocks.shape[:3]:
        raise ValueError(f"dy {dy.shape}, blocks {blocks.shape}, scales {scales.shape} disagree")
    if n % MIN_DOT:
        raise ValueError(f"N={n} weight rows: the transposed product needs a multiple of {MIN_DOT}")
    backend = platform(backend)
    sizes = block_sizes or default_block_sizes(backend, rows, num_experts)
    k = groups * BLOCK
    padded_rows = pl.cdiv(rows, sizes.m) * sizes.m
    operands = [jnp.pad(dy, ((0, padded_rows - rows), (0, 0))), blocks.reshape(num_experts, n, k // 2), scales]
    tables = work_items(group_sizes, padded_rows, sizes.m)
    kernel = functools.partial(
        _transposed_kernel, num_experts=num_experts, block_m=sizes.m, block_n=sizes.k, backend=backend,
    )
    out_shape = jax.ShapeDtypeStruct((padded_rows, k), dy.dtype)
    if backend == "gpu":
        out = _gpu_transposed_call(kernel, tables, operands, out_shape, largest_pow2_divisor(k, sizes.n), sizes.m, interpret)
    else:
        out = _tpu_transposed_call(kernel, tables, operands, out_shape, _tpu_rows_per_block(n, 8 * sizes.k), sizes.m, interpret)
    return out[:rows]


def _transposed_kernel(group_ref, tile_ref, start_ref, end_ref, dy_ref, w_ref, s_ref, o_ref, *scratch,
                       num_experts: int, block_m: int, block_n: int, backend: str):
    item = pl.program_id(1 if backend == "gpu" else 0)
    group, dy_rows, expert, store = _item(item, group_ref, tile_ref, start_ref, end_ref, o_ref, block_m, backend)

    def product():
        """float32 `dy[dy_rows] @ W[expert]` over the W rows in the refs, decoding W step by step."""
        acc = jnp.zeros((block_m, 2 * w_ref.shape[-1]), jnp.float32)
        for start, step, count in k_steps(w_ref.shape[-2], block_n, unit=MIN_DOT):

            def accumulate(j, acc, start=start, step=step):
                w_rows = pl.ds(start + j * step, step)
                dy = dy_ref[dy_rows, w_rows]
                w = decode(w_ref[(*expert, w_rows, slice(None))], s_ref[(*expert, w_rows, slice(None))]).astype(dy.dtype)
                return acc + jax.lax.dot_general(dy, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

            acc = jax.lax.fori_loop(0, count, accumulate, acc) if count > 1 else accumulate(0, acc)
        return acc

    if backend == "gpu":  # a program holds all of N: one product, one store

        @pl.when(group < num_experts)
        def _():
            store(product())

        @pl.when(group == num_experts)
        def _():
            store(jnp.zeros((block_m, o_ref.shape[-1]), jnp.float32))

        return
    # TPU: N arrives in blocks along the grid's last axis, summed in a float32 scratch, stored after the last
    # (the padding group adds nothing, so it stores zeros).
    (acc_ref,) = scratch
    n_block = pl.program_id(1)

    @pl.when(n_block == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(group < num_experts)
    def _():
        acc_ref[...] += product()

    @pl.when(n_block == pl.num_programs(1) - 1)
    def _():
        store(acc_ref[...])


def _tpu_rows_per_block(n: int, cap: int) -> int:
    """W rows per TPU block: the largest multiple of 128 (a lane tile of dy) dividing N up to `cap` (8 steps;
    2048 rows, 1.4 MB of packed gpt-oss weights by default), else all N."""
    return next((b for b in range(cap - cap % 128, 0, -128) if n % b == 0), n)


def _gpu_transposed_call(kernel, tables, operands, out_shape, block_k: int, block_m: int, interpret: bool) -> jax.Array:
    """Triton: whole-array refs for the tables and dy; weights and output tiled over K (`block_k`, a power of two)."""
    num_experts, n, _ = operands[1].shape
    whole = lambda array: pl.BlockSpec(array.shape, lambda j, i: (0,) * array.ndim)  # noqa: E731
    in_specs = [whole(t) for t in tables[:4]] + [
        whole(operands[0]),
        pl.BlockSpec((num_experts, n, block_k // 2), lambda j, i: (0, 0, j)),
        pl.BlockSpec((num_experts, n, block_k // BLOCK), lambda j, i: (0, 0, j)),
    ]
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(out_shape.shape[1] // block_k, tables[0].shape[0]),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((out_shape.shape[0], block_k), lambda j, i: (0, j)),
        compiler_params=pltriton.CompilerParams(num_warps=4 if block_m <= 32 else 8, num_stages=3),
        interpret=interpret,
    )(*tables[:4], *operands)


def _tpu_transposed_call(kernel, tables, operands, out_shape, block_rows: int, block_m: int, interpret: bool) -> jax.Array:
    """Mosaic: items in order, each summing W's row blocks (grid axis 1) over all of K (scales' lanes are K/32)."""
    _, n, num_bytes = operands[1].shape
    # Index maps get (item i, W row block r, *tables); tables = (group, tile, start, end, weight group).
    expert = lambda i, r, group, tile, start, end, weight: (weight[i], r, 0)  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(tables),
        grid=(tables[0].shape[0], n // block_rows),
        in_specs=[
            pl.BlockSpec((block_m, block_rows), lambda i, r, group, tile, start, end, weight: (tile[i], r)),
            pl.BlockSpec((None, block_rows, num_bytes), expert),
            pl.BlockSpec((None, block_rows, operands[2].shape[2]), expert),
        ],
        out_specs=pl.BlockSpec((block_m, out_shape.shape[1]), lambda i, r, group, tile, start, end, weight: (tile[i], 0)),
        scratch_shapes=[pltpu.VMEM((block_m, out_shape.shape[1]), jnp.float32)],
    )
    return pl.pallas_call(
        lambda *refs: kernel(*refs[:4], *refs[5:]),  # the weight-group table only feeds the index maps
        out_shape=out_shape,
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary")),
        interpret=interpret,
    )(*tables, *operands)
