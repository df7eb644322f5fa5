"""The bandwidth-bound decode ceiling: memory bandwidth of this machine and bytes a decode step must read.

At batch 1 and 8 a decode step does a few flops per weight byte, so it can go no faster than
reading everything it touches once: the active experts (packed), attention, router, norms and
unembedding (bf16), one embedding row per sequence, and the KV cache.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from flax import nnx

from gptoss_jax import GptOss, GptOssConfig


def _on_every_core(total_bytes: int, repeats: int, work) -> tuple[float, int]:
    """(best seconds of `repeats`, bytes of the source) for `work(src_part, dst_part)` over a large
    array split across the cores (numpy releases the GIL in copies and reductions)."""
    src = np.ones(total_bytes // 8, np.float64)
    dst = np.zeros_like(src)
    threads = os.cpu_count() or 1
    slices = [slice(i * len(src) // threads, (i + 1) * len(src) // threads) for i in range(threads)]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(lambda part: work(src[part], dst[part]), slices))
            best = min(best, time.perf_counter() - start)
    return best, src.nbytes


def copy_bandwidth(total_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes per second moved by a large copy (read + write, best of `repeats`), on every core at once."""
    seconds, nbytes = _on_every_core(total_bytes, repeats, np.copyto)
    return 2 * nbytes / seconds


def read_bandwidth(total_bytes: int = 1024 * 2**20, repeats: int = 5) -> float:
    """Bytes per second read by a large sum (what a decode step does to its weights), on every core."""
    seconds, nbytes = _on_every_core(total_bytes, repeats, lambda src, dst: np.add.reduce(src))
    return nbytes / seconds


def abstract_model(config: GptOssConfig, expert_format: str) -> GptOss:
    return nnx.eval_shape(lambda: GptOss(config, rngs=nnx.Rngs(0), expert_format=expert_format))


def experts_touched(config: GptOssConfig, batch: int) -> float:
    """Expected distinct experts per layer when `batch` tokens each pick `experts_per_token` uniformly."""
    untouched = (1 - config.experts_per_token / config.num_experts) ** batch
    return config.num_experts * (1 - untouched)


def weight_bytes_read(model: GptOss, tokens: int) -> float:
    """Parameter bytes a step over `tokens` tokens reads: the experts they touch, one embedding row each."""
    config, total = model.config, 0.0
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        value, name = variable.get_value(), str(path[-1])
        nbytes = value.size * value.dtype.itemsize
        if name == "embedding":
            nbytes *= min(tokens, config.vocab_size) / config.vocab_size
        elif name.startswith(("mlp1", "mlp2")):  # expert tensors: [layers, E, ...]
            nbytes *= experts_touched(config, tokens) / config.num_experts
        total += nbytes
    return total


def cache_bytes(model: GptOss, batch: int, context: int) -> int:
    cache = jax.eval_shape(lambda: model.init_cache(batch, context))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))


def decode_bytes_per_step(model: GptOss, batch: int, context: int) -> float:
    """Bytes one decode step of `batch` sequences reads, with `context` tokens cached per sequence."""
    return weight_bytes_read(model, batch) + cache_bytes(model, batch, context)
