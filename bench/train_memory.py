"""Does fine-tuning fit? Bytes per device of one compiled training step, from shapes alone.

Compiles `value_and_grad` of the chunked next-token loss plus an AdamW update, for LoRA (rank 16, all
targets, packed MXFP4 experts frozen) and full fine-tuning (dense bf16 experts), on abstract arrays
placed on an abstract mesh, so nothing is allocated; reads `compiled.memory_analysis()`. XLA's CPU
compiler stands in for the GPU one (same program and buffers; its allocator and fusions differ).
Per-layer remat and the `grouped` MoE throughout.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/train_memory.py [--markdown] [--json out.json]

`--markdown` prints README.md's fine-tuning memory table, verbatim (tests/test_readme_tables.py checks it).
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gptoss_jax import GptOss, GptOssConfig, LoraSpec, sharding
from gptoss_jax.loss import cross_entropy

SCENARIOS = [  # (preset, training, mesh (data, expert, model), tokens per step, what it stands for)
    ("gpt-oss-20b", "lora", (1, 1, 1), 4096, "LoRA on 1 x 80 GB"),
    ("gpt-oss-120b", "lora", (1, 1, 1), 4096, "LoRA on 1 x 80 GB"),
    ("gpt-oss-120b", "lora", (1, 1, 1), 1024, "LoRA on 1 x 80 GB"),
    ("gpt-oss-120b", "lora", (1, 8, 1), 4096, "LoRA on 8 x 80 GB, expert=8"),
    ("gpt-oss-20b", "full", (1, 8, 1), 4096, "full fine-tuning on 8 x 80 GB"),
]


def measure(preset: str, training: str, sizes: tuple[int, int, int], tokens: int) -> dict:
    config = GptOssConfig.from_preset(preset)
    mesh = sharding.make_mesh(*sizes, config=config, devices=jax.devices()[: math.prod(sizes)])
    options = dict(lora=LoraSpec(rank=16, alpha=32.0)) if training == "lora" else dict(expert_format="bf16")
    trained = nnx.LoRAParam if training == "lora" else nnx.Param
    abstract = nnx.eval_shape(lambda: GptOss(config, rngs=nnx.Rngs(0), moe_impl="grouped", remat="layer", **options))
    graphdef, params, frozen = nnx.split(abstract, trained, ...)
    optimizer = optax.adamw(1e-4)
    opt_state = jax.eval_shape(optimizer.init, params)

    def placed(tree):
        def place(leaf):
            value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
            logical = leaf.get_metadata().get("out_sharding") if isinstance(leaf, nnx.Variable) else None
            spec = sharding.named(mesh, logical or (None,) * value.ndim)
            return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=spec)

        return jax.tree.map(place, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))

    batch = jax.ShapeDtypeStruct((1, tokens + 1), jnp.int32, sharding=sharding.named(mesh, ("batch", None)))

    def step(params, frozen, opt_state, batch):
        def loss(params):
            model = nnx.merge(graphdef, params, frozen)
            h = model.hidden(batch[:, :-1])
            return cross_entropy(h, model.unembedding[...], batch[:, 1:], jnp.ones(batch[:, 1:].shape, bool))

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    args = (placed(params), placed(frozen), placed(opt_state), batch)
    with jax.set_mesh(mesh):
        compiled = jax.jit(step, donate_argnums=(0, 2)).lower(*args).compile()
    memory = compiled.memory_analysis()

    def per_device(tree) -> int:
        return sum(a.dtype.itemsize * math.prod(a.sharding.shard_shape(a.shape)) for a in jax.tree.leaves(tree))

    peak = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes - memory.alias_size_in_bytes
    return {
        "preset": preset, "training": training, "mesh": sizes, "tokens": tokens,
        "trained_bytes_per_device": per_device(args[0]), "frozen_bytes_per_device": per_device(args[1]),
        "optimizer_bytes_per_device": per_device(args[2]), "temp_bytes": memory.temp_size_in_bytes,
        "peak_bytes_per_device": peak,
    }


GIB = 2**30
FIGURES = ("trained_bytes_per_device", "frozen_bytes_per_device", "optimizer_bytes_per_device", "temp_bytes", "peak_bytes_per_device")
MARKDOWN_HEADER = (
    "| preset | training | mesh (data, expert, model) | stands for | tokens | trained GiB | frozen GiB | AdamW GiB | temp GiB | peak GiB |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def rows(scenarios=SCENARIOS, tokens: int | None = None):
    """`measure` for every scenario (at `tokens` per step if given), with what the scenario stands for."""
    for preset, training, sizes, default_tokens, meaning in scenarios:
        yield measure(preset, training, sizes, tokens or default_tokens) | {"stands_for": meaning}


def markdown_row(row: dict) -> str:
    """One row of README.md's fine-tuning memory table."""
    cells = [row["preset"], row["training"], str(tuple(row["mesh"])), row["stands_for"], str(row["tokens"]),
             *(f"{row[f] / GIB:.2f}" for f in FIGURES)]
    return "| " + " | ".join(cells) + " |"


def text_row(row: dict) -> str:
    return (f"{row['preset']:<14}{row['training']:<9}{str(tuple(row['mesh'])):<14}{row['tokens']:>7}"
            + "".join(f"{row[f] / GIB:>{w}.2f}" for f, w in zip(FIGURES, (12, 11, 9, 9, 9))) + f"  {row['stands_for']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print README.md's table (markdown) instead of aligned text")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--tokens", type=int, help="tokens per step for every scenario (default: each scenario's)")
    args = parser.parse_args()
    if args.markdown:
        print(MARKDOWN_HEADER, flush=True)
    else:
        print(f"{'preset':<14}{'training':<9}{'mesh (d,e,m)':<14}{'tokens':>7}{'trained GiB':>12}{'frozen GiB':>11}"
              f"{'adam GiB':>9}{'temp GiB':>9}{'peak GiB':>9}  stands for")
    measured = []
    for row in rows(tokens=args.tokens):
        measured.append(row)
        print(markdown_row(row) if args.markdown else text_row(row), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(measured, handle, indent=2)


if __name__ == "__main__":
    main()
