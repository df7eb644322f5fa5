"""Engine process for `decode.py`: gptoss-jax on a converted checkpoint, through the public API only.

    python bench/engine_ours.py SPEC_JSON

SPEC_JSON holds checkpoint, prompts, batches, new_tokens, repeats, seed and spawned_at (the parent's
`time.time()` at spawn, so time to first token counts this process's imports). Prints its figures as
one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import functools
import json
import sys
import time

import jax
from flax import nnx

import gptoss_jax
import workload


def generate(sampler: gptoss_jax.Sampler, prompts: list[list[int]], new_tokens: int) -> workload.Run:
    stamps = []  # when each token of row 0 arrived

    def on_token(row: int, token: int) -> None:
        if row == 0:
            stamps.append(time.time())

    generation = sampler.generate(prompts, max_new_tokens=new_tokens, stop_tokens=(), on_token=on_token)
    cache = jax.eval_shape(lambda: sampler.model.init_cache(len(prompts), len(prompts[0]) + new_tokens))
    return workload.Run(
        prefill=generation.prefill_seconds,
        first_step=stamps[1] - stamps[0],
        decode=generation.decode_seconds,
        decode_steps=generation.decode_steps,
        first_tokens=[row[0] for row in generation.tokens],
        first_token_at=stamps[0],
        cache_bytes=sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache)),
    )


def main(spec: dict) -> dict:
    start = time.perf_counter()
    model = gptoss_jax.load(spec["checkpoint"])
    load_s = time.perf_counter() - start
    print(f"ours: loaded in {load_s:.1f} s", file=sys.stderr, flush=True)
    sampler = gptoss_jax.Sampler(model, prefill_chunk=workload.PREFILL_CHUNK)
    figures = workload.measure("ours", functools.partial(generate, sampler), model.config.vocab_size, spec)
    return {"load_s": load_s, "param_bytes": sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model))), **figures}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
