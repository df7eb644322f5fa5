"""Does it fit? Weight and peak bytes per device of the compiled decode step, from shapes alone.

Compiles one cached decode step (batch 1) for each preset, mesh and context on abstract arrays, so
nothing is allocated, and reads `compiled.memory_analysis()`. The numbers come from XLA's CPU
compiler standing in for the GPU one (same program, same buffers; kernels and allocator differ).
`--markdown` prints README.md's "Does it fit?" table, verbatim (tests/test_readme_tables.py checks it).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/memory.py [--markdown] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from gptoss_jax import GptOss, GptOssConfig, sharding

SCENARIOS = [  # (preset, mesh sizes (data, expert, model), what it stands for)
    ("gpt-oss-20b", (1, 1, 1), "one 16 GB device"),
    ("gpt-oss-120b", (1, 1, 1), "one 80 GB GPU"),
    ("gpt-oss-120b", (1, 8, 1), "8 GPUs, expert axis 8"),
]
CONTEXTS = (4096, 131072)
GIB = 2**30
MARKDOWN_HEADER = (
    "| preset | mesh (data, expert, model) | stands for | context | weights GiB | KV cache GiB | temp GiB | peak GiB |\n"
    "|---|---|---|---|---|---|---|---|"
)


def measure(preset: str, sizes: tuple[int, int, int], context: int) -> dict:
    config = GptOssConfig.from_preset(preset)
    mesh = sharding.make_mesh(*sizes, config=config, devices=jax.devices()[: sizes[0] * sizes[1] * sizes[2]])
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GptOss(config, rngs=nnx.Rngs(0))))
    placed = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=NamedSharding(mesh, sharding.variable_spec(v))),
        state, is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    abstract_model = nnx.merge(graphdef, state)
    cache = jax.eval_shape(lambda: abstract_model.init_cache(1, context))
    cache = jax.tree.map(
        lambda a, logical: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding.named(mesh, logical)), cache, cache.logical_axes()
    )
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32, sharding=NamedSharding(mesh, sharding.spec(("batch", None))))

    def decode(params, tokens, cache):
        return nnx.merge(graphdef, params).step(tokens, cache)

    with jax.set_mesh(mesh):
        compiled = jax.jit(decode, donate_argnums=2).lower(placed, tokens, cache).compile()
    memory = compiled.memory_analysis()
    def per_device(tree) -> int:
        return sum(a.dtype.itemsize * math.prod(a.sharding.shard_shape(a.shape)) for a in jax.tree.leaves(tree))

    weights, cache_bytes = per_device(placed), per_device(cache)
    peak = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes - memory.alias_size_in_bytes
    return {"preset": preset, "mesh": sizes, "context": context, "weight_bytes_per_device": weights,
            "cache_bytes_per_device": cache_bytes, "temp_bytes": memory.temp_size_in_bytes, "peak_bytes_per_device": peak}


def rows(scenarios=SCENARIOS, contexts=CONTEXTS):
    """`measure` for every scenario and context, with what the scenario stands for."""
    for preset, sizes, meaning in scenarios:
        for context in contexts:
            yield measure(preset, sizes, context) | {"stands_for": meaning}


def markdown_row(row: dict) -> str:
    """One row of README.md's "Does it fit?" table."""
    figures = ("weight_bytes_per_device", "cache_bytes_per_device", "temp_bytes", "peak_bytes_per_device")
    cells = [row["preset"], str(tuple(row["mesh"])), row["stands_for"], f"{row['context'] // 1024}k", *(f"{row[f] / GIB:.2f}" for f in figures)]
    return "| " + " | ".join(cells) + " |"


def text_row(row: dict) -> str:
    return (f"{row['preset']:<14}{str(row['mesh']):<14}{row['stands_for']:<24}{row['context']:>8}{row['weight_bytes_per_device'] / GIB:>13.2f}"
            f"{row['cache_bytes_per_device'] / GIB:>9.2f}{row['temp_bytes'] / GIB:>10.2f}{row['peak_bytes_per_device'] / GIB:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print README.md's table (markdown) instead of aligned text")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.markdown:
        print(MARKDOWN_HEADER, flush=True)
    else:
        print(f"{'preset':<14}{'mesh (d,e,m)':<14}{'stands for':<24}{'context':>8}{'weights GiB':>13}{'KV GiB':>9}{'temp GiB':>10}{'peak GiB':>10}")
    measured = []
    for row in rows():
        measured.append(row)
        print(markdown_row(row) if args.markdown else text_row(row), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(measured, handle, indent=2)


if __name__ == "__main__":
    main()
