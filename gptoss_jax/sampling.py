"""Generation from a `GptOss`: strategies, and a `Sampler` with a jitted prefill and decode step.

Prompts are padded to a multiple of `bucket` tokens and the cache to a multiple of `bucket` slots,
so a chat whose prompt grows turn by turn recompiles only when it crosses a bucket. Long prompts are
prefilled in steps of about `prefill_chunk` tokens summed over the rows (each row gets an equal,
bucket-aligned share, at least one bucket). That bounds the activations a step holds (the largest, full
attention's float32 logits, are 64 heads x cache length x tokens per step x 4 bytes), while steps stay
long enough that each expert, decoded once per step, serves many rows (at gpt-oss-20b shapes on CPU,
512-token steps prefill 1.4x faster than 256-token ones).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from gptoss_jax import sharding
from gptoss_jax.kv_cache import KVCache
from gptoss_jax.model import GptOss
from gptoss_jax.tokenizer import CALL, RETURN


@dataclasses.dataclass(frozen=True)
class Greedy:
    """The most likely token."""

    def __call__(self, logits_BV: jax.Array, key: jax.Array) -> jax.Array:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Random:
    """Sampling at `temperature`, restricted to the `top_k` most likely tokens (0 = all), the smallest set
    with probability >= `top_p`, and tokens at least `min_p` times as likely as the best."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or not 0 <= self.min_p < 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling settings {self}: need temperature > 0, 0 < top_p <= 1, 0 <= min_p < 1, top_k >= 0")

    def __call__(self, logits_BV: jax.Array, key: jax.Array) -> jax.Array:
        logits = logits_BV.astype(jnp.float32) / self.temperature
        if self.top_k:
            kth = jax.lax.top_k(logits, self.top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        probs = jax.nn.softmax(logits, axis=-1)
        if self.min_p:
            logits = jnp.where(probs < self.min_p * probs.max(-1, keepdims=True), -jnp.inf, logits)
        if self.top_p < 1:
            order = jnp.argsort(-probs, axis=-1)
            sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
            outside = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs >= self.top_p  # the best token always stays
            logits = jnp.where(jnp.put_along_axis(outside, order, outside, axis=-1, inplace=False), -jnp.inf, logits)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


Strategy = Greedy | Random


@dataclasses.dataclass(frozen=True)
class Generation:
    """What `Sampler.generate` returns. Times are wall clock; the first call of a shape includes compilation."""

    tokens: list[list[int]]  # generated ids per prompt, the stop token included when one was hit
    stopped: list[bool]  # True where a stop token ended the row, False where max_new_tokens did
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float  # decode steps after the first (the first one may compile)
    decode_steps: int

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / max(self.prefill_seconds, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens per second per row in steady state (None with too few steps to tell)."""
        return self.decode_steps / self.decode_seconds if self.decode_steps else None


# Plain jax.jit over the split model: parameters go in as arguments and nothing comes back but tokens
# and the cache (donated, so it is updated in place).
@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=3)
def _prefill(graphdef, params, tokens_BT, cache: KVCache, lengths_B, key, strategy: Strategy):
    # Rows with nothing in this chunk sample from their first position's logits; the caller ignores them.
    logits_B1V, cache = nnx.merge(graphdef, params).step(tokens_BT, cache, lengths_B, last_only=True)
    return strategy(logits_B1V[:, 0], key), cache


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=3)
def _decode(graphdef, params, tokens_B, cache: KVCache, key, strategy: Strategy):
    logits_BTV, cache = nnx.merge(graphdef, params).step(tokens_B[:, None], cache)
    return strategy(logits_BTV[:, 0], key), cache


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Sampler:
    """Generates continuations of token-id prompts (of different lengths) from a model."""

    def __init__(
        self, model: GptOss, *, stop_tokens: Sequence[int] = (RETURN, CALL), bucket: int = 64, prefill_chunk: int = 512,
        mesh: Mesh | None = None,
    ):
        """`mesh`: run sharded on it (the model's parameters must already live there, e.g. `load(..., mesh=mesh)`)."""
        if prefill_chunk % bucket:
            raise ValueError(f"prefill_chunk={prefill_chunk} must be a multiple of bucket={bucket}")
        self.model, self.stop_tokens, self.bucket, self.prefill_chunk = model, tuple(stop_tokens), bucket, prefill_chunk
        self.mesh = mesh


    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 256,
        strategy: Strategy = Greedy(),
        seed: int = 0,
        stop_tokens: Sequence[int] | None = None,
        on_token: Callable[[int, int], None] | None = None,
    ) -> Generation:
        """Runs each prompt until a stop token or `max_new_tokens`; `on_token(row, token)` streams tokens."""
        if self.mesh is None:
            return self._generate(prompts, max_new_tokens, strategy, seed, stop_tokens, on_token)
        if len(prompts) % sharding.batch_shards(self.mesh):
            raise ValueError(f"{len(prompts)} prompts cannot be split {sharding.batch_shards(self.mesh)} ways over the mesh's batch axis")
        with jax.set_mesh(self.mesh):
            return self._generate(prompts, max_new_tokens, strategy, seed, stop_tokens, on_token)

    def _generate(self, prompts, max_new_tokens, strategy, seed, stop_tokens, on_token) -> Generation:
        stops = set(self.stop_tokens if stop_tokens is None else stop_tokens)
        lengths = np.array([len(p) for p in prompts], np.int32)
        context = self.model.config.max_context
        if len(prompts) == 0 or lengths.min() < 1 or max_new_tokens < 1:
            raise ValueError("need at least one non-empty prompt and max_new_tokens >= 1")
        if lengths.max() + max_new_tokens > context:
            raise ValueError(f"a prompt of {lengths.max()} tokens plus {max_new_tokens} new ones exceeds the context of {context}")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        padded = np.zeros((len(prompts), _round_up(int(lengths.max()), self.bucket)), np.int32)
        for row, prompt in enumerate(prompts):
            padded[row, : len(prompt)] = prompt
        cache = self.model.init_cache(len(prompts), min(_round_up(padded.shape[1] + max_new_tokens, self.bucket), context))
        if self.mesh is not None:
            cache = sharding.place_tree(cache, cache.logical_axes(), self.mesh)
        keys = jax.random.split(jax.random.key(seed), max_new_tokens)
        model = nnx.split(self.model)  # per call: the model's parameters may have changed since the last one

        start = time.perf_counter()
        tokens, cache = self._prefill(model, padded, lengths, cache, keys[0], strategy)
        prefill_seconds = time.perf_counter() - start
        generated, stopped = [[] for _ in prompts], [False] * len(prompts)
        steady_start, step = None, 0
        while True:
            for row, token in enumerate(tokens.tolist()):
                if not stopped[row]:
                    generated[row].append(token)
                    stopped[row] = token in stops
                    if on_token is not None:
                        on_token(row, token)
            step += 1
            if all(stopped) or step == max_new_tokens:
                break
            if step == 2:
                steady_start = time.perf_counter()  # after the first decode step, which may compile
            tokens, cache = _decode(*model, jnp.asarray(tokens), cache, keys[step], strategy)
            tokens = np.asarray(tokens)
        steady = max(step - 2, 0)
        return Generation(
            tokens=generated,
            stopped=stopped,
            prompt_tokens=int(lengths.sum()),
            prefill_seconds=prefill_seconds,
            decode_seconds=time.perf_counter() - steady_start if steady_start is not None else 0.0,
            decode_steps=steady,
        )

    def _prefill(self, model, padded: np.ndarray, lengths: np.ndarray, cache: KVCache, key, strategy: Strategy):
        """Caches the prompts chunk by chunk; each row's first token comes from the chunk with its last prompt token."""
        first = np.zeros(len(lengths), np.int32)
        per_row = max(self.bucket, self.prefill_chunk // len(lengths) // self.bucket * self.bucket)
        for start in range(0, padded.shape[1], per_row):
            chunk = padded[:, start : start + per_row]
            valid = np.clip(lengths - start, 0, chunk.shape[1]).astype(np.int32)
            tokens, cache = _prefill(*model, jnp.asarray(chunk), cache, jnp.asarray(valid), key, strategy)
            ends_here = (lengths > start) & (lengths <= start + chunk.shape[1])
            first = np.where(ends_here, np.asarray(tokens), first)
        return first, cache
