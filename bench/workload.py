"""What every engine of `decode.py` runs, and how one engine's timings become its figures.

Shared by the engine processes (ours and transformers), so both see the same prompts, chunking and
timing rules. Imports only numpy: the transformers process must not pay for importing JAX.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from collections.abc import Callable

import numpy as np

PREFILL_CHUNK = 512  # prefill step: our Sampler's default (tokens over all rows); transformers' tokens per row


def prompts(vocab_size: int, length: int, batch: int, seed: int) -> list[list[int]]:
    """`batch` random prompts of `length` token ids, the same in every engine for the same seed."""
    rng = np.random.default_rng([seed, length, batch])
    return rng.integers(0, vocab_size, (batch, length)).tolist()


@dataclasses.dataclass(frozen=True)
class Run:
    """What one generate call measured (times in wall-clock seconds)."""

    prefill: float  # the whole prompt, until the first new token is known
    first_step: float  # the first decode step (compiles on a shape's first call)
    decode: float  # the decode steps after the first
    decode_steps: int
    first_tokens: list[int]  # the first new token of each row
    first_token_at: float  # time.time() when the first token was known
    cache_bytes: int  # the KV cache it held


Generate = Callable[[list[list[int]], int], Run]  # (prompts, new tokens) -> one greedy, never-stopping run


def measure(engine: str, generate: Generate, vocab_size: int, spec: dict) -> dict:
    """Runs every (prompt, batch) case of `spec`, a warm-up and `repeats` timed runs each."""
    cases, first_token_at = [], None
    for prompt in spec["prompts"]:
        for batch in spec["batches"]:
            tokens = prompts(vocab_size, prompt, batch, spec["seed"])
            runs = [generate(tokens, spec["new_tokens"]) for _ in range(1 + spec["repeats"])]
            first_token_at = first_token_at or runs[0].first_token_at
            cases.append(summarize(runs, prompt=prompt, batch=batch, new_tokens=spec["new_tokens"]))
            print(f"{engine}: prompt {prompt} batch {batch}: {cases[-1]['decode_tokens_per_s']:.2f} tok/s decode",
                  file=sys.stderr, flush=True)
    return {"ttft_s": first_token_at - spec["spawned_at"], "cases": cases}


def summarize(runs: list[Run], *, prompt: int, batch: int, new_tokens: int) -> dict:
    """Figures of one (prompt, batch) case: medians over the timed runs, compile from the warm-up run.

    `runs[0]` is the warm-up (the first call of this shape); compile time is how much longer its
    prefill and first decode step took than the median of the others.
    """
    warmup, timed = runs[0], runs[1:]
    prefill = statistics.median(r.prefill for r in timed)
    step = statistics.median(r.decode / r.decode_steps for r in timed)
    return {
        "prompt": prompt,
        "batch": batch,
        "new_tokens": new_tokens,
        "prefill_tokens_per_s": prompt * batch / prefill,
        "decode_tokens_per_s": batch / step,  # summed over the batch's rows
        "prefill_compile_s": max(warmup.prefill - prefill, 0.0),
        "decode_compile_s": max(warmup.first_step - step, 0.0),
        "cache_bytes": warmup.cache_bytes,
        "first_tokens": warmup.first_tokens,
    }
