"""`python -m convert.synthetic DST --preset NAME`: a checkpoint of random weights in a published layout.

For tests and benchmarks, since real weights cannot be downloaded here: the preset's exact tensor
names, shapes and dtypes, sane values (MXFP4 scales near 2^-6, norms near 1, non-zero sinks and
biases), written tensor by tensor in chunks so even gpt-oss-120b stays within a small memory bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from convert import layouts, published
from gptoss_jax import mxfp4
from gptoss_jax.config import GptOssConfig

_CHUNK_ELEMENTS = 32 * 2**20


def _values(tensor: layouts.Tensor, seed: int) -> Iterator[np.ndarray]:
    """Random contents of one tensor in chunks of rows.

    Each parameter piece (target) draws from its own seeded stream, so both layouts, and packed or
    dense experts, hold the same weights for the same seed.
    """
    for target in tensor.targets:
        rows, row_shape = target.stop - target.start, tensor.shape[1:]
        per_expert = target.path[-1].startswith(("mlp1", "mlp2"))
        step = 1 if per_expert else max(1, _CHUNK_ELEMENTS // max(int(np.prod(row_shape)), 1))
        for chunk, start in enumerate(range(0, rows, step)):
            shape = (min(step, rows - start), *row_shape)
            yield _random(target, shape, lambda path: _rng(seed, path, target.layer, chunk))


def _rng(seed: int, path: tuple[str, ...], layer: int | None, chunk: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(".".join(path).encode()), 0 if layer is None else layer + 1, chunk])


def _random(target: layouts.Target, shape: tuple[int, ...], rng_for) -> np.ndarray:
    name = target.path[-1]
    rng = rng_for(target.path)
    if name.endswith("_weight"):  # dense experts: the packed weights of the same seed, decoded
        stem = name.removesuffix("_weight")
        E, inp, out = shape
        blocks = _random(dataclasses.replace(target, path=(*target.path[:-1], f"{stem}_blocks")), (E, out, inp // mxfp4.BLOCK, mxfp4.BYTES_PER_BLOCK), rng_for)
        scales = _random(dataclasses.replace(target, path=(*target.path[:-1], f"{stem}_scales")), (E, out, inp // mxfp4.BLOCK), rng_for)
        return np.swapaxes(np.asarray(mxfp4.dequantize(blocks, scales, np.float32)), 1, 2)
    if name.endswith("_blocks"):
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if name.endswith("_scales"):
        return rng.integers(117, 121, shape, dtype=np.uint8)
    if name == "scale":  # norms
        return rng.uniform(0.5, 1.5, shape)
    if name == "sinks" or name == "embedding":
        return rng.normal(0.0, 1.0, shape)
    if name.endswith("bias"):
        return rng.normal(0.0, 0.1, shape)
    return rng.normal(0.0, 1.0, shape) * shape[-1] ** -0.5


def write_checkpoint(
    dst: Path, config: GptOssConfig, *, layout: str = "hf", seed: int = 0, dense_experts: bool = False,
    progress: bool | None = None,
) -> int:
    """Writes config.json and the safetensors files of `layout` into `dst`; returns tensor bytes written."""
    return published.write(dst, config, lambda tensor: _values(tensor, seed), layout=layout,
                           dense_experts=dense_experts, progress=progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("dst", type=Path, help="folder to write (created)")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "gpt-oss-20b", "gpt-oss-120b"])
    parser.add_argument("--layers", type=int, help="cut the depth to N layers")
    parser.add_argument("--layout", default="hf", choices=list(layouts.LAYOUTS), help="published layout to write")
    parser.add_argument("--dense-experts", action="store_true", help="HF layout with bf16 experts, as fine-tunes ship")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = GptOssConfig.from_preset(args.preset)
    try:
        if args.layers is not None:
            config = dataclasses.replace(config, num_hidden_layers=args.layers)
        if args.dense_experts and args.layout != "hf":
            raise ValueError("--dense-experts exists only in the hf layout")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    written = write_checkpoint(args.dst, config, layout=args.layout, seed=args.seed, dense_experts=args.dense_experts)
    print(f"wrote {written / 1e9:.2f} GB of random {args.preset} weights ({config.num_hidden_layers} layers, {args.layout} layout) to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
